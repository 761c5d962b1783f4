"""Synthetic `Frames` for the detector tests: a healthy run by default, every part overridable.

`make_frames()` builds what `Frames.from_run()` would load from a small ReLU MLP classifier
(fc1 -> act1 -> fc2 -> act2 -> fc3, 10 classes, cross-entropy, SGD at lr 1e-3) whose loss falls from
ln(10) with a little noise. A test changes only the columns, metrics or meta entries its rule reads,
so the first step with evidence can be worked out by hand from the arguments.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gradwatch.detect import Frames

N = 200  # steps in the default run
CLASSES = 10
CE_CHAIN = ["NllLossBackward0", "LogSoftmaxBackward0", "AddmmBackward0", "ReluBackward0"]
# F.cross_entropy(logits, y, label_smoothing=0.1): the smoothing term is added on top of the NLL.
SMOOTHED_CHAIN = ["AddBackward0", "MulBackward1", "NllLossBackward0", "LogSoftmaxBackward0", "AddmmBackward0"]
MLP = (("fc1", "Linear", 100), ("act1", "ReLU"), ("fc2", "Linear", 100), ("act2", "ReLU"), ("fc3", "Linear", 100))
LAYERS = ("fc1", "fc2", "fc3")


# ---- series ------------------------------------------------------------------------------------------
def decaying(n: int = N, start: float = math.log(CLASSES), end: float = 0.3, tau: float = 30.0,
             noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """A loss that falls fast early: exponential decay from `start` to `end`, with relative Gaussian noise."""
    s = np.arange(n)
    clean = end + (start - end) * np.exp(-s / tau)
    return clean * (1 + noise * np.random.default_rng(seed).standard_normal(n))


def periodic(n: int, level: float, d: float) -> np.ndarray:
    """`level` with a period-3 wobble (0, +d, -d): its rolling median is exactly `level` and the median
    absolute residual exactly `d`, so a robust sigma is 1.4826 * d by construction."""
    return level + d * np.resize([0.0, 1.0, -1.0], n)


def warmup_cosine(n: int, peak: float = 1e-3, warmup: int = 20) -> np.ndarray:
    """An LR schedule: linear warmup to `peak` over `warmup` steps, then cosine decay to 0."""
    s = np.arange(n)
    cos = 0.5 * peak * (1 + np.cos(np.pi * np.clip(s - warmup, 0, None) / max(n - warmup, 1)))
    return np.where(s < warmup, peak * (s + 1) / warmup, cos)


# ---- frames ------------------------------------------------------------------------------------------
def steps_frame(loss=None, *, n: int | None = None, start: int = 0, lr=1e-3, grad_norm=1.0, skipped=False,
                loss_scale=np.nan, nonfinite=None, eval_mode=False, grad_carried=False) -> pd.DataFrame:
    """`Run.steps` with the reader's dtypes. Scalars broadcast; `nonfinite` defaults to a non-finite
    loss or gradient norm, as the recorder flags it."""
    if loss is None:
        loss = decaying(N if n is None else n)
    loss = np.asarray(loss, float)
    n = len(loss)
    col = lambda v, dtype=float: np.broadcast_to(np.asarray(v, dtype), (n,)).copy()
    grad_norm = col(grad_norm)
    if nonfinite is None:
        nonfinite = ~np.isfinite(loss) | ~np.isfinite(grad_norm)
    return pd.DataFrame({
        "step": np.arange(start, start + n, dtype="int64"), "time": 1.7e9 + 0.1 * np.arange(n), "loss": loss,
        "lr": col(lr), "grad_norm": grad_norm, "skipped": pd.array(col(skipped, object), dtype="boolean"),
        "loss_scale": col(loss_scale), "nonfinite": col(nonfinite, bool), "eval_mode": col(eval_mode, bool),
        "grad_carried": col(grad_carried, bool),
    })


def wide(columns: dict, steps) -> pd.DataFrame:
    """A metric's wide frame: one column per layer or site (scalars broadcast), index named "step"."""
    steps = np.asarray(steps)
    data = {k: np.broadcast_to(np.asarray(v, float), steps.shape).copy() for k, v in columns.items()}
    return pd.DataFrame(data, index=pd.Index(steps, name="step"))


def model_meta(*spec: tuple, frozen: tuple[str, ...] = ()) -> dict:
    """meta["model"] from (name, type) activations and (name, type, parameters) layers, in registration order."""
    mods = [["(root)", "Net"]] + [[m[0], m[1]] for m in spec]
    layers = [{"name": m[0], "type": m[1], "parameters": m[2], "trainable": m[0] not in frozen, "shapes": {}}
              for m in spec if len(m) > 2]
    acts = [{"name": m[0], "type": m[1], "kind": m[1].lower()} for m in spec if len(m) == 2]
    return {"class": "Net", "layers": layers, "modules": mods, "activations": acts}


def run_meta(model: tuple = MLP, *, frozen: tuple[str, ...] = (), chain=CE_CHAIN, classes=CLASSES,
             optimizer: str = "SGD", lr: float = 1e-3, weight_decay: float = 0.0, scaler: bool = False) -> dict:
    """`Run.meta`: the model, one optimizer with one param group, an optional GradScaler, the loss chain."""
    return {
        "model": model_meta(*model, frozen=frozen),
        "optimizer": [{"class": optimizer, "param_groups": [{"lr": lr, "weight_decay": weight_decay}]}],
        "scaler": {"class": "GradScaler", "enabled": True} if scaler else None,
        "config": {"dead_window": 25},
        "loss": {"chain": list(chain), "classes": classes},
    }


def healthy_metrics(steps, layers=LAYERS, sites=("act1", "act2"), window: int = 25) -> dict[str, pd.DataFrame]:
    """Per-layer gradient norms of about 0.5, update ratios of 1e-3, 10% dead units per window."""
    steps = np.asarray(steps)
    wobble = 0.5 + 0.05 * np.sin(steps)
    ends = steps[window - 1:: window] if len(steps) >= window else steps[-1:]
    return {"grad_norm": wide({ly: wobble for ly in layers}, steps),
            "update_ratio": wide({ly: 1e-3 for ly in layers}, steps),
            "dead_fraction": wide({s: 0.1 for s in sites}, ends)}


def events_frame(*rows: tuple) -> pd.DataFrame:
    """`Run.events` from (step, kind, phase, module) rows."""
    cols = ["step", "kind", "phase", "module", "rank", "value", "detail"]
    return pd.DataFrame([(*r, None, math.nan, "") for r in rows], columns=cols)


def make_frames(loss=None, *, metrics: dict | None = None, events=None, meta: dict | None = None,
                **step_columns) -> Frames:
    """Frames of the default healthy run; `metrics=None` means healthy ones for every recorded step."""
    steps = steps_frame(loss, **step_columns)
    if metrics is None:
        metrics = healthy_metrics(steps["step"])
    return Frames(steps=steps, metrics=metrics, events=events if events is not None else events_frame(),
                  meta=run_meta() if meta is None else meta)
