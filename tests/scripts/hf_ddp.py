"""A Hugging Face Trainer on 2 CPU processes (DDP, gloo) with GradWatchCallback; run by
tests/test_hf_trainer.py as `torchrun --standalone --nproc_per_node 2 tests/scripts/hf_ddp.py RUN OUT`.

Each rank writes OUT/rank<r>.json: its per-layer gradient norms read in `_clip_grad_norm` (after DDP's
all-reduce and accumulation, before clipping), and its raw losses.
"""
import json
import math
import sys

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from gradwatch.integrations.transformers import GradWatchCallback


class RefTrainer(Trainer):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.ref: list[dict[str, float]] = []

    def _clip_grad_norm(self, model):
        self.ref.append({name: math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in m.parameters(recurse=False)))
                         for name, m in self.model.named_modules()
                         if any(p.grad is not None for p in m.parameters(recurse=False))})
        return super()._clip_grad_norm(model)


def main() -> None:
    run_dir, out_dir = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (64, 12), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids[i, 0] % 2}
            for i in range(64)]
    args = TrainingArguments(output_dir=f"{out_dir}/hf", max_steps=4, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, max_grad_norm=0.01,
                             disable_tqdm=True, ddp_backend="gloo")
    trainer = RefTrainer(model=model, args=args, train_dataset=data,
                         callbacks=[GradWatchCallback(run_dir=run_dir, detect_every=0)])
    trainer.train()
    with open(f"{out_dir}/rank{trainer.args.process_index}.json", "w") as f:
        json.dump({"ref": trainer.ref, "world": trainer.args.world_size}, f)


if __name__ == "__main__":
    main()
