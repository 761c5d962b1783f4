"""Train a small MLP with a plain PyTorch loop under gradwatch, then print where the run was written.

    python examples/plain_loop.py [--run-dir runs/plain_loop] [--steps 300]
"""
import argparse

import torch
from torch import nn

import gradwatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/plain_loop")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    y = (x[:, :5].sum(1) > 0).long()  # a learnable rule, so the loss really falls
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    with gradwatch.watch(model, optimizer=opt, run_dir=args.run_dir, overwrite=True) as gw:
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (64,))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # gradwatch records the pre-clip norms
            opt.step()
            gw.step(loss)

    run = gradwatch.load_run(args.run_dir)
    first, last = run.steps["loss"].iloc[:20].mean(), run.steps["loss"].iloc[-20:].mean()
    print(f"trained {len(run.steps)} steps: loss {first:.3f} -> {last:.3f}")
    print(f"run written to {args.run_dir} ({run.layers['layer'].nunique()} layers and activations watched)")
    print(f"read it back with: gradwatch.load_run({args.run_dir!r})")


if __name__ == "__main__":
    main()
