"""Train a tiny Bert, built from a config (no downloads), with Hugging Face `Trainer` under gradwatch.

    python examples/hf_trainer_example.py [--run-dir runs/hf_trainer] [--steps 60]

Needs `pip install "gradwatch[hf]"`.
"""
import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import gradwatch
from gradwatch.integrations.transformers import GradWatchCallback


def make_dataset(n: int = 512, length: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, length), generator=g)
    labels = (ids[:, :4].sum(1) > 4 * 50).long()  # a learnable rule on the first tokens
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/hf_trainer")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    with tempfile.TemporaryDirectory() as hf_out:  # HF's own output_dir; nothing is saved there
        training_args = TrainingArguments(output_dir=hf_out, max_steps=args.steps, per_device_train_batch_size=16,
                                          gradient_accumulation_steps=2, learning_rate=1e-3, max_grad_norm=1.0,
                                          report_to=[], save_strategy="no", logging_steps=10, use_cpu=True,
                                          disable_tqdm=True)
        # gradwatch records the accumulated grads before HF clips them, and the raw loss of each step.
        callback = GradWatchCallback(run_dir=args.run_dir, overwrite=True)
        Trainer(model=model, args=training_args, train_dataset=make_dataset(), callbacks=[callback]).train()

    run = gradwatch.load_run(args.run_dir)
    print(f"trained {len(run.steps)} optimizer steps; run written to {args.run_dir}")
    print(gradwatch.diagnose(args.run_dir).summary())
    print(f"read it back with: gradwatch.load_run({args.run_dir!r})")


if __name__ == "__main__":
    main()
