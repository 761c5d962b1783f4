"""Train a small MLP with DistributedDataParallel on CPU (gloo) under gradwatch; rank 0 writes the run.

    torchrun --nproc_per_node 2 examples/ddp_example.py [--run-dir runs/ddp_example] [--steps 200]

Every rank calls `gradwatch.watch()` and `step()`, as it does the rest of the loop: the ranks' activation,
NaN and loss statistics are merged into rank 0's store (a NaN that only rank 1 sees is reported with its
rank), and the other ranks write nothing.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradwatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/ddp_example")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    rank = dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    torch.manual_seed(0)  # the same data and initial weights on every rank
    x = torch.randn(4096, 20)
    y = (x[:, :5].sum(1) > 0).long()
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=32, sampler=sampler, drop_last=True)

    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    step, epoch = 0, 0
    with gradwatch.watch(model, optimizer=opt, run_dir=args.run_dir, overwrite=True) as gw:
        while step < args.steps:
            sampler.set_epoch(epoch)
            for xb, yb in loader:
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                gw.step(loss)
                step += 1
                if step == args.steps:
                    break
            epoch += 1

    if rank == 0:
        run = gradwatch.load_run(args.run_dir)
        first, last = run.steps["loss"].iloc[:20].mean(), run.steps["loss"].iloc[-20:].mean()
        print(f"trained {len(run.steps)} steps on {dist.get_world_size()} ranks: "
              f"mean loss over ranks {first:.3f} -> {last:.3f}")
        print(f"run written to {args.run_dir} by rank 0: {run.meta['distributed']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
