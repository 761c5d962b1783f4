"""Vanishing gradients: the early layers get almost no gradient compared with the late ones.

Rule (AutoTrainer, Zhang et al. 2021): vanishing when the first weight layer's gradient is below 1e-3 of
the last one's AND the first layer's gradient norm is below 1e-4. We compare RMS values (norm /
sqrt(parameter count)) so that width does not pass for depth, skip embeddings and norm layers (sparse or
tiny by design), take the largest over the first and the last third of the layers (an attention query
alone gets a tiny gradient at init in a healthy transformer), and ask for both conditions on at least 80%
of the clean recorded steps, at least MIN_STEPS of them. Critical below 1e-6. The layer named is the first
one; the evidence lists every layer whose RMS is below 1e-3 of the last's.
"""
from __future__ import annotations

import math

import numpy as np

from . import Finding, Frames, detector
from ._common import depth_layers, layer_size, module_types, num
from .exploding import depth_ratio

RATIO = 1e-3
ABSOLUTE = 1e-4
SHARE = 0.8
MIN_STEPS = 5
CRITICAL_RATIO = 1e-6


@detector
def detect(frames: Frames) -> list[Finding]:
    ratio, first, last = depth_ratio(frames)
    if ratio is None or len(ratio) < MIN_STEPS:
        return []
    w = frames.metric("grad_norm")
    early = depth_layers(frames)[: math.ceil(len(depth_layers(frames)) / 3)]
    norm_first = w[[n for n in early if n in w.columns]].max(axis=1).reindex(ratio.index)
    # An exactly zero gradient is no gradient at all (no_gradient), not a vanishing one.
    low = (ratio > 0) & (ratio < RATIO) & (norm_first < ABSOLUTE)
    if low.mean() < SHARE:
        return []
    med = float(np.median(ratio))
    step = int(ratio.index[np.flatnonzero(low.to_numpy())[0]])
    starved = _starved(frames, last, ratio.index)
    n_depth = len(depth_layers(frames))
    per_layer = med ** (1 / max(n_depth - 1, 1))
    message = (f"{first}, the first weight layer, gets {num(med)} of the gradient per parameter that {last}, the "
               f"last, gets (median over the run; norm {num(float(norm_first.median()))}): about x{num(per_layer)} "
               f"per layer over {n_depth} layers, so {len(starved)} early layer{'s' * (len(starved) != 1)} "
               "barely learn.")
    return [Finding("vanishing_gradients", first, step, "critical" if med < CRITICAL_RATIO else "warning",
                    message, _suggestion(frames), {"first_to_last_rms": med, "starved_layers": starved,
                                                   "per_layer_factor": per_layer})]


def _starved(frames: Frames, last: str, steps) -> list[str]:
    w = frames.metric("grad_norm").reindex(steps)
    sizes = layer_size(frames)
    rms = {n: float(w[n].median()) / math.sqrt(max(sizes.get(n, 1), 1)) for n in depth_layers(frames)
           if n in w.columns and w[n].notna().any()}
    return [n for n, v in rms.items() if v < RATIO * rms[last]]


def _suggestion(frames: Frames) -> str:
    saturating = sorted({t for t in module_types(frames).values() if t in ("Sigmoid", "Tanh")})
    fix = ""
    if saturating:
        fix = (f"The hidden layers use {' and '.join(saturating)}, whose derivative is at most "
               f"{'0.25' if 'Sigmoid' in saturating else '1'} and shrinks the gradient at every layer: use "
               "`nn.ReLU` or `nn.GELU` there with He init (`nn.init.kaiming_normal_(w, nonlinearity='relu')`). ")
    return fix + ("Add normalization between layers (`nn.LayerNorm` or `nn.BatchNorm1d`), or residual connections "
                  "(`x = x + block(x)`) so that the gradient has a direct path to the early layers.")
