"""Helpers shared by the detectors: the model's structure from `meta`, robust statistics, number formats."""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from . import Frames

# Layers whose gradient scale says nothing about depth: embeddings get sparse rows, norms a handful of
# affine parameters. Depth comparisons (vanishing/exploding) use the others.
NOT_DEPTH = re.compile(r"Embedding|Norm")
MAD_TO_SIGMA = 1.4826  # MAD of a normal sample x this = its standard deviation


# ---- model structure -------------------------------------------------------------------------------
def layers(frames: Frames) -> list[dict]:
    """meta's layer list (name, type, parameters, trainable, shapes), in model order."""
    return list(frames.meta.get("model", {}).get("layers", []))


def modules(frames: Frames) -> list[tuple[str, str]]:
    """Every module as (name, type), in registration order."""
    return [tuple(m) for m in frames.meta.get("model", {}).get("modules", [])]


def depth_layers(frames: Frames) -> list[str]:
    """Trainable weight layers in model order, without embeddings and norms."""
    return [ly["name"] for ly in layers(frames)
            if ly.get("trainable", True) and not NOT_DEPTH.search(ly.get("type") or "")]


def layer_size(frames: Frames) -> dict[str, int]:
    return {ly["name"]: int(ly.get("parameters") or 0) for ly in layers(frames)}


def base_name(site: str) -> str:
    """An activation site's module name: "net.1#2" (its second call) -> "net.1"."""
    return site.split("#", 1)[0]


def layer_before(frames: Frames, module: str) -> str | None:
    """The last layer registered before `module`: the one that feeds an activation in a plain stack."""
    owners = {ly["name"] for ly in layers(frames)}
    before = None
    for name, _ in modules(frames):
        if name == module:
            return before
        if name in owners:
            before = name
    return None


def layer_after(frames: Frames, module: str) -> str | None:
    """The first layer registered after `module`, or None when `module` comes after every layer."""
    owners = {ly["name"] for ly in layers(frames)}
    seen = False
    for name, _ in modules(frames):
        if seen and name in owners and not name.startswith(module + "."):
            return name
        seen = seen or name == module
    return None


def module_types(frames: Frames) -> dict[str, str]:
    return dict(modules(frames))


def cross_entropy_classes(frames: Frames) -> int | None:
    """C when the logged loss is a plain mean cross-entropy over C classes, read from its autograd chain.

    A `.mean()` in front (reduction="none" then mean) keeps the scale; a division, product or sum
    (`loss / accumulation_steps`, `2 * loss`, a summed loss) rescales it by a factor we cannot know, and
    label smoothing adds a term: then None.
    """
    loss = frames.meta.get("loss") or {}
    chain, classes = list(loss.get("chain") or []), loss.get("classes")
    while chain and chain[0] == "MeanBackward0":
        chain = chain[1:]
    if not chain or chain[0] != "NllLossBackward0" or not classes or int(classes) < 2:
        return None
    return int(classes)


# ---- the run ---------------------------------------------------------------------------------------
def clean_steps(frames: Frames) -> pd.DataFrame:
    """Steps the optimizer applied, with a finite loss: what "the run's own history" means for most rules."""
    s = frames.steps
    keep = ~s["nonfinite"].astype(bool)
    if "skipped" in s:
        keep &= ~s["skipped"].fillna(False).astype(bool)
    return s[keep]


def lr_at(frames: Frames, step: int) -> float | None:
    s = frames.steps
    if "lr" not in s or s.empty:
        return None
    lr = s.loc[s["step"] <= step, "lr"].dropna()
    lr = lr if len(lr) else s["lr"].dropna()
    return float(lr.iloc[-1]) if len(lr) else None


def healthy_grad_norm(frames: Frames, before: int, q: float = 0.9) -> float | None:
    """The q-quantile of the global gradient norm over the clean steps before `before`."""
    s = clean_steps(frames)
    g = s.loc[s["step"] < before, "grad_norm"]
    g = g[np.isfinite(g)]
    return float(g.quantile(q)) if len(g) >= 3 else None


def rolling_baseline(values: pd.Series, window: int, min_periods: int) -> tuple[pd.Series, pd.Series]:
    """Median and robust sigma (MAD-based) of the `window` values before each one (not including it)."""
    prev = values.shift(1)
    med = prev.rolling(window, min_periods=min_periods).median()
    mad = (prev - med).abs().rolling(window, min_periods=min_periods).median()
    return med, mad * MAD_TO_SIGMA


def true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) index pairs, end inclusive, of each run of consecutive True values."""
    out, start = [], None
    for i, v in enumerate(mask):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - 1))
            start = None
    if start is not None:
        out.append((start, len(mask) - 1))
    return out


def persistent_run(series: pd.Series, threshold: float, persist: int) -> tuple[int, int] | None:
    """The first run of at least `persist` consecutive values above `threshold` (all of them, in a series
    shorter than that), as (start, end) positions; None when there is none."""
    need = min(persist, len(series))
    return next(((a, b) for a, b in true_runs(series.to_numpy() > threshold) if b - a + 1 >= need), None)


# ---- words and numbers -----------------------------------------------------------------------------
def num(x: float | None, digits: int = 3) -> str:
    """A number for a message: 3 significant digits, scientific notation when very small or large."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 0)}e}"


def nice(x: float) -> float:
    """`x` rounded to 2 significant digits, for a value the user will paste into code."""
    if not math.isfinite(x) or x <= 0:
        return x
    mag = 10 ** math.floor(math.log10(x))
    return round(x / mag, 1) * mag


def nice_factor(ratio: float, low: float = 2.0, high: float = 10.0) -> int:
    """A round factor (2, 5 or 10) near `ratio`, clamped to [low, high]."""
    r = min(max(ratio if math.isfinite(ratio) else high, low), high)
    return min((2, 5, 10), key=lambda f: abs(math.log(f / r)))


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def sentence(parts: list[str]) -> str:
    """Clauses joined with semicolons into one sentence, first letter up (code in them keeps its case)."""
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "." if text else ""


def scaler_in_use(meta: dict) -> bool:
    """The run had an enabled GradScaler (`GradScaler(enabled=False)`, the `enabled=use_amp` idiom, is none)."""
    scaler = meta.get("scaler")
    return bool(scaler) and scaler.get("enabled", True) is not False
