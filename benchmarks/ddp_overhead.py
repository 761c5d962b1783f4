"""Per-step time overhead of gradwatch on a DistributedDataParallel model: 2 CPU processes, gloo.

    python benchmarks/ddp_overhead.py            # full run, ~3 min on 2 CPU cores
    python benchmarks/ddp_overhead.py --quick    # smoke run, < 90 s
    python benchmarks/ddp_overhead.py --markdown out.md --json out.json
    python benchmarks/ddp_overhead.py --against 693aa48   # baseline row: that revision's gradwatch

Method: the script spawns 2 processes (torch.multiprocessing, gloo backend on localhost), each
with `torch.set_num_threads(1)` so that 2 processes fill 2 cores. Each process builds one
DDP-wrapped copy of the same workload model per row: the plain DDP step (baseline) and
`gradwatch.watch(ddp_model, optimizer=opt, run_dir=<run>/rank<r>)`. Rows alternate in short
blocks of steps exactly as in `overhead.py` (`_harness.run_interleaved`), and both ranks draw the
same block order from the same seed, so they always run the same model's block together, as
DDP's collective all-reduce requires. A barrier precedes and ends every block, and rank 0 times
it: a block lasts until the slower rank is done, which is what a DDP step costs. Each rank
trains on its own rotation of the batches, as a DistributedSampler would give it.

Reported: median paired ratio - 1 with its IQR and a bootstrap 95% CI, and the amortized ratio
(sum of times), which sees the work gradwatch does only every `flush_every` seconds. The
baseline row is an A/A check: its CI is the resolution of the run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers sit next to this script

import _report  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _configs import CONFIGS  # noqa: E402
from _harness import (  # noqa: E402
    CompetingLoad,
    Session,
    run_interleaved,
    warm_up_and_size_block,
)
from _workloads import WORKLOADS  # noqa: E402
from compare_revision import extract_revision, watched  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

WORLD = 2
BLOCK_TARGET_S = 0.1  # a baseline block's length when --block is 0; see overhead.py
ROWS = ("gradwatch", "gradwatch-grads")  # the _configs rows that make sense on a DDP model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _report.add_common_args(p, rounds=100, block_target_s=BLOCK_TARGET_S, workloads=["mlp", "transformer"],
                            quick_help="smoke run: 3 rounds of 2-step blocks", per="row",
                            seed_help="seeds the block order (same on both ranks) and the bootstrap")
    p.add_argument("--configs", nargs="+", choices=list(ROWS), default=["gradwatch"],
                   help="rows besides the plain DDP step (default: gradwatch)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each process (default 1)")
    p.add_argument("--against", metavar="REV", default=None,
                   help="make the baseline row gradwatch at git revision REV (see compare_revision.py), so that "
                        "the gradwatch row reads as this checkout vs REV")
    return _report.parse_checked(p, argv, quick={"rounds": 3, "block": 2, "warmup": 3})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(workload, name: str, run_dir: Path, against: bool) -> Session:
    # Deepcopy before DDP and before any tool attaches: identical weights, no hooks shared between rows.
    model = DDP(copy.deepcopy(workload.model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=workload.lr)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = watched("gradwatch_rev", False)() if against and name == "baseline" else CONFIGS[name]()
    config.attach(model, optimizer, run_dir)
    return Session(config, workload)


def _agree(value: int) -> int:
    """Rank 0's value on every rank (the block length must match, or the collectives would not)."""
    t = torch.tensor([value])
    dist.broadcast(t, src=0)
    return int(t.item())


def bench_workload(wname: str, rank: int, args: argparse.Namespace, boot_rng: np.random.Generator,
                   tmp: Path) -> dict | None:
    workload = WORKLOADS[wname]()
    # Each rank its own batch order, as a DistributedSampler gives each rank its own shard.
    workload.batches = workload.batches[rank:] + workload.batches[:rank]
    # The run_dir differs per rank so that watch() works whether or not every rank writes a store.
    sessions = {n: _session(workload, n, tmp / wname / n / f"rank{rank}", args.against is not None)
                for n in ["baseline", *args.configs]}
    try:
        # Each rank times its own first block: both use rank 0's size.
        block = _agree(warm_up_and_size_block(sessions, args.warmup, args.block, BLOCK_TARGET_S, dist.barrier))
        # The same seed on both ranks, and a generator of its own (rank 0 alone draws bootstrap
        # samples from boot_rng): both ranks run the same row's block at the same time.
        order_rng = np.random.default_rng([args.seed, list(WORKLOADS).index(wname)])
        load = CompetingLoad()
        quiet = contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext()
        with quiet:
            timings = run_interleaved(sessions, args.rounds, block, dist.barrier, order_rng, wname)
        wall, own = time.perf_counter() - load.wall0, sum(os.times()[:2]) - load.own0
        share = load.share()
        gathered: list = [None] * WORLD
        # The next draw matches on every rank iff all drew the same block order.
        dist.all_gather_object(gathered, (own, float(order_rng.random())))
        if len({g[1] for g in gathered}) != 1:
            raise RuntimeError("the ranks ran different block orders; their timings are meaningless")
        owns = [g[0] for g in gathered]
    finally:
        for s in sessions.values():
            s.config.close()
    if rank:
        return None
    # CompetingLoad counts the other rank as "other processes"; it is this benchmark's own work.
    others = None if share is None else max(0.0, share - sum(owns[1:]) / (wall * (os.cpu_count() or 1)))
    return _report.workload_result(wname, workload.description, block, args.rounds, others, timings, boot_rng)


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if args.rev_path:
        sys.path.insert(0, args.rev_path)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        boot_rng = np.random.default_rng(args.seed)
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for w in args.workloads:
                t0 = time.perf_counter()
                res = bench_workload(w, rank, args, boot_rng, Path(tmp))
                if res is not None:
                    res["elapsed_s"] = time.perf_counter() - t0
                    results.append(res)
        if rank == 0:
            Path(out).write_text(json.dumps({"results": results, "torch_threads": torch.get_num_threads()}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def caption(info: dict, against: str | None) -> str:
    reference = "the plain DDP step" if against is None else f"gradwatch at {against} on the same DDP model"
    return (f"Overhead per DDP training step, {info['world_size']} CPU processes ({info['backend']}), "
            f"torch.set_num_threads({info['threads_per_process']}) each, torch {info['torch']} "
            f"({info['cpu_count']} CPUs). Median of paired block ratios vs. {reference} "
            "[bootstrap 95% CI]; amortized = total time ratio.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not dist.is_available() or not dist.is_gloo_available():
        sys.exit("this benchmark needs torch.distributed with the gloo backend")
    info = _report.machine_info(world_size=WORLD, backend="gloo", threads_per_process=args.threads)
    print("gradwatch DDP overhead benchmark")
    print("  " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"  {WORLD} processes, each with torch.set_num_threads({args.threads}); rank 0 times every block "
          "between two barriers")
    print("rows (each its own DDP-wrapped model copy on both ranks):")
    print(f"  {'baseline':<18}{CONFIGS['baseline'].note}, DDP")
    for name in args.configs:
        print(f"  {name:<18}{CONFIGS[name].note}, on the DDP model, run_dir=<run>/rank<r>")
    with tempfile.TemporaryDirectory() as tmp:
        args.rev_path = None
        if args.against:
            args.rev_path = str(Path(tmp) / "rev")
            extract_revision(args.against, Path(args.rev_path))
            print(f"  the baseline row is gradwatch at {args.against}: the gradwatch row reads as this "
                  f"checkout vs {args.against}")
        out = Path(tmp) / "rank0.json"
        mp.spawn(_worker, args=(_free_port(), args, str(out)), nprocs=WORLD, join=True)
        got = json.loads(out.read_text())
    results = got["results"]
    info["torch_threads_rank0"] = got["torch_threads"]
    for res in results:
        _report.print_time_table(res, label_width=20, baseline_label="DDP baseline (A/A)",
                                 others="processes outside this benchmark")
    md = _report.markdown(caption(info, args.against), results)
    _report.write_outputs(args, md, {"machine": info, "args": vars(args),
                                     "configs": {n: CONFIGS[n].note for n in args.configs}, "results": results})


if __name__ == "__main__":
    main()
