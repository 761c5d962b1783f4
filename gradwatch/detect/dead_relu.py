"""Dead ReLUs: units of a ReLU-family module that never fire over a whole window of steps.

Rule: the recorder's dead fraction per window (a unit is dead when it was never positive on any sample
of the window). A finding when it is above WARN in at least PERSIST consecutive windows, or in the only
window the run has. Warning above 50% (the threshold practitioners' guides give), critical from 90%
(the top of the 70-90% band: a layer that is nearly gone). The step is the start of the first such window.
When the layer started alive and died later, the learning rate is the suspect.
"""
from __future__ import annotations

import numpy as np

from . import Finding, Frames, detector
from ._common import base_name, layer_before, lr_at, module_types, nice, num, pct, persistent_run, sentence

WARN = 0.5
CRITICAL = 0.9
PERSIST = 2


@detector
def detect(frames: Frames) -> list[Finding]:
    dead = frames.metric("dead_fraction")
    if dead.empty:
        return []
    findings = []
    for site in dead.columns:
        series = dead[site].dropna()
        run = persistent_run(series, WARN, PERSIST) if len(series) else None
        if run is not None:
            findings.append(_finding(frames, site, series, run))
    return findings


def _finding(frames: Frames, site: str, series, run: tuple[int, int]) -> Finding:
    a, b = run
    ends = series.index.to_numpy()
    start = _window_start(frames, ends, a)
    frac = series.iloc[a: b + 1]
    peak = float(frac.max())
    module = base_name(site)
    kind = module_types(frames).get(module, "ReLU")
    before = layer_before(frames, module)
    died_later = a > 0 and float(series.iloc[0]) <= WARN
    message = (f"{pct(float(frac.iloc[0]))} of {site}'s units never fired over steps {start}-{int(ends[a])}"
               f" (up to {pct(peak)} by step {int(frac.idxmax())}, over {pct(WARN)} in {b - a + 1} "
               f"window{'s' * (b > a)})" + ("; the layer started alive, so they died during training." if died_later
                                            else "."))
    fixes = []
    if kind != "LeakyReLU":
        fixes.append(f"replace {site} ({kind}) with `nn.LeakyReLU(0.01)`, whose units keep a gradient when negative")
    if before:
        fixes.append(f"initialise {before} with He init (`nn.init.kaiming_normal_({before}.weight, "
                     f"nonlinearity='relu')`, bias 0) or put a normalization layer between {before} and {site}")
    lr = lr_at(frames, int(ends[a]))
    if died_later and lr:
        fixes.append(f"lower the learning rate from {num(lr)} to {num(nice(lr / 10))}: large updates push "
                     "pre-activations negative for every input")
    suggestion = sentence(fixes)
    return Finding("dead_relu", module, start, "critical" if peak >= CRITICAL else "warning", message, suggestion,
                   {"site": site, "dead_fraction": peak, "windows": b - a + 1, "window_end": int(ends[a])})


def _window_start(frames: Frames, ends: np.ndarray, i: int) -> int:
    if i > 0:
        return int(ends[i - 1]) + 1
    steps = frames.steps["step"]
    return int(steps.iloc[0]) if len(steps) else 0
