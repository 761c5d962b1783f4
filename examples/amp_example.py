"""Train a small MLP with CPU mixed precision under gradwatch, then print where the run was written.

    python examples/amp_example.py [--run-dir runs/amp_example] [--steps 150] [--dtype bf16|fp16]

bf16 (the default) needs no loss scaling. fp16 has a 65504 ceiling, so its loop goes through a
`torch.amp.GradScaler`; the same loop serves both, with the scaler disabled under bf16. gradwatch gets the
scaler, so it records unscaled gradient norms and marks the steps the scaler skipped.
"""
import argparse

import torch
from torch import nn

import gradwatch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/amp_example")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    y = (x[:, :5].sum(1) > 0).long()  # a learnable rule, so the loss really falls
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A disabled scaler passes the loss and the step through untouched, so bf16 runs the same loop.
    scaler = torch.amp.GradScaler("cpu", enabled=args.dtype == "fp16")

    with gradwatch.watch(model, optimizer=opt, scaler=scaler, run_dir=args.run_dir, overwrite=True) as gw:
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (64,))
            with torch.autocast("cpu", dtype=DTYPES[args.dtype]):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # clip the true gradients; gradwatch records them before the clip
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)  # skips opt.step() when the fp16 gradients hold Inf/NaN
            scaler.update()
            gw.step(loss)

    run = gradwatch.load_run(args.run_dir)
    steps = run.steps
    first, last = steps["loss"].iloc[:20].mean(), steps["loss"].iloc[-20:].mean()
    skipped = int(steps["skipped"].fillna(False).sum())
    scale = steps["loss_scale"].dropna()
    scaling = f"loss scale {scale.iloc[0]:g} -> {scale.iloc[-1]:g}" if len(scale) else "no loss scaling"
    print(f"trained {len(steps)} steps in {args.dtype}: loss {first:.3f} -> {last:.3f}, "
          f"{skipped} skipped by the GradScaler, {scaling}")
    print(f"run written to {args.run_dir}")
    print(f"read it back with: gradwatch.load_run({args.run_dir!r})")


if __name__ == "__main__":
    main()
