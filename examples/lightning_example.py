"""Train a small MLP with Lightning under gradwatch's callback, then print where the run went and its diagnosis.

    python examples/lightning_example.py [--run-dir runs/lightning_example] [--steps 200]
"""
import argparse

import lightning.pytorch as pl
import torch
from torch import nn

import gradwatch
from gradwatch.integrations.lightning import GradWatchCallback


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/lightning_example")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    y = (x[:, :5].sum(1) > 0).long()  # a learnable rule, so the loss really falls
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", accumulate_grad_batches=2,  # one gradwatch step per 2 batches
        gradient_clip_val=1.0,  # gradwatch records the norms before this clipping
        callbacks=[GradWatchCallback(run_dir=args.run_dir, overwrite=True)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Classifier(), loader)

    run = gradwatch.load_run(args.run_dir)
    first, last = run.steps["loss"].iloc[:20].mean(), run.steps["loss"].iloc[-20:].mean()
    print(f"trained {len(run.steps)} optimizer steps: loss {first:.3f} -> {last:.3f}")
    print(f"run written to {args.run_dir}")
    print(gradwatch.diagnose(args.run_dir).summary())


if __name__ == "__main__":
    main()
