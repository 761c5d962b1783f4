"""The loss at step 0 far from -ln(1/C) for a C-class classifier.

A classifier that starts without an opinion predicts about 1/C for each class, so its first
cross-entropy is about ln(C) (Karpathy, "A Recipe for Training Neural Networks": verify the loss at
init). A first loss above RATIO x ln(C) and at least MIN_GAP nats above it means the initial logits are
large and confidently wrong: the first steps are spent shrinking them (a "hockey stick" loss curve).
Only when the logged loss is a plain mean cross-entropy (read from its autograd chain: not divided for
gradient accumulation, not label-smoothed) and the run was recorded from step 0. A first loss below ln(C)
is not a finding: a pretrained model starts there.
"""
from __future__ import annotations

import math

from . import Finding, Frames, detector
from ._common import cross_entropy_classes, depth_layers, num

RATIO = 1.5
MIN_GAP = 1.0


@detector
def detect(frames: Frames) -> list[Finding]:
    classes = cross_entropy_classes(frames)
    s = frames.steps
    if classes is None or s.empty:
        return []
    if int(s["step"].iloc[0]) != 0 or not math.isfinite(s["loss"].iloc[0]):
        return []
    first, expected = float(s["loss"].iloc[0]), math.log(classes)
    if first < RATIO * expected or first - expected < MIN_GAP:
        return []
    head = (depth_layers(frames) or [""])[-1]
    message = (f"The loss at step 0 is {num(first)}, {num(first / expected)}x the ln({classes}) = {num(expected)} "
               "of a classifier that starts unbiased: the initial logits are large and confidently wrong.")
    target = f"{head}." if head else "the last layer's "
    suggestion = (f"Start the output layer small: `nn.init.zeros_({target}bias)` and `nn.init.normal_({target}weight, "
                  f"std=0.01)` (or scale it by 0.1), so that step 0 starts near {num(expected)}.")
    return [Finding("initial_loss", head, 0, "warning", message, suggestion,
                    {"first_loss": first, "expected": expected, "classes": classes})]
