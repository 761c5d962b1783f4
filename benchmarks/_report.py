"""What the time-overhead benchmarks share: their common options, machine info, and the tables they print.

`overhead.py`, `ddp_overhead.py` and `lightning_overhead.py` each time their rows with `_harness` and
hand the per-workload result dicts (`workload_result`) to `print_time_table` and `markdown`; what
differs between them (labels, captions, overhead.py's memory columns) comes in as arguments.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from _harness import Timings, summarize, summarize_baseline

# Share of the CPUs other processes may take while a workload is timed before the table warns.
BUSY_SHARE = 0.1

# An extra column's cell: (workload result, row name) -> its text.
Cell = Callable[[dict, str], str]


def add_common_args(p: argparse.ArgumentParser, *, rounds: int, block_target_s: float, workloads: Sequence[str],
                    quick_help: str, per: str = "configuration", baseline: str = "baseline",
                    seed_help: str = "seeds the block order and the bootstrap") -> None:
    """Add the options every time-overhead benchmark takes.

    Args:
        p: The script's parser; its own options go after these.
        rounds: Default of --rounds.
        block_target_s: How long a baseline block lasts when --block is 0 (for the help text).
        workloads: The choices of --workloads, and its default.
        quick_help: Help text of --quick: what the smoke run does.
        per: What each --warmup runs untimed ("configuration", "row", "trainer").
        baseline: What the baseline row is called in the --block help.
        seed_help: Help text of --seed.
    """
    p.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds per workload (default {rounds})")
    p.add_argument("--block", type=int, default=0,
                   help=f"steps per timed block; 0 (default) picks per workload the fewest steps (>= 2) "
                        f"that make a {baseline} block last {block_target_s * 1e3:.0f} ms")
    p.add_argument("--warmup", type=int, default=10, help=f"untimed steps per {per} first")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--workloads", nargs="+", choices=list(workloads), default=list(workloads))
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--json", metavar="PATH", help="also write machine-readable results here")
    p.add_argument("--markdown", metavar="PATH", help="also write the summary Markdown table here")


def parse_checked(p: argparse.ArgumentParser, argv: list[str] | None, quick: Mapping[str, int]) -> argparse.Namespace:
    """Parse `argv`, check --rounds, and with --quick overwrite the options named in `quick`.

    Args:
        p: A parser that `add_common_args` has filled.
        argv: The arguments, or None for `sys.argv[1:]`.
        quick: Option (dest) -> value for a smoke run, e.g. ``{"rounds": 3, "block": 2}``.
    """
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (the A/A check needs two baseline blocks)")
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    return args


def machine_info(versions: Mapping[str, str] | None = None, **extra) -> dict:
    """Date, platform, Python and torch versions, CPU counts, then `extra` in its order.

    Args:
        versions: Other libraries' versions, listed right after torch's.
        **extra: The script's own entries (threads, device, world size...).
    """
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, **(versions or {}),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            **extra}


def workload_result(wname: str, description: str, block: int, rounds: int, others_share: float | None,
                    timings: Timings, rng: np.random.Generator) -> dict:
    """Summarize one workload's timings into the dict the tables read and the JSON output holds."""
    rows = {"baseline": summarize_baseline(timings.base_blocks, block, rng)}
    for name in timings.blocks:
        rows[name] = summarize(timings.blocks[name], timings.paired_base[name], block, rng)
    return {"workload": wname, "description": description, "block": block, "rounds": rounds,
            "others_cpu_share": others_share, "rows": {n: vars(s) for n, s in rows.items()},
            "raw": {"blocks": timings.blocks, "paired_base": timings.paired_base,
                    "base_blocks": timings.base_blocks}}


def fmt_pct(x: float) -> str:
    return f"{x:+.1f}%"


def fmt_range(r) -> str:
    return f"[{r[0]:+.1f}, {r[1]:+.1f}]"


def print_time_table(res: dict, *, label_width: int = 16, baseline_label: str = "baseline (A/A)",
                     baseline_blocks: str = "baseline", others: str = "other processes",
                     columns: Sequence[tuple[str, int, Cell]] = ()) -> None:
    """Print one workload's heading, its CPU-load line and its time table.

    Args:
        res: A `workload_result` dict with "elapsed_s" added.
        label_width: Width of the config column.
        baseline_label: The baseline row's label.
        baseline_blocks: What the baseline's blocks are called in the heading.
        others: Who else used the CPUs, in the load line.
        columns: Extra columns after the time ones: (header, width, cell).
    """
    print(f"\n== {res['workload']}: {res['description']}")
    print(f"   {res['rounds']} rounds x {res['block']}-step blocks: {res['rows']['baseline']['n_blocks']} "
          f"{baseline_blocks} blocks, {res['rounds']} blocks of each other row ({res['elapsed_s']:.0f} s)")
    share = res["others_cpu_share"]
    if share is not None:
        print(f"   {others} used {share:.0%} of the CPUs while this was timed"
              + ("  -- WARNING: busy machine, expect wide CIs" if share > BUSY_SHARE else ""))
    head = (f"   {'config':<{label_width}}{'ms/step':>9}{'overhead':>10}{'IQR %':>16}{'95% CI %':>16}"
            f"{'amortized [95% CI]':>27}" + "".join(f"{h:>{w}}" for h, w, _ in columns))
    print(head)
    print("   " + "-" * (len(head) - 3))
    for name, s in res["rows"].items():
        label = baseline_label if name == "baseline" else name
        print(f"   {label:<{label_width}}{s['ms_per_step']:>9.2f}{fmt_pct(s['median_pct']):>10}"
              f"{fmt_range(s['iqr_pct']):>16}{fmt_range(s['ci_pct']):>16}"
              f"{fmt_pct(s['amortized_pct']) + ' ' + fmt_range(s['amortized_ci_pct']):>27}"
              + "".join(f"{cell(res, name):>{w}}" for _, w, cell in columns))


def markdown(caption: str, results: list[dict], *, row_label: Callable[[str], str] | None = None,
             amortized_ci: bool = True, columns: Sequence[tuple[str, Cell]] = ()) -> str:
    """The summary Markdown: `caption`, then one table row per (workload, row).

    Args:
        caption: The paragraph above the table.
        results: `workload_result` dicts.
        row_label: Row name -> its label in the config column; the name itself if None.
        amortized_ci: Whether the amortized column carries its CI.
        columns: Extra columns after the amortized one: (header, cell).
    """
    head = ["workload", "config", "ms/step", "overhead [95% CI]",
            "amortized [95% CI]" if amortized_ci else "amortized", *(h for h, _ in columns)]
    lines = [caption, "", "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for res in results:
        for name, s in res["rows"].items():
            over = "(A/A) " if name == "baseline" else ""
            amortized = fmt_pct(s["amortized_pct"])
            if amortized_ci:
                amortized += " " + fmt_range(s["amortized_ci_pct"])
            cells = [res["workload"], row_label(name) if row_label else name, f"{s['ms_per_step']:.2f}",
                     f"{over}{fmt_pct(s['median_pct'])} {fmt_range(s['ci_pct'])}", amortized,
                     *(cell(res, name) for _, cell in columns)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(args: argparse.Namespace, md: str, payload: dict) -> None:
    """Print the Markdown summary, and write it and the JSON `payload` where --markdown and --json say."""
    print("\n" + md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))
