"""Fold symptoms into their cause, so that one problem reads as one finding.

A ReLU layer that is (nearly) all dead passes no gradient back: the layers before it get exactly zero
gradient, the first-to-last gradient ratio collapses, and the loss goes flat. Vanishing gradients flatten
the loss too, gradients that are never zeroed grow like an explosion, and an explosion ends in spikes and
NaN. Each symptom below is dropped
when its cause is present, and the cause's message says what it also explains.
"""
from __future__ import annotations

from dataclasses import replace

from . import Finding, Frames
from ._common import modules

# cause kind -> symptom kinds it explains
EXPLAINS = {
    "dead_relu": ("no_gradient", "vanishing_gradients", "loss_plateau"),
    "vanishing_gradients": ("loss_plateau",),
    "missing_zero_grad": ("exploding_gradients", "loss_spike"),
    "exploding_gradients": ("nan_inf", "loss_spike"),
    "softmax_before_loss": ("loss_plateau",),
}


def fold_symptoms(findings: list[Finding], frames: Frames) -> list[Finding]:
    dropped: dict[Finding, list[Finding]] = {}
    for cause in findings:
        if cause.kind not in EXPLAINS or cause.severity == "info":
            continue
        if cause.kind == "dead_relu" and cause.severity != "critical":
            continue
        explained = [f for f in findings if f.kind in EXPLAINS[cause.kind] and f is not cause
                     and _upstream_ok(cause, f, frames)]
        if explained:
            dropped[cause] = explained
    gone = {id(f) for fs in dropped.values() for f in fs}
    out = []
    for f in findings:
        if id(f) in gone:
            continue
        if f in dropped:
            kinds = sorted({s.kind for s in dropped[f]})
            f = replace(f, message=f"{f.message} This also explains the {', '.join(kinds)} seen in this run.",
                        evidence={**f.evidence, "explains": kinds})
        out.append(f)
    return out


def _upstream_ok(cause: Finding, symptom: Finding, frames: Frames) -> bool:
    """A dead layer explains missing gradients only in the layers registered before it; an explosion
    explains the NaN and the spikes that come at or after its onset, not earlier ones."""
    if cause.kind == "exploding_gradients":
        return symptom.step >= cause.step
    if cause.kind != "dead_relu" or symptom.kind != "no_gradient":
        return True
    order = [n for n, _ in modules(frames)]
    if symptom.layer not in order or cause.layer not in order:
        return False
    return order.index(symptom.layer) < order.index(cause.layer) and symptom.severity != "info"
