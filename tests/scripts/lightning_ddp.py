"""Lightning `strategy="ddp"` on 2 CPU processes with GradWatchCallback; run by tests/test_lightning.py.

    python tests/scripts/lightning_ddp.py RUN_DIR OUT_DIR

Lightning starts rank 1 by running this script again. Each rank writes OUT_DIR/rank<r>.json: its losses,
and the per-layer gradient norms it saw in `on_before_optimizer_step` (after DDP's all-reduce).
"""
import json
import sys

import lightning.pytorch as pl
import torch
from torch import nn

from gradwatch.integrations.lightning import GradWatchCallback


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.ref, self.losses = {}, []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.ref[self.global_step] = {
            name: float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad.double()) for p in m.parameters(recurse=False)])))
            for name, m in self.named_modules() if list(m.parameters(recurse=False))}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    run_dir, out_dir = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model = Tiny()
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[GradWatchCallback(run_dir=run_dir, detect_every=0)])
    trainer.fit(model, loader)
    with open(f"{out_dir}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"ref": model.ref, "losses": model.losses}, f)


if __name__ == "__main__":
    main()
