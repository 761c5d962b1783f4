"""Missing zero_grad(): gradients add up across steps.

The recorder checks, at each step's first backward, whether the smallest trainable parameter's .grad
still holds non-zero values from before (`steps.grad_carried`): after `optimizer.zero_grad()` it is None
or zero. A finding when that is so on at least SHARE of the steps after the first (and on MIN_STEPS of
them): each update then uses the sum of every gradient so far. Critical: training is not doing what the
script means. Gradient accumulation resets once per optimizer step, so it is not affected.
"""
from __future__ import annotations

import numpy as np

from . import Finding, Frames, detector
from ._common import num, pct

SHARE = 0.5
MIN_STEPS = 3


@detector
def detect(frames: Frames) -> list[Finding]:
    s = frames.steps
    if "grad_carried" not in s or len(s) < MIN_STEPS + 1:
        return []
    carried = s["grad_carried"].iloc[1:].to_numpy(bool)
    if carried.sum() < MIN_STEPS or carried.mean() < SHARE:
        return []
    step = int(s["step"].iloc[1 + int(np.flatnonzero(carried)[0])])
    g = s["grad_norm"].to_numpy(float)
    g = g[np.isfinite(g)]
    growth = f"; the gradient norm went from {num(float(g[0]))} to {num(float(g[-1]))}" if len(g) > 1 else ""
    message = (f"On {pct(float(carried.mean()))} of the steps, .grad still held the previous step's gradient when "
               f"backward started, from step {step}: every update uses the sum of all gradients so far{growth}.")
    suggestion = ("Call `optimizer.zero_grad(set_to_none=True)` once per optimizer step, before loss.backward() "
                  "(with gradient accumulation: right after `optimizer.step()`); without an optimizer, set "
                  "`p.grad = None` for every parameter after the update.")
    return [Finding("missing_zero_grad", "", step, "critical", message, suggestion,
                    {"carried_share": float(carried.mean())})]
