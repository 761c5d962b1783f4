"""Saturated tanh/sigmoid: most inputs sit deep in the flat tails, where the derivative is near 0.

Rule: the recorded saturation fraction (tanh inputs beyond +-2.5, sigmoid inputs beyond +-5: both where
the derivative is 2.7% of its peak) above WARN on PERSIST consecutive records, or on every record of a
short run (the literature's "more than half beyond about +-5"; Glorot & Bengio 2010, Rakitianskaia &
Engelbrecht 2015). Critical from CRITICAL. An output activation (no layer registered after it, e.g. the
nn.Sigmoid before nn.BCELoss) is left alone: a confident classifier saturates it on purpose.
"""
from __future__ import annotations

from . import Finding, Frames, detector
from ._common import base_name, layer_after, layer_before, lr_at, module_types, nice, num, pct, persistent_run, sentence

WARN = 0.5
CRITICAL = 0.9
PERSIST = 3


@detector
def detect(frames: Frames) -> list[Finding]:
    sat = frames.metric("saturation_fraction")
    findings = []
    for site in sat.columns:
        module = base_name(site)
        series = sat[site].dropna()
        if series.empty or layer_after(frames, module) is None:
            continue
        run = persistent_run(series, WARN, PERSIST)
        if run is not None:
            findings.append(_finding(frames, site, series, run))
    return findings


def _finding(frames: Frames, site: str, series, run: tuple[int, int]) -> Finding:
    a, b = run
    module = base_name(site)
    kind = module_types(frames).get(module, "Tanh")
    threshold = "+-5" if kind == "Sigmoid" else "+-2.5"
    seg = series.iloc[a: b + 1]
    step = int(series.index[a])
    peak = float(seg.max())
    grew = a > 0 and float(series.iloc[0]) <= WARN
    message = (f"{pct(float(seg.median()))} of {site}'s inputs lie beyond {threshold}, where the {kind} is flat "
               f"(median of {b - a + 1} records from step {step}, up to {pct(peak)}): its gradient is nearly "
               "zero there, so the layers before it learn slowly.")
    before = layer_before(frames, module)
    fixes = [f"normalize the pre-activations with `nn.LayerNorm` or `nn.BatchNorm1d` before {site}"]
    if before:
        fixes.append(f"initialise {before} with `nn.init.xavier_uniform_({before}.weight, "
                     f"gain=nn.init.calculate_gain('{kind.lower()}'))` so its outputs start near 0")
    lr = lr_at(frames, step)
    if grew and lr:
        fixes.append(f"saturation grew during training: lower the learning rate from {num(lr)} to {num(nice(lr / 10))}")
    fixes.append("or use `nn.ReLU`/`nn.GELU` in hidden layers")
    return Finding("saturated_activations", module, step, "critical" if peak >= CRITICAL else "warning", message,
                   sentence(fixes),
                   {"site": site, "saturation_fraction": float(seg.median()), "peak": peak, "threshold": threshold})
