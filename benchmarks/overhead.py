"""Per-step time and memory overhead of gradwatch against a plain training step and other tools.

    python benchmarks/overhead.py                  # full run, ~4-6 min on 2 CPU cores
    python benchmarks/overhead.py --quick          # smoke run, ~30-60 s
    python benchmarks/overhead.py --markdown out.md --json out.json --device cuda

Time: every configuration trains its own copy of the same model on the same batches, and
short blocks of steps are interleaved, each non-baseline block paired with the baseline blocks
around it (see `_harness`). Reported: median paired ratio - 1 with its IQR and a bootstrap 95%
CI, and the amortized ratio (sum of times), which is the one that sees work a tool does only
every N steps. The baseline row is an A/A check: its CI is the resolution of the run.

Memory: each (workload, configuration) trains in a process of its own (see `_memory`); the
table shows its peak RSS (and peak CUDA allocation on GPU) minus the baseline process's.

Rows and workloads come from the registries in `_configs.py` and `_workloads.py`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers sit next to this script

import _report  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _configs import CONFIGS, GradwatchWithout  # noqa: E402
from _harness import (  # noqa: E402
    CompetingLoad,
    device_sync,
    extra_cost_ratio,
    feature_cost,
    make_session,
    run_interleaved,
    warm_up_and_size_block,
)
from _memory import measure_memory  # noqa: E402
from _workloads import WORKLOADS  # noqa: E402

# Long enough that timer and block-switch costs vanish, short enough that load drift on a
# shared machine is slow compared with one baseline/X pair of blocks.
BLOCK_TARGET_S = 0.08
TARGET_GRADS_VS_FLOOR = 1.5
ABLATION_REFERENCES = ("gradwatch", "gradwatch-grads", "floor")  # the rows an --ablation run compares with


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _report.add_common_args(p, rounds=30, block_target_s=BLOCK_TARGET_S, workloads=list(WORKLOADS),
                            quick_help="smoke run: 2 rounds, 2-step blocks, memory for the first workload only")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                   help="rows to run (baseline is always added; default: every row that is not an ablation)")
    p.add_argument("--ablation", action="store_true",
                   help="split gradwatch's cost by feature: the gradwatch row, each feature turned off, "
                        "grads-only, the floor and no-op hooks; paired differences between rows of one run")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-process memory measurement")
    p.add_argument("--mem-steps", type=int, default=20,
                   help="training steps in each memory process (default 20)")
    args = _report.parse_checked(p, argv, quick={"rounds": 2, "block": 2, "warmup": 2, "mem_steps": 5})
    if args.configs is None:
        args.configs = [n for n, c in CONFIGS.items() if c.ablation == args.ablation or
                        (args.ablation and n in ABLATION_REFERENCES)]
    return args


def bench_workload(wname: str, classes: list, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    device = torch.device(args.device)
    sync = device_sync(device)
    workload = WORKLOADS[wname]().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {cls.name: make_session(workload, cls, Path(tmp) / cls.name) for cls in classes}
        try:
            block = warm_up_and_size_block(sessions, args.warmup, args.block, BLOCK_TARGET_S, sync)
            load = CompetingLoad()
            timings = run_interleaved(sessions, args.rounds, block, sync, rng, wname)
            others_share = load.share()
        finally:
            for s in sessions.values():
                s.config.close()
    result = _report.workload_result(wname, workload.description, block, args.rounds, others_share, timings, rng)
    if "gradwatch" in result["rows"]:
        result["feature_cost"] = {name: feature_cost(timings, "gradwatch", name, rng)
                                  for name, cls in CONFIGS.items()
                                  if name in result["rows"] and issubclass(cls, GradwatchWithout)}
    if "gradwatch-grads" in result["rows"] and "floor" in result["rows"]:
        point, ci = extra_cost_ratio(timings, "gradwatch-grads", "floor", rng)
        result["grads_vs_floor"] = {"ratio": point, "ci": ci, "floor_ci_pct": result["rows"]["floor"]["ci_pct"]}
    return result


def fmt_mem(mem: dict | None, base: dict | None, key: str = "rss_mib") -> str:
    if not mem or not base:
        return "-"
    if "error" in mem:
        return "error"
    return f"{mem[key] - base[key]:+.0f}"


def _mem_cell(key: str) -> _report.Cell:
    """A column's cells: each row's peak `key` minus the baseline process's, from the result's "memory"."""
    return lambda res, name: fmt_mem(res["memory"].get(name), res["memory"].get("baseline"), key)


def print_workload(res: dict) -> None:
    cuda = any("cuda_mib" in m for m in res["memory"].values() if m)
    _report.print_time_table(res, columns=[("+RSS MiB", 10, _mem_cell("rss_mib"))]
                             + ([("+CUDA MiB", 11, _mem_cell("cuda_mib"))] if cuda else []))
    for name, (point, ci) in res.get("feature_cost", {}).items():
        print(f"   cost of what {name} turns off: {point:+.1f}% of the plain step "
              f"{_report.fmt_range(ci)} (paired gradwatch - {name} blocks)")
    g = res.get("grads_vs_floor")
    if g:
        print(f"   gradwatch-grads extra cost / floor extra cost = {g['ratio']:.2f}x "
              f"(bootstrap 95% CI {g['ci'][0]:.2f}..{g['ci'][1]:.2f}; target <= {TARGET_GRADS_VS_FLOOR}x)")
        if g["floor_ci_pct"][0] <= 0:
            print(f"   note: the floor's extra cost is within noise (CI {_report.fmt_range(g['floor_ci_pct'])} %), "
                  "so this ratio means nothing here; judge gradwatch-grads by its CI against the A/A row")
        elif g["ci"][1] <= TARGET_GRADS_VS_FLOOR:
            print("   -> meets the target")
        elif g["ci"][0] > TARGET_GRADS_VS_FLOOR:
            print("   -> misses the target")
        else:
            print(f"   -> inconclusive: the CI spans {TARGET_GRADS_VS_FLOOR}x; more --rounds narrow it")


def caption(info: dict) -> str:
    return (f"Overhead per training step, {info['device']}, torch {info['torch']}, "
            f"{info['torch_threads']} threads ({info['cpu_count']} CPUs). Median of paired block "
            "ratios vs. the plain step [bootstrap 95% CI]; amortized = total time ratio; "
            "memory = extra peak RSS of a separate process.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = _report.machine_info(torch_threads=torch.get_num_threads(), device=args.device)
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    print("gradwatch overhead benchmark")
    print("  " + ", ".join(f"{k}={v}" for k, v in info.items()))
    classes = [CONFIGS["baseline"]]
    print("configurations:")
    for name in [n for n in CONFIGS if n in args.configs or n == "baseline"]:
        cls = CONFIGS[name]
        reason = cls.available()
        print(f"  {name:<16}{cls.note}" + (f"  -- SKIPPED: {reason}" if reason else ""))
        if not reason and name != "baseline":
            classes.append(cls)

    if len(classes) == 1:
        sys.exit("no configuration besides baseline is available: nothing to compare")
    rng = np.random.default_rng(args.seed)
    results = []
    for w in args.workloads:
        t0 = time.perf_counter()
        results.append(bench_workload(w, classes, args, rng))
        results[-1]["elapsed_s"] = time.perf_counter() - t0

    memory: dict[str, dict] = {w: {} for w in args.workloads}
    if not args.no_memory:
        mem_workloads = args.workloads[:1] if args.quick else args.workloads
        print(f"\nmemory: {len(mem_workloads) * len(classes)} processes, {args.mem_steps} steps each",
              file=sys.stderr)
        measured = measure_memory([(w, c.name) for w in mem_workloads for c in classes], args.mem_steps,
                                  args.device, args.threads)
        for (w, c), m in measured.items():
            memory[w][c] = m
            if "error" in m:
                print(f"  memory {w}/{c} failed: {m['error']}")

    for res in results:
        res["memory"] = memory[res["workload"]]
        print_workload(res)

    md = _report.markdown(caption(info), results, amortized_ci=False,
                          columns=[("extra RSS MiB", _mem_cell("rss_mib"))])
    _report.write_outputs(args, md, {"machine": info, "args": vars(args),
                                     "configs": {c.name: c.note for c in classes}, "results": results})


if __name__ == "__main__":
    main()
