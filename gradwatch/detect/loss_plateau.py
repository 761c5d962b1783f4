"""Loss plateau: the loss has stopped going down without getting anywhere.

Rule: the clean steps after the learning-rate warmup are cut into windows of W = max(MIN_WINDOW, n / 5)
steps. A window is flat when the median loss of its last quarter is less than DROP (5%) below that of its
first quarter. A plateau is at least two flat windows in a row that the run never leaves, over which the
loss fell less than DROP in all, while it is still near where the run started (the median of its first
HEAD clean steps): between STUCK (80%) and 150% of that, or within 10% of ln(C), chance level for a
C-class cross-entropy. A run that learned and then levelled off has converged, which is not a finding;
neither is a run near zero, nor one that diverged above where it started (exploding or spikes).
"""
from __future__ import annotations

import math

import numpy as np

from . import Finding, Frames, detector
from ._common import clean_steps, cross_entropy_classes, lr_at, nice, num, pct, sentence

MIN_WINDOW = 30
DROP = 0.05
STUCK = 0.8
DIVERGED = 1.5
CHANCE_TOL = 0.1
HEAD = 5


@detector
def detect(frames: Frames) -> list[Finding]:
    clean = clean_steps(frames)
    if clean.empty:
        return []
    initial = float(np.median(clean["loss"].to_numpy(float)[:HEAD]))
    s = _after_warmup(frames, clean)
    n = len(s)
    w = max(MIN_WINDOW, n // 5)
    if n < 2 * w:
        return []
    loss = s["loss"].to_numpy(float)
    q = max(w // 4, 1)
    starts = list(range(0, n - w + 1, w))
    flat = [_rel_drop(loss[a: a + w], q) < DROP for a in starts]
    tail = 0
    while tail < len(flat) and flat[-1 - tail]:
        tail += 1
    if tail < 2:
        return []
    first = starts[len(flat) - tail]
    if _rel_drop(loss[first:], q) >= DROP:  # every window flat, but together still going down
        return []
    level = float(np.median(loss[first:]))
    classes = cross_entropy_classes(frames)
    chance = math.log(classes) if classes else None
    at_chance = chance is not None and abs(level - chance) <= CHANCE_TOL * chance
    stuck = STUCK * abs(initial) < level <= DIVERGED * abs(initial)
    if not (stuck or at_chance) or abs(level) < 1e-3 * max(abs(initial), 1e-12):
        return []
    step = int(s["step"].iloc[first])
    span = int(s["step"].iloc[-1]) - step + 1
    message = (f"The loss has stayed at about {num(level)} for the last {span} steps (from step {step}, less than "
               f"{pct(DROP)} lower per {w}-step window), {pct(level / initial) if initial else 'n/a'} of where it "
               "started" + (f", which is chance level ln({classes}) = {num(chance)}." if at_chance else "."))
    return [Finding("loss_plateau", "", step, "warning", message, _suggestion(frames, step),
                    {"level": level, "initial": initial, "window": w, "chance": chance})]


def _after_warmup(frames: Frames, s):
    lr = s["lr"]
    if lr.notna().sum() < 2:
        return s
    peak = lr.max()
    reached = np.flatnonzero((lr >= 0.5 * peak).to_numpy())
    return s.iloc[reached[0]:] if len(reached) else s


def _rel_drop(x: np.ndarray, q: int) -> float:
    a, b = float(np.median(x[:q])), float(np.median(x[-q:]))
    return (a - b) / abs(a) if a else 0.0


def _suggestion(frames: Frames, step: int) -> str:
    fixes = []
    lr = lr_at(frames, step)
    ratio = frames.metric("update_ratio")
    typical = float(np.nanmedian(ratio.to_numpy())) if not ratio.empty and np.isfinite(ratio.to_numpy()).any() else None
    if lr and typical and typical < 1e-4:
        target = lr * min(1e-3 / typical, 100.0)
        fixes.append(f"the updates are {num(typical)} of the weights per step (about 1e-3 is healthy): raise the "
                     f"learning rate from {num(lr)} to about {num(nice(target))}")
    elif lr:
        fixes.append(f"try the learning rate x10 and /10 around {num(lr)}")
    g = frames.steps["grad_norm"].dropna()
    if len(g) and float(g.median()) < 1e-6:
        fixes.append(f"the gradient norm is only {num(float(g.median()))}: see the vanishing-gradient advice")
    fixes.append("check that the model is in `train()` mode and that the loss gets logits, not softmax outputs")
    return sentence(fixes)
