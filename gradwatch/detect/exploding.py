"""Exploding gradients: the gradient norm leaves its own history, or grows with depth.

Temporal rule (the run against itself): the global pre-clip gradient norm is compared with the median of
the previous WINDOW clean steps (at least MIN_HISTORY of them, so that a run that blows up in its first
steps is caught too). It explodes at step t when it is above GROWTH x
that median for PERSIST steps in a row (after a first finite one, a non-finite norm counts as above: a norm
that goes NaN with no growth before it is a nan_inf finding only), and the loss shows it: the
loss rose above 1.5x its own median (and by 5% of the first loss at least, for a loss near 0), or went
non-finite, within those steps or the next PERSIST. Gradient
norms that grow while the loss keeps falling are a run that clipping or Adam keeps in hand: no finding.
The layer named is the one whose norm grew most relative to its own median.

Depth rule (AutoTrainer, Zhang et al. 2021): the ratio of the first to the last weight layer's gradient
above 70 means the backward pass amplifies the signal layer after layer. We compare RMS values (norm /
sqrt(parameter count)) so that a wide first layer does not look larger just for being wide, take the
largest among the first and the last third of the layers (see `depth_ratio`), and ask for it on at least
80% of the recorded steps.
"""
from __future__ import annotations

import math

import numpy as np

from . import Finding, Frames, detector
from ._common import clean_steps, depth_layers, healthy_grad_norm, layer_size, lr_at, nice, nice_factor, num

WINDOW = 128
WARMUP = 10  # recorded steps the depth rule needs
MIN_HISTORY = 2
GROWTH = 10.0
PERSIST = 3
DEPTH_RATIO = 70.0
DEPTH_SHARE = 0.8


@detector
def detect(frames: Frames) -> list[Finding]:
    return [f for f in (_temporal(frames), _depth(frames)) if f is not None]


def _temporal(frames: Frames) -> Finding | None:
    s = frames.steps
    if len(s) < MIN_HISTORY + PERSIST or s["grad_norm"].isna().all():
        return None
    g = s["grad_norm"].to_numpy(float)
    usable = ~s["skipped"].fillna(False).to_numpy(bool)
    hist = np.where(usable & np.isfinite(g), g, np.nan)
    base = _prev_median(hist, WINDOW, MIN_HISTORY)
    above = usable & (~np.isfinite(g) | (g > GROWTH * base)) & np.isfinite(base)
    loss = s["loss"].to_numpy(float)
    loss_base = _prev_median(np.where(np.isfinite(loss), loss, np.nan), WINDOW, MIN_HISTORY)
    first = abs(loss[np.isfinite(loss)][0]) if np.isfinite(loss).any() else 0.0
    loss_bad = ~np.isfinite(loss) | (loss > loss_base + np.maximum(0.5 * np.abs(loss_base), 0.05 * first))
    for i in range(len(g) - PERSIST + 1):
        # It starts with a finite norm that grew: a norm that is NaN at once is nan_inf's, not a growth.
        if np.isfinite(g[i]) and above[i: i + PERSIST].all() and loss_bad[i: i + 2 * PERSIST].any():
            return _temporal_finding(frames, i, base[i])
    return None


def _prev_median(x: np.ndarray, window: int, min_periods: int) -> np.ndarray:
    import pandas as pd

    return pd.Series(x).shift(1).rolling(window, min_periods=min_periods).median().to_numpy()


def _temporal_finding(frames: Frames, i: int, base: float) -> Finding:
    s = frames.steps
    step = int(s["step"].iloc[i])
    seg = s["grad_norm"].iloc[i: i + 2 * PERSIST].to_numpy(float)
    finite = seg[np.isfinite(seg)]
    peak = float(finite.max()) if len(finite) else math.inf
    layer = _worst_layer(frames, step)
    lr = lr_at(frames, step)
    p90 = healthy_grad_norm(frames, before=step)
    healthy = p90 or base
    source = "the 90th percentile of this run's healthy norms" if p90 else "this run's norm before the jump"
    factor = nice_factor(math.sqrt(peak / base) if math.isfinite(peak) else math.inf)
    went = (f"{num(peak)}" if len(finite) else "non-finite") + (
        ", then non-finite" if len(finite) and not np.isfinite(seg).all() else "")
    message = (f"The gradient norm jumped from a typical {num(base)} to {went} from step {step} "
               f"(over {num(GROWTH)}x for {PERSIST}+ steps) and the loss rose with it"
               + (f"; {layer} grew most." if layer else "."))
    suggestion = (f"Clip before the optimizer step: `torch.nn.utils.clip_grad_norm_(model.parameters(), "
                  f"max_norm={num(nice(healthy))})` ({source})")
    if lr:
        suggestion += f", and lower the learning rate from {num(lr)} to {num(nice(lr / factor))}"
    if step < max(50, len(s) // 10) and not _has_warmup(frames, step):
        suggestion += f"; warm the learning rate up linearly over the first {_warmup_steps(step)} steps"
    return Finding("exploding_gradients", layer or "", step, "critical", message, suggestion + ".",
                   {"baseline_norm": base, "peak_norm": peak, "lr": lr, "clip_at": nice(healthy)})


def _worst_layer(frames: Frames, step: int) -> str | None:
    w = frames.metric("grad_norm")
    if w.empty or step not in w.index:
        return None
    before = w.loc[w.index < step].tail(WINDOW).median()
    now = w.loc[step].replace(np.inf, np.finfo(np.float32).max)
    growth = (now / before.replace(0, np.nan)).dropna()
    return str(growth.idxmax()) if len(growth) else None


def _has_warmup(frames: Frames, step: int) -> bool:
    lr = frames.steps.loc[frames.steps["step"] <= step, "lr"].dropna()
    return len(lr) > 1 and lr.iloc[0] < 0.5 * lr.max()


def _warmup_steps(onset: int) -> int:
    return int(max(100, nice(2 * onset + 1)))


def _depth(frames: Frames) -> Finding | None:
    ratio, first, last = depth_ratio(frames)
    if ratio is None or len(ratio) < WARMUP:
        return None
    high = ratio > DEPTH_RATIO
    if high.mean() < DEPTH_SHARE:
        return None
    med = float(np.median(ratio))
    step = int(ratio.index[np.flatnonzero(high.to_numpy())[0]])
    message = (f"The gradient of {first}, the first weight layer, is {num(med)}x larger per parameter than that "
               f"of {last}, the last (median over the run; AutoTrainer calls above {num(DEPTH_RATIO)} exploding): "
               "the backward pass amplifies it layer after layer.")
    suggestion = ("Initialise the weights to keep the scale through depth: `nn.init.kaiming_normal_(w, "
                  "nonlinearity='relu')` for ReLU layers, `nn.init.xavier_uniform_` for tanh; add normalization "
                  "(LayerNorm/BatchNorm) between layers, and clip the gradient norm meanwhile.")
    return Finding("exploding_gradients", first, step, "warning", message, suggestion,
                   {"first_to_last_rms": med, "first": first, "last": last})


def depth_ratio(frames: Frames):
    """Per step: the largest RMS gradient in the first third of the weight layers over the largest in the
    last third; with the first and the last layer's names."""
    w = frames.metric("grad_norm")
    names = [n for n in depth_layers(frames) if n in w.columns]
    if w.empty or len(names) < 3:
        return None, None, None
    sizes = layer_size(frames)
    present = w[names].notna().mean() > 0.5
    names = [n for n in names if present[n]]
    if len(names) < 3:
        return None, None, None
    rms = w[names] / np.sqrt([max(sizes.get(n, 1), 1) for n in names])
    third = math.ceil(len(names) / 3)
    # The largest RMS among the first and the last third of the layers, not the single first and last: in
    # a transformer the first layer is an attention query whose gradient is tiny at init by design, while
    # the rest of its block learns normally. In a plain stack of 3 this is the first and the last layer.
    rms_first, rms_last = rms[names[:third]].max(axis=1), rms[names[-third:]].max(axis=1)
    ratio = rms_first / rms_last
    keep = ratio.index.isin(clean_steps(frames)["step"]) & np.isfinite(ratio.to_numpy()) & (rms_last > 0).to_numpy()
    return ratio[keep], names[0], names[-1]
