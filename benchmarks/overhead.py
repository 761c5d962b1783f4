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
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers sit next to this script

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _configs import CONFIGS  # noqa: E402
from _harness import (  # noqa: E402
    CompetingLoad,
    device_sync,
    extra_cost_ratio,
    make_session,
    run_interleaved,
    summarize,
    summarize_baseline,
    time_block,
)
from _memory import measure_memory  # noqa: E402
from _workloads import WORKLOADS  # noqa: E402

# Long enough that timer and block-switch costs vanish, short enough that load drift on a
# shared machine is slow compared with one baseline/X pair of blocks.
BLOCK_TARGET_S = 0.08
TARGET_GRADS_VS_FLOOR = 1.5
BUSY_SHARE = 0.1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds per workload (default 30)")
    p.add_argument("--block", type=int, default=0,
                   help=f"steps per timed block; 0 (default) picks per workload the fewest steps (>= 2) "
                        f"that make a baseline block last {BLOCK_TARGET_S * 1e3:.0f} ms")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per configuration first")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 rounds, 2-step blocks, memory for the first workload only")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="rows to run (baseline is always added)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-process memory measurement")
    p.add_argument("--mem-steps", type=int, default=20,
                   help="training steps in each memory process (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seeds the block order and the bootstrap")
    p.add_argument("--json", metavar="PATH", help="also write machine-readable results here")
    p.add_argument("--markdown", metavar="PATH", help="also write the summary Markdown table here")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (the A/A check needs two baseline blocks)")
    if args.quick:
        args.rounds, args.block, args.warmup, args.mem_steps = 2, 2, 2, 5
    return args


def machine_info(args: argparse.Namespace) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def bench_workload(wname: str, classes: list, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    device = torch.device(args.device)
    sync = device_sync(device)
    workload = WORKLOADS[wname]().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {cls.name: make_session(workload, cls, Path(tmp) / cls.name) for cls in classes}
        try:
            for s in sessions.values():
                s.steps(args.warmup)
                s.config.end_block()
            block = args.block
            if not block:
                per_step = time_block(sessions["baseline"], 3, sync) / 3
                block = max(2, math.ceil(BLOCK_TARGET_S / per_step))
            load = CompetingLoad()
            timings = run_interleaved(sessions, args.rounds, block, sync, rng, wname)
            others_share = load.share()
        finally:
            for s in sessions.values():
                s.config.close()
    rows = {"baseline": summarize_baseline(timings.base_blocks, block, rng)}
    for name in timings.blocks:
        rows[name] = summarize(timings.blocks[name], timings.paired_base[name], block, rng)
    result = {"workload": wname, "description": workload.description, "block": block,
              "rounds": args.rounds, "others_cpu_share": others_share,
              "rows": {n: vars(s) for n, s in rows.items()},
              "raw": {"blocks": timings.blocks, "paired_base": timings.paired_base,
                      "base_blocks": timings.base_blocks}}
    if "gradwatch-grads" in rows and "floor" in rows:
        point, ci = extra_cost_ratio(timings, "gradwatch-grads", "floor", rng)
        result["grads_vs_floor"] = {"ratio": point, "ci": ci, "floor_ci_pct": rows["floor"].ci_pct}
    return result


def fmt_pct(x: float) -> str:
    return f"{x:+.1f}%"


def fmt_range(r) -> str:
    return f"[{r[0]:+.1f}, {r[1]:+.1f}]"


def fmt_mem(mem: dict | None, base: dict | None, key: str = "rss_mib") -> str:
    if not mem or not base:
        return "-"
    if "error" in mem:
        return "error"
    return f"{mem[key] - base[key]:+.0f}"


def print_workload(res: dict, mem: dict) -> None:
    print(f"\n== {res['workload']}: {res['description']}")
    print(f"   {res['rounds']} rounds x {res['block']}-step blocks: {res['rows']['baseline']['n_blocks']} "
          f"baseline blocks, {res['rounds']} blocks of each other row ({res['elapsed_s']:.0f} s)")
    share = res["others_cpu_share"]
    if share is not None:
        print(f"   other processes used {share:.0%} of the CPUs while this was timed"
              + ("  -- WARNING: busy machine, expect wide CIs" if share > BUSY_SHARE else ""))
    cuda = any("cuda_mib" in m for m in mem.values() if m)
    head = (f"   {'config':<16}{'ms/step':>9}{'overhead':>10}{'IQR %':>16}{'95% CI %':>16}"
            f"{'amortized [95% CI]':>27}{'+RSS MiB':>10}" + ("  +CUDA MiB" if cuda else ""))
    print(head)
    print("   " + "-" * (len(head) - 3))
    base_mem = mem.get("baseline")
    for name, s in res["rows"].items():
        label = "baseline (A/A)" if name == "baseline" else name
        line = (f"   {label:<16}{s['ms_per_step']:>9.2f}{fmt_pct(s['median_pct']):>10}"
                f"{fmt_range(s['iqr_pct']):>16}{fmt_range(s['ci_pct']):>16}"
                f"{fmt_pct(s['amortized_pct']) + ' ' + fmt_range(s['amortized_ci_pct']):>27}"
                f"{fmt_mem(mem.get(name), base_mem):>10}")
        if cuda:
            line += f"{fmt_mem(mem.get(name), base_mem, 'cuda_mib'):>11}"
        print(line)
    g = res.get("grads_vs_floor")
    if g:
        print(f"   gradwatch-grads extra cost / floor extra cost = {g['ratio']:.2f}x "
              f"(bootstrap 95% CI {g['ci'][0]:.2f}..{g['ci'][1]:.2f}; target <= {TARGET_GRADS_VS_FLOOR}x)")
        if g["floor_ci_pct"][0] <= 0:
            print(f"   note: the floor's extra cost is within noise (CI {fmt_range(g['floor_ci_pct'])} %), "
                  "so this ratio means nothing here; judge gradwatch-grads by its CI against the A/A row")
        elif g["ci"][1] <= TARGET_GRADS_VS_FLOOR:
            print("   -> meets the target")
        elif g["ci"][0] > TARGET_GRADS_VS_FLOOR:
            print("   -> misses the target")
        else:
            print(f"   -> inconclusive: the CI spans {TARGET_GRADS_VS_FLOOR}x; more --rounds narrow it")


def markdown(results: list[dict], memory: dict, info: dict) -> str:
    lines = [f"Overhead per training step, {info['device']}, torch {info['torch']}, "
             f"{info['torch_threads']} threads ({info['cpu_count']} CPUs). Median of paired block "
             "ratios vs. the plain step [bootstrap 95% CI]; amortized = total time ratio; "
             "memory = extra peak RSS of a separate process.", "",
             "| workload | config | ms/step | overhead [95% CI] | amortized | extra RSS MiB |",
             "|---|---|---:|---:|---:|---:|"]
    for res in results:
        mem = memory.get(res["workload"], {})
        for name, s in res["rows"].items():
            over = "(A/A) " if name == "baseline" else ""
            lines.append(f"| {res['workload']} | {name} | {s['ms_per_step']:.2f} | {over}"
                         f"{fmt_pct(s['median_pct'])} {fmt_range(s['ci_pct'])} | "
                         f"{fmt_pct(s['amortized_pct'])} | {fmt_mem(mem.get(name), mem.get('baseline'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args)
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
        print_workload(res, memory[res["workload"]])

    md = markdown(results, memory, info)
    print("\n" + md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.json:
        payload = {"machine": info, "args": vars(args),
                   "configs": {c.name: c.note for c in classes}, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
