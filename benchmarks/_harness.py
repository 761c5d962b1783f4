"""Interleaved block timing and paired-ratio statistics.

Why interleaved short blocks: on a shared machine the speed drifts by ~10% over seconds, which
swamps a few-percent overhead if configurations are timed one after another. Each round runs
one pair of blocks per configuration X, (baseline, X) or (X, baseline) at random, with the pairs
in a fresh random order, and takes the ratio X / baseline within the pair. Drift that is slow
compared with a block cancels in that ratio (and its sign flips with the pair's order); the
median over rounds discards the pairs that a neighbouring process happened to hit. A single
neighbour, rather than the mean of the two around X, keeps numerator and denominator alike, so
spikes do not bias the median downward.

The median of block ratios ignores rare expensive steps (a tool that does its work every 100
steps touches one block in 20), so the amortized ratio, sum(X) / sum(paired baseline), is
reported next to it.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _configs import Config
from _workloads import Workload

N_BOOT = 2000


@dataclasses.dataclass
class Session:
    """One configuration's own model copy, optimizer and position in the batch cycle."""

    config: Config
    workload: Workload
    cursor: int = 0

    def steps(self, n: int) -> None:
        batches = self.workload.batches
        for _ in range(n):
            self.config.train_step(batches[self.cursor % len(batches)], self.workload.loss_fn)
            self.cursor += 1


def make_session(workload: Workload, config_cls: type[Config], run_dir: Path) -> Session:
    # Deepcopy before any tool attaches, so every row starts from identical weights and no tool's
    # hooks leak into another row's model.
    model = copy.deepcopy(workload.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=workload.lr)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config_cls()
    config.attach(model, optimizer, run_dir)
    return Session(config, workload)


def device_sync(device: torch.device) -> Callable[[], None]:
    """The benchmark's own barrier: without it CUDA block times would measure kernel launches."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_block(session: Session, n: int, sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    session.steps(n)
    session.config.end_block()
    sync()
    return time.perf_counter() - t0


def warm_up_and_size_block(sessions: dict[str, Session], warmup: int, block: int, target_s: float,
                           sync: Callable[[], None]) -> int:
    """Run `warmup` untimed steps per session; return `block`, or if 0 the fewest steps (>= 2) that
    make a baseline block last `target_s`."""
    for s in sessions.values():
        s.steps(warmup)
        s.config.end_block()
    if block:
        return block
    per_step = time_block(sessions["baseline"], 3, sync) / 3
    return max(2, math.ceil(target_s / per_step))


@dataclasses.dataclass
class Timings:
    """Raw block times. `paired_base[name][r]` is the baseline block paired with `blocks[name][r]`;
    `base_blocks` holds every baseline block in run order."""

    blocks: dict[str, list[float]]
    paired_base: dict[str, list[float]]
    base_blocks: list[float]


def run_interleaved(sessions: dict[str, Session], rounds: int, block: int,
                    sync: Callable[[], None], rng: np.random.Generator, label: str) -> Timings:
    base = sessions["baseline"]
    others = [name for name in sessions if name != "baseline"]
    timings = Timings({n: [] for n in others}, {n: [] for n in others}, [])
    # After freeze() a full collection only walks new objects (~0.1 ms), so it can run before
    # every block: each block starts with empty GC generations instead of paying for a
    # collection that another row's garbage triggered.
    gc.collect()
    gc.freeze()

    def timed(session: Session) -> float:
        gc.collect()
        return time_block(session, block, sync)

    for r in range(rounds):
        for i in rng.permutation(len(others)):
            name = others[i]
            if rng.random() < 0.5:
                b, t = timed(base), timed(sessions[name])
            else:
                t, b = timed(sessions[name]), timed(base)
            timings.blocks[name].append(t)
            timings.paired_base[name].append(b)
            timings.base_blocks.append(b)
        print(f"\r  {label}: round {r + 1}/{rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    gc.unfreeze()
    return timings


@dataclasses.dataclass
class Summary:
    ms_per_step: float
    n_blocks: int
    median_pct: float  # overhead: median paired ratio - 1, in %
    iqr_pct: tuple[float, float]
    ci_pct: tuple[float, float]  # bootstrap 95% CI of the median
    amortized_pct: float  # sum(config) / sum(paired baseline) - 1, in %
    amortized_ci_pct: tuple[float, float]


def _pct(x) -> float | tuple[float, float]:
    return tuple(float(v) for v in (np.asarray(x) - 1) * 100) if np.ndim(x) else float((x - 1) * 100)


def summarize(blocks: list[float], paired: list[float], block: int, rng: np.random.Generator) -> Summary:
    c, b = np.asarray(blocks), np.asarray(paired)
    ratios = c / b
    idx = rng.integers(0, len(ratios), size=(N_BOOT, len(ratios)))
    boot_median = np.median(ratios[idx], axis=1)
    boot_amortized = c[idx].sum(axis=1) / b[idx].sum(axis=1)
    return Summary(
        ms_per_step=float(np.median(c)) / block * 1e3,
        n_blocks=len(c),
        median_pct=_pct(np.median(ratios)),
        iqr_pct=_pct(np.percentile(ratios, [25, 75])),
        ci_pct=_pct(np.percentile(boot_median, [2.5, 97.5])),
        amortized_pct=_pct(c.sum() / b.sum()),
        amortized_ci_pct=_pct(np.percentile(boot_amortized, [2.5, 97.5])),
    )


def summarize_baseline(base_blocks: list[float], block: int, rng: np.random.Generator) -> Summary:
    """A/A check: each baseline block against the previous one (one to three blocks earlier).
    Its spread is the resolution this run can claim; its median should be ~0%."""
    s = summarize(base_blocks[1:], base_blocks[:-1], block, rng)
    b = np.asarray(base_blocks)
    s.ms_per_step = float(np.median(b)) / block * 1e3
    s.n_blocks = len(base_blocks)
    return s


def extra_cost_ratio(timings: Timings, name: str, ref: str,
                     rng: np.random.Generator) -> tuple[float, tuple[float, float]]:
    """(median ratio of `name` - 1) / (median ratio of `ref` - 1), with a bootstrap CI that
    resamples whole rounds so the two rows stay paired."""
    a = np.asarray(timings.blocks[name]) / np.asarray(timings.paired_base[name])
    f = np.asarray(timings.blocks[ref]) / np.asarray(timings.paired_base[ref])
    idx = rng.integers(0, len(a), size=(N_BOOT, len(a)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = (np.median(a[idx], axis=1) - 1) / (np.median(f[idx], axis=1) - 1)
        point = (np.median(a) - 1) / (np.median(f) - 1)
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    return float(point), (float(lo), float(hi))


def feature_cost(timings: Timings, full: str, without: str,
                 rng: np.random.Generator) -> tuple[float, tuple[float, float]]:
    """What the feature that `without` turns off costs, in % of the plain step: the median over rounds of
    (full block - without block) / the full row's paired baseline block, with a bootstrap CI over rounds.
    Both rows run once in every round, so each difference compares two blocks of the same round, which
    load drift on a shared machine touches alike, rather than two medians over the whole run."""
    a, b = np.asarray(timings.blocks[full]), np.asarray(timings.blocks[without])
    d = (a - b) / np.asarray(timings.paired_base[full])
    idx = rng.integers(0, len(d), size=(N_BOOT, len(d)))
    lo, hi = np.percentile(np.median(d[idx], axis=1), [2.5, 97.5])
    return _pct(1 + np.median(d)), (_pct(1 + lo), _pct(1 + hi))


class CompetingLoad:
    """Share of all CPUs that other processes (and hypervisor steal) use from creation to
    `share()`; None where /proc/stat is missing (not Linux)."""

    def __init__(self) -> None:
        self.wall0, self.own0, self.busy0 = time.perf_counter(), self._own(), self._busy()

    @staticmethod
    def _own() -> float:
        return sum(os.times()[:2])

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        except (OSError, ValueError):
            return None
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def share(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        others = busy - self.busy0 - (self._own() - self.own0)
        return max(0.0, others / ((time.perf_counter() - self.wall0) * (os.cpu_count() or 1)))
