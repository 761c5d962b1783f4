"""Dashboard load benchmark: how long the run page takes to read a long run, cold and on a live refresh.

    python benchmarks/dashboard_load.py                      # 100k steps x 100 layers, ~1 min
    python benchmarks/dashboard_load.py --steps 20000 --layers 50 --json results/dashboard_load.json

It writes a synthetic run in the real store format (`create_store` + `Writer`): the loss, two lr groups and
the global grad norm every step; per-layer grad_norm and nonfinite every step; weight_norm, update_ratio,
grad_maxabs and the activation sites' zero/saturation fractions every 10th step; dead_fraction every 25th;
a few NaN/Inf steps, a loss spike, 2 events and a findings snapshot. Then it times:

  cold     a fresh process: RunView(...) + refresh() + every query the run page makes (the loss, grad norm
           and lr series, the grad-norm heatmap, update_ratio / dead_fraction / saturation_fraction and
           grad_norm for 5 layers, events, findings, markers). Import time is not counted.
  refresh  200 more steps (every metric) appended from another connection, then refresh() + the same queries
           on the view that is already open.

Targets: cold < 3 s, refresh < 0.5 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gradwatch.query import RunView  # noqa: E402
from gradwatch.store.schema import DB_NAME, GRAD_NONFINITE, LOSS_NONFINITE, PRAGMAS_WRITER  # noqa: E402
from gradwatch.store.writer import Rows, Writer, create_store  # noqa: E402

REPEATS = 5
SITES = 20
CHUNK = 2000  # steps per queued batch while writing the run
LIVE_STEPS = 200
TARGETS = {"cold": 3.0, "refresh": 0.5}
BAD_FLAGS = LOSS_NONFINITE | GRAD_NONFINITE


# ---- the synthetic run ---------------------------------------------------------------------------------
def _rows(start: int, stop: int, layers: int, rng: np.random.Generator, t0: float) -> Rows:
    """Steps start..stop-1 with every metric on its usual schedule."""
    steps = np.arange(start, stop)
    loss = 3.0 * np.exp(-steps / 30000) + 0.05 * rng.standard_normal(len(steps)) + 0.2
    loss[steps == 50_000] *= 10  # a spike
    lr = 3e-4 * np.minimum(1.0, (steps + 1) / 2000)
    grads = (np.exp(rng.standard_normal((len(steps), layers))) * np.logspace(-3, 0, layers)).astype(np.float32)
    out = Rows()
    for i, s in enumerate(steps):
        s = int(s)
        bad = s % 20_000 == 777  # a NaN loss and an Inf gradient in layer 3, now and then
        g = grads[i]
        if bad:
            g[3] = np.inf
        out.steps.append((s, t0 + 0.1 * s, None if bad else float(loss[i]),
                          float("inf") if bad else float(np.sqrt((g.astype(np.float64) ** 2).sum())),
                          json.dumps([float(lr[i]), float(lr[i]) * 0.1]), 0, None, BAD_FLAGS if bad else 0))
        out.values.append(("grad_norm", s, g.astype("<f4").tobytes()))
        out.values.append(("nonfinite", s, np.isinf(g).astype("<f4").tobytes()))
        if s % 10 == 0:
            for metric, scale in (("weight_norm", 10.0), ("update_ratio", 1e-3), ("grad_maxabs", 0.1)):
                v = (scale * np.exp(0.3 * rng.standard_normal(layers))).astype("<f4")
                out.values.append((metric, s, v.tobytes()))
            for metric in ("zero_fraction", "saturation_fraction"):
                out.values.append((metric, s, rng.uniform(0, 0.6, SITES).astype("<f4").tobytes()))
        if s % 25 == 0:
            out.values.append(("dead_fraction", s, rng.uniform(0, 0.3, SITES).astype("<f4").tobytes()))
        if bad:
            out.events.append((s, "nan", "backward", f"layers.{3}", None, None, "synthetic"))
    out.meta["updated_at"] = t0 + 0.1 * stop
    return out


def write_run(run_dir: Path, steps: int, layers: int) -> None:
    run_dir.mkdir(parents=True)
    t0 = time.time() - 0.1 * steps
    names = [f"layers.{i}" for i in range(layers)]
    meta = {"name": run_dir.name, "status": "running", "start_time": t0, "pid": None, "host": "benchmark",
            "gradwatch_version": "0.1.0", "model": {"class": "SyntheticNet", "parameters": 1000 * layers,
                                                    "layers": [{"name": n, "type": "Linear"} for n in names]},
            "config": {"every": 1, "detail_every": 10, "detect_every": 5.0}}
    writer = Writer(create_store(run_dir, meta))
    writer.put(Rows(series=[("layer", i, n, "Linear", 1000) for i, n in enumerate(names)]
                    + [("activation", i, f"act.{i}", "ReLU", None) for i in range(SITES)]))
    rng = np.random.default_rng(0)
    for start in range(0, steps, CHUNK):
        writer.put(_rows(start, min(start + CHUNK, steps), layers, rng, t0))
        writer.wait()
    spike = min(50_000, steps - 1)
    writer.put_findings([
        ("loss_spike", "", spike, "warning", f"The loss jumped 10x at step {spike}.", "Lower the lr.", "{}", t0),
        ("exploding_gradients", "layers.3", 777, "critical", "Inf gradient in layers.3.", "Clip.", "{}", t0),
    ])
    writer.close()


def append_steps(run_dir: Path, n: int, layers: int, rng: np.random.Generator) -> None:
    """What a live run's next flushes write, from another connection (as the training process would)."""
    conn = sqlite3.connect(run_dir / DB_NAME, check_same_thread=False, isolation_level=None)
    for pragma in PRAGMAS_WRITER:
        conn.execute(pragma)
    last = conn.execute("SELECT MAX(step), MIN(time) FROM steps").fetchone()
    writer = Writer(conn)
    writer.put(_rows(last[0] + 1, last[0] + 1 + n, layers, rng, last[1]))
    writer.close()


# ---- what the run page reads -----------------------------------------------------------------------------
def page(view: RunView) -> int:
    """Every query of the run page; returns the rows fetched, so that nothing is optimised away."""
    rows = sum(len(view.series_binned(c)) for c in ("loss", "grad_norm", "lr", "lr_1"))
    rows += len(view.heatmap("grad_norm"))
    chosen = view.layers("grad_norm")[:: max(1, len(view.layers("grad_norm")) // 5)][:5]
    for metric in ("update_ratio", "dead_fraction", "saturation_fraction"):
        rows += len(view.metric_binned(metric))
    rows += len(view.metric_binned("grad_norm", chosen))
    return rows + len(view.events()) + len(view.findings()) + len(view.markers()) + len(view.steps())


def cold_once(run_dir: str) -> None:
    t = time.perf_counter()
    view = RunView(run_dir)
    view.refresh()
    rows = page(view)
    print(json.dumps({"seconds": time.perf_counter() - t, "rows": rows}))


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--cold-once", help=argparse.SUPPRESS)  # internal: one cold load in this process
    args = ap.parse_args()
    if args.cold_once:
        return cold_once(args.cold_once)
    with tempfile.TemporaryDirectory(prefix="gw-dashboard-") as tmp:
        run_dir = Path(tmp) / "run"
        t = time.perf_counter()
        write_run(run_dir, args.steps, args.layers)
        write_s = time.perf_counter() - t
        size = sum(f.stat().st_size for f in run_dir.iterdir())
        print(f"wrote {args.steps} steps x {args.layers} layers + {SITES} sites in {write_s:.1f} s; "
              f"store {size / 1e6:.0f} MB")
        cold = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--cold-once", str(run_dir)], capture_output=True,
                                 text=True, check=True)
            cold.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
        view = RunView(run_dir)
        page(view)
        rng = np.random.default_rng(1)
        live = []
        for _ in range(args.repeats):
            append_steps(run_dir, LIVE_STEPS, args.layers, rng)
            t = time.perf_counter()
            assert view.refresh(), "refresh() saw nothing new after an append"
            page(view)
            live.append(time.perf_counter() - t)
        t = time.perf_counter()
        unchanged = view.refresh()
        idle = time.perf_counter() - t
    result = {"steps": args.steps, "layers": args.layers, "sites": SITES, "db_mb": round(size / 1e6, 1),
              "write_s": round(write_s, 2), "cold_s": _stats(cold), "refresh_s": _stats(live),
              "idle_refresh_s": idle, "idle_refresh_changed": unchanged, "targets_s": TARGETS,
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for name, key in (("cold", "cold_s"), ("refresh", "refresh_s")):
        s = result[key]
        ok = "ok" if s["median"] < TARGETS[name] else "MISSED"
        print(f"{name:8s} median {s['median']:.3f} s  (min {s['min']:.3f}, max {s['max']:.3f}, "
              f"n={len(s['all'])})  target < {TARGETS[name]} s: {ok}")
    print(f"refresh with nothing new: {idle * 1000:.1f} ms (changed={unchanged})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
