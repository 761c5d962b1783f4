"""Layers that receive no gradient at all.

Rule, per layer over every recorded step (at least MIN_STEPS):
  - frozen (requires_grad=False on all its parameters): an info note, since that is usually deliberate
    (fine-tuning); one note lists them all;
  - trainable but its .grad never set: a warning, the layer is disconnected from the loss (unused in the
    forward, or its output detached);
  - trainable, .grad set, but exactly zero on every step: a warning, the path from it to the loss is
    multiplied by zero somewhere.
A layer that gets a gradient on some steps only (a conditional branch, a mixture of experts) is fine.
"""
from __future__ import annotations

import numpy as np

from . import Finding, Frames, detector
from ._common import layers, num

MIN_STEPS = 5


@detector
def detect(frames: Frames) -> list[Finding]:
    w = frames.metric("grad_norm")
    if w.empty or len(w) < MIN_STEPS:
        return []
    step = int(w.index[0])
    out, frozen = [], []
    for ly in layers(frames):
        name = ly["name"]
        if not ly.get("trainable", True):
            frozen.append(ly)
            continue
        if name not in w.columns:
            continue
        col = w[name].to_numpy(float)
        if np.isnan(col).all():
            out.append(_finding(name, ly, step, len(w), "never received a gradient",
                                "it is not used in the forward pass, or its output is cut off from the loss "
                                "(.detach(), .data, .item(), torch.no_grad(), a conversion to a Python number)"))
        elif np.nanmax(col) == 0:
            out.append(_finding(name, ly, step, len(w), "had an exactly zero gradient on every step",
                                "its output reaches the loss only through a product with zero, a mask that is "
                                "always off, or a comparison/rounding with no gradient"))
    if frozen:
        n = sum(int(ly.get("parameters") or 0) for ly in frozen)
        names = ", ".join(ly["name"] for ly in frozen[:8]) + (" ..." if len(frozen) > 8 else "")
        out.append(Finding("no_gradient", "", step, "info",
                           f"{len(frozen)} frozen layer{'s' * (len(frozen) != 1)} ({num(n)} parameters, "
                           f"requires_grad=False) are not trained: {names}.",
                           "Nothing to do if they are frozen on purpose; otherwise call "
                           "`layer.requires_grad_(True)` and make sure the optimizer holds their parameters.",
                           {"frozen": [ly["name"] for ly in frozen], "parameters": n}))
    return out


def _finding(name: str, ly: dict, step: int, n_steps: int, what: str, why: str) -> Finding:
    return Finding("no_gradient", name, step, "warning",
                   f"{name} ({ly.get('type')}, {num(int(ly.get('parameters') or 0))} parameters) {what} in "
                   f"{n_steps} recorded steps, so it never learns.",
                   f"Check {name}: {why}. If it is meant to be unused, freeze it (`requires_grad_(False)`) or "
                   "remove it.", {"parameters": int(ly.get("parameters") or 0)})
