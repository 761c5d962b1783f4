"""Logits vs softmax: probabilities fed to a loss that expects logits.

Read from the loss's autograd chain, recorded at the first step (meta["loss"]["chain"]):
  - NllLoss <- LogSoftmax <- Softmax: softmax outputs fed to cross_entropy, which applies log_softmax
    itself. The loss can then never go below ln(1 + (C - 1) / e) and the gradients are squashed;
  - BCEWithLogits <- Sigmoid: a sigmoid fed to a loss that applies one itself;
  - NllLoss <- Log <- Softmax: log(softmax(x)) by hand, which underflows to -inf; a warning too.
An nn.Sigmoid before nn.BCELoss is correct and not a finding.
"""
from __future__ import annotations

import math

from . import Finding, Frames, detector
from ._common import clean_steps, modules, num

PATTERNS = {
    ("NllLossBackward0", "LogSoftmaxBackward0", "SoftmaxBackward0"): (
        "softmax outputs are fed to cross-entropy, which applies log_softmax itself",
        "Remove the final softmax and pass the logits to `nn.CrossEntropyLoss` / `F.cross_entropy`; apply softmax "
        "only to read probabilities at inference."),
    ("BinaryCrossEntropyWithLogitsBackward0", "SigmoidBackward0"): (
        "sigmoid outputs are fed to BCEWithLogitsLoss, which applies a sigmoid itself",
        "Remove the final sigmoid and pass the logits to `nn.BCEWithLogitsLoss`, or keep the sigmoid and use "
        "`nn.BCELoss` (less stable)."),
    ("NllLossBackward0", "LogBackward0", "SoftmaxBackward0"): (
        "the loss takes log(softmax(x)), which underflows to -inf for confident predictions",
        "Use `F.log_softmax(x, dim=-1)` with `F.nll_loss`, or `F.cross_entropy` on the logits."),
}


@detector
def detect(frames: Frames) -> list[Finding]:
    chain = tuple((frames.meta.get("loss") or {}).get("chain") or ())
    chain = _skip_scaling(chain)
    for pattern, (what, fix) in PATTERNS.items():
        if chain[: len(pattern)] == pattern:
            return [_finding(frames, pattern, what, fix)]
    return []


def _skip_scaling(chain: tuple) -> tuple:
    """Drop the loss / accumulation_steps and loss * weight wrappers in front of the real loss."""
    while chain and chain[0] in ("DivBackward0", "MulBackward0", "MeanBackward0", "SumBackward0"):
        chain = chain[1:]
    return chain


def _finding(frames: Frames, pattern: tuple, what: str, fix: str) -> Finding:
    kinds = {"SoftmaxBackward0": "Softmax", "SigmoidBackward0": "Sigmoid"}
    module = next((n for n, t in reversed(modules(frames)) if t == kinds.get(pattern[-1])), "")
    message = f"The {what}" + (f" ({module})" if module else "") + "."
    classes = (frames.meta.get("loss") or {}).get("classes")
    evidence = {"chain": list(pattern)}
    if pattern[1] == "LogSoftmaxBackward0" and classes and classes > 1:
        floor = math.log(1 + (classes - 1) / math.e)
        low = clean_steps(frames)["loss"].min()
        message += (f" With {classes} classes the loss cannot go below ln(1 + {classes - 1}/e) = {num(floor)}; "
                    f"its lowest here is {num(float(low))}.")
        evidence |= {"loss_floor": floor, "lowest_loss": float(low)}
    step = int(frames.steps["step"].iloc[0]) if len(frames.steps) else 0
    return Finding("softmax_before_loss", module, step, "warning", message, fix, evidence)
