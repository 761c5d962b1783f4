"""NaN/Inf: the first module that produced a non-finite value, from the recorder's events.

Rule: each event in `frames.events` is the onset of a streak of non-finite steps, already traced to its
producer and phase (forward / input / loss / backward). Events that share a phase and module are one
finding, at the first step. Critical: the step's update is garbage, or skipped.

Not a finding: with a GradScaler, a step whose gradients overflowed and that the scaler skipped while
the loss stayed finite is the scaler doing its job (`amp_overflow` watches those). A run recorded with
`trace_nonfinite=False` has no events; its non-finite steps still give one finding, without a producer.
"""
from __future__ import annotations

import math

import numpy as np

from ..store.schema import ROOT_NAME
from . import Finding, Frames, detector
from ._common import clean_steps, healthy_grad_norm, lr_at, nice, nice_factor, num, scaler_in_use

SPELLING = {"nan": "NaN", "inf": "Inf"}
PHASE_WHAT = {
    "forward": "{module} returned {kind} from finite inputs in the forward pass",
    "input": "The input of {module} already held {kind}: the batch itself, or code outside any module",
    "loss": "The loss became {kind} while every module output was finite",
    "backward": "The gradient of {module} became {kind} while the forward pass and the loss were finite",
}


@detector
def detect(frames: Frames) -> list[Finding]:
    steps = frames.steps
    if steps.empty or not steps["nonfinite"].any():
        return []
    events = frames.events
    scaler = scaler_in_use(frames.meta)
    findings: dict[tuple[str, str], Finding] = {}
    if events is None or events.empty:
        bad = [int(s) for s in steps.loc[steps["nonfinite"], "step"] if not (scaler and _scaler_skip(steps, s))]
        if bad:
            findings[("", "")] = _finding(frames, bad[0], "", "", "nan", n=len(bad))
        return list(findings.values())
    for ev in events.itertuples():
        if scaler and ev.phase == "backward" and _scaler_skip(steps, ev.step):
            continue
        key = (ev.phase, ev.module)
        if key in findings:
            continue
        count = int((events["phase"].eq(ev.phase) & events["module"].eq(ev.module)).sum())
        findings[key] = _finding(frames, int(ev.step), ev.phase, ev.module, ev.kind, n=count,
                                 rank=None if ev.rank is None or (isinstance(ev.rank, float) and math.isnan(ev.rank))
                                 else int(ev.rank))
    return list(findings.values())


def _scaler_skip(steps, step: int) -> bool:
    row = steps.loc[steps["step"] == step]
    if row.empty:
        return False
    skipped = bool(row["skipped"].fillna(False).iloc[0])
    return skipped and bool(np.isfinite(row["loss"].iloc[0]))


def _finding(frames: Frames, step: int, phase: str, module: str, kind: str, n: int, rank: int | None = None):
    who = "the model" if module == ROOT_NAME else module
    what = PHASE_WHAT.get(phase, "A non-finite loss or gradient appeared")
    what = what.format(module=who, kind=SPELLING.get(kind, kind))
    where = f" on rank {rank}" if rank is not None else ""
    streak = _streak(frames.steps, step)
    streak_words = "only that step was" if streak == 1 else f"{streak} consecutive steps were"
    message = (f"{what} at step {step}{where}; {streak_words} non-finite"
               + (f", and it happened {n} times" if n > 1 else "") + ".")
    return Finding("nan_inf", module if phase in ("forward", "input", "backward") else "", step, "critical",
                   message, _suggestion(frames, step, phase, module),
                   {"phase": phase or None, "value": kind, "streak": streak, "occurrences": n, "rank": rank})


def _streak(steps, step: int) -> int:
    after = steps.loc[steps["step"] >= step, "nonfinite"].to_numpy()
    bad = np.flatnonzero(~after)
    return int(bad[0]) if len(bad) else len(after)


def _suggestion(frames: Frames, step: int, phase: str, module: str) -> str:
    if phase == "forward":
        fix = (f"Look in {module}'s forward for log(0), sqrt or pow of a negative, or a division by something "
               "that can be 0 (`x / x.std()`): add an epsilon, e.g. `x / (x.std() + 1e-6)` or "
               "`torch.log(x.clamp_min(1e-12))`.")
    elif phase == "input":
        fix = ("Check the data: `assert torch.isfinite(x).all()` on each batch, and look for a normalisation by a "
               "zero std or missing values in the dataset.")
    elif phase == "loss":
        fix = ("Compute the loss from logits: `F.cross_entropy(logits, y)` or `nn.BCEWithLogitsLoss` instead of "
               "`log(softmax)` or `log(sigmoid)`; clamp the argument of any log; check the targets for NaN or "
               "out-of-range class indices.")
    elif phase == "backward":
        fix = (f"An op in {module} has an unbounded derivative at the values it saw (sqrt or norm at 0, "
               "pow with a fractional exponent, acos/asin at +-1): add an epsilon inside it.")
    else:
        fix = "Rerun with `trace_nonfinite=True` to name the module that produces it."
    return fix + _stability_advice(frames, step)


def _stability_advice(frames: Frames, step: int) -> str:
    """Clip and LR numbers when the gradient norm climbed before the NaN, and the scale under AMP."""
    out = ""
    healthy = healthy_grad_norm(frames, before=max(step - 5, 1))
    clean = clean_steps(frames)
    recent = clean.loc[(clean["step"] < step) & (clean["step"] >= step - 5), "grad_norm"]
    recent = recent[np.isfinite(recent)]
    if healthy and len(recent) and recent.max() > 3 * healthy:
        lr = lr_at(frames, step)
        factor = nice_factor(float(recent.max() / healthy))
        out += (f" The gradient norm rose to {num(float(recent.max()))} just before (typical {num(healthy)}): "
                f"clip with `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={num(nice(healthy))})`")
        out += f" and lower the learning rate from {num(lr)} to {num(nice(lr / factor))}." if lr else "."
    if scaler_in_use(frames.meta):
        scale = frames.steps.loc[frames.steps["step"] <= step, "loss_scale"].dropna()
        if len(scale):
            out += (f" Mixed precision: the loss scale was {num(float(scale.iloc[-1]))} at that step; a scale that "
                    "keeps falling means fp16 overflows in the forward pass: try "
                    "`torch.autocast(device_type, dtype=torch.bfloat16)`.")
    return out
