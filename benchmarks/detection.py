"""Detection benchmark: train every labelled scenario, diagnose it, and score the findings against the label.

    python benchmarks/detection.py                   # every scenario, ~40 s on 2 CPU cores
    python benchmarks/detection.py --only dead_relu  # one scenario
    python benchmarks/detection.py --json results/detection.json

A faulty scenario is a hit when every expected kind is reported at warning or critical, a miss otherwise;
a healthy one is ok with no warning or critical finding, a false alarm otherwise. Totals: recall (faulty
scenarios with every expected kind found), false alarms (healthy runs with any warning+), localization
(expectations that name a layer, reported on that layer) and the median detection delay (first finding's
step minus the onset the scenario states). Training time includes gradwatch's own recording.

Live alerts: every scenario trains with the live detectors on (`detect_every=--live-every` seconds) and an
`on_finding` callback that notes when each finding reached the training loop. The live delay is the step
the loop was at when the expected kind's alert arrived, minus the onset, and the seconds since the onset
step; an alert that only came from the final pass in `close()` is marked "at close". The scenarios train in
under a second, faster than any real job, so `--pace` adds a sleep after each step (20 ms by default) to
give the live detectors a run that lasts a few seconds, as a real one would.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import gradwatch
from gradwatch.scenarios import SCENARIOS, Scenario, run_scenario
from gradwatch.watcher import Watcher


def judge(scenario: Scenario, findings: list) -> dict:
    """Score one run's warning+ findings against the scenario's label."""
    expectations = []
    for e in scenario.expect:
        hits = [f for f in findings if f.kind == e.kind]
        right = [f for f in hits if f.layer == e.layer] if e.layer is not None else hits
        first = min((f.step for f in (right or hits)), default=None)
        expectations.append({
            "kind": e.kind, "layer": e.layer, "onset": e.onset, "found": bool(hits),
            "layer_right": None if e.layer is None or not hits else bool(right),
            "delay": None if first is None else first - e.onset,
        })
    if scenario.healthy:
        verdict = "false alarm" if findings else "ok"
    else:
        verdict = "hit" if all(x["found"] for x in expectations) else "miss"
    return {"verdict": verdict, "expect": expectations}


def live_delays(scenario: Scenario, run_dir: Path, alerts: list[tuple]) -> list[dict]:
    """For each expectation: when its first live alert reached the loop, in steps and seconds from onset."""
    steps = gradwatch.load_run(run_dir).steps
    out = []
    for e in scenario.expect:
        times = [t for f, t in alerts if f.kind == e.kind and f.severity != "info"]
        if not times or steps.empty:
            out.append({"kind": e.kind, "steps": None, "seconds": None, "at_close": None})
            continue
        onset_time = float(steps.loc[steps["step"] >= e.onset, "time"].iloc[0])
        before = steps.loc[steps["time"] <= times[0], "step"]
        at_step = int(before.iloc[-1]) if len(before) else int(steps["step"].iloc[0])
        out.append({"kind": e.kind, "steps": at_step - e.onset, "seconds": round(times[0] - onset_time, 2),
                    "at_close": times[0] > float(steps["time"].iloc[-1]) and at_step == int(steps["step"].iloc[-1])})
    return out


class Paced:
    """Sleep `seconds` after every `Watcher.step()`: a training step as slow as a real one."""

    def __init__(self, seconds: float):
        self.seconds, self._step = seconds, Watcher.step

    def __enter__(self):
        step, seconds = self._step, self.seconds

        def paced(watcher, loss=None):
            step(watcher, loss)
            time.sleep(seconds)

        Watcher.step = paced

    def __exit__(self, *exc):
        Watcher.step = self._step


def run_one(name: str, root: Path, seed: int, live_every: float) -> dict:
    scenario = SCENARIOS[name]
    run_dir = root / name
    alerts: list[tuple] = []
    t0 = time.perf_counter()
    raw = run_scenario(name, run_dir, seed=seed, detect_every=live_every,
                       on_finding=lambda f: alerts.append((f, time.time())))
    t1 = time.perf_counter()
    try:
        findings = gradwatch.diagnose(run_dir).at_least("warning")
        error = None
    except Exception as e:  # noqa: BLE001 - a broken detector is a result to report, not a crash
        findings, error = [], f"{type(e).__name__}: {e}"
    t2 = time.perf_counter()
    result = {"scenario": name, "model": scenario.model, "healthy": scenario.healthy,
              "description": scenario.description, "steps": scenario.steps,
              "train_s": round(t1 - t0, 3), "diagnose_s": round(t2 - t1, 3), "error": error,
              "findings": [f.to_dict() for f in findings],
              "evidence": {k: v for k, v in raw.items() if isinstance(v, (int, float, str, bool))}}
    result.update(judge(scenario, findings))
    result["live"] = live_delays(scenario, run_dir, alerts)
    if error:
        result["verdict"] = "error"
    return result


def totals(results: list[dict]) -> dict:
    faulty = [r for r in results if not r["healthy"]]
    healthy = [r for r in results if r["healthy"]]
    located = [x for r in faulty for x in r["expect"] if x["layer"] is not None]
    delays = [x["delay"] for r in faulty for x in r["expect"] if x["delay"] is not None]
    live = [x for r in faulty for x in r["live"] if x["steps"] is not None]
    during = [x for x in live if not x["at_close"]]
    return {
        "recall": (sum(r["verdict"] == "hit" for r in faulty), len(faulty)),
        "false_alarms": (sum(r["verdict"] == "false alarm" for r in healthy), len(healthy)),
        "localization": (sum(bool(x["layer_right"]) for x in located), len(located)),
        "median_delay": statistics.median(delays) if delays else None,
        "live_alerts": (len(live), sum(len(r["expect"]) for r in faulty)),
        "live_during_training": len(during),
        "median_live_delay_steps": statistics.median(x["steps"] for x in during) if during else None,
        "median_live_delay_s": statistics.median(x["seconds"] for x in during) if during else None,
        "train_s": round(sum(r["train_s"] for r in results), 2),
        "diagnose_s": round(sum(r["diagnose_s"] for r in results), 2),
    }


def _where(kind: str, layer: str | None) -> str:
    return f"{kind}@{layer}" if layer else kind


def markdown(results: list[dict], tot: dict) -> str:
    lines = ["| scenario | model | expected | found (warning+) | verdict | layer right? | delay | live alert "
             "| train s | diagnose s |", "|---|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        expected = ", ".join(_where(x["kind"], x["layer"]) for x in r["expect"]) or "(none)"
        found = ", ".join(f"{_where(f['kind'], f['layer'])} s{f['step']}" for f in r["findings"]) or "-"
        if r["error"]:
            found = f"error: {r['error']}"
        layer = ", ".join({True: "yes", False: "no"}[x["layer_right"]] for x in r["expect"]
                          if x["layer_right"] is not None) or "-"
        delay = ", ".join(str(x["delay"]) for x in r["expect"] if x["delay"] is not None) or "-"
        live = ", ".join("at close" if x["at_close"] else f"+{x['steps']} steps, {x['seconds']:.1f} s"
                         for x in r["live"] if x["steps"] is not None) or "-"
        lines.append(f"| {r['scenario']} | {r['model']} | {expected} | {found} | {r['verdict']} | {layer} | "
                     f"{delay} | {live} | {r['train_s']:.2f} | {r['diagnose_s']:.2f} |")

    def ratio(pair):
        return f"{pair[0]}/{pair[1]}" + (f" ({pair[0] / pair[1]:.0%})" if pair[1] else "")

    lines += ["", f"- recall: {ratio(tot['recall'])} faulty scenarios with every expected kind found",
              f"- false alarms: {ratio(tot['false_alarms'])} healthy runs with a warning or critical finding",
              f"- localization: {ratio(tot['localization'])} layer-level expectations on the right layer",
              f"- median detection delay: {tot['median_delay']} steps",
              f"- live alerts: {ratio(tot['live_alerts'])} expected kinds alerted live, "
              f"{tot['live_during_training']} of them while training (the rest at close()); median "
              f"{tot['median_live_delay_steps']} steps, {tot['median_live_delay_s']} s after onset",
              f"- time: {tot['train_s']:.1f} s training, {tot['diagnose_s']:.1f} s diagnosing"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="NAME", help=f"run one scenario: {', '.join(SCENARIOS)}")
    parser.add_argument("--json", metavar="PATH", help="write the raw results here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--live-every", type=float, default=0.5, metavar="S",
                        help="detect_every for the live detectors during training (default 0.5 s)")
    parser.add_argument("--pace", type=float, default=0.02, metavar="S",
                        help="sleep after each training step, for the live alerts (default 0.02 s)")
    args = parser.parse_args()
    if args.only is not None and args.only not in SCENARIOS:
        parser.error(f"--only must be one of {', '.join(SCENARIOS)}; got {args.only!r}")
    names = [args.only] if args.only else list(SCENARIOS)
    # the live monitor logs each finding as training runs; the table below says it all once
    logging.getLogger("gradwatch").addHandler(logging.NullHandler())
    logging.getLogger("gradwatch").propagate = False

    results = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-detection-") as tmp:
        run_scenario("healthy_early", Path(tmp) / "warmup")  # untimed: imports and first-call setup
        for name in names:
            with Paced(args.pace):
                results.append(run_one(name, Path(tmp), args.seed, args.live_every))
            r = results[-1]
            print(f"{name}: {r['verdict']} (train {r['train_s']:.2f} s, diagnose {r['diagnose_s']:.2f} s)",
                  file=sys.stderr)
    tot = totals(results)
    print(f"Detection benchmark, torch {torch.__version__} (scenarios train on 1 thread), {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, seed {args.seed}, live detect_every={args.live_every} s, "
          f"{args.pace * 1000:.0f} ms sleep per step\n")
    print(markdown(results, tot))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"totals": tot, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
