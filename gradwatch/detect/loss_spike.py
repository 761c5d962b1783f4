"""Loss spikes: a step whose loss leaps far above the run's recent level.

Rule (after OLMo-core's spike check: 6 sigma over a 128-step window), on clean steps, from step WARMUP:
  - level: the median of the previous LEVEL steps (short, so a fast-falling loss is compared with where it
    is now, not where it was);
  - residual: loss - level. Noise: 1.4826 x the median |residual| over the previous WINDOW steps (robust
    to the spikes themselves; residuals from a moving median are centred on 0);
  - a spike is a residual more than Z sigma, at least RECORD x every residual of the previous WINDOW steps
    (heavy-tailed noise sets new records, but seldom far above the last one), and at least MIN_JUMP x |level|
    (a visible jump, not a 7-sigma blip of 2% noise), or 1% of the first loss for a loss near 0.
Known limit: per-batch losses that are themselves heavy-tailed (Student-t with 3 degrees of freedom, a few
very hard batches per hundred) still read as spikes now and then.
Spikes within GAP steps of each other are one finding. Critical when the gradient norm co-spikes (more than
Z sigma above its own level, same level and sigma rule, within a step): the update that followed was large.
At most MAX_FINDINGS are reported; the evidence counts all of them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import Finding, Frames, detector
from ._common import MAD_TO_SIGMA, clean_steps, healthy_grad_norm, lr_at, nice, nice_factor, num, sentence

LEVEL = 16
WINDOW = 128
WARMUP = 20
Z = 6.0
MIN_JUMP = 0.25
RECORD = 1.5
NEAR_ZERO = 0.01
GAP = 5
MAX_FINDINGS = 3


@detector
def detect(frames: Frames) -> list[Finding]:
    s = clean_steps(frames)
    if len(s) < WARMUP + 1:
        return []
    steps = s["step"].to_numpy()
    spike, z, level = _spikes(s["loss"].astype(float).reset_index(drop=True))
    idx = np.flatnonzero(spike)
    if not len(idx):
        return []
    clusters = _cluster(idx, steps)
    g = s["grad_norm"].astype(float).reset_index(drop=True)
    g_spike = (_zscore(g)[0] > Z) if g.notna().sum() > WARMUP else np.zeros(len(g), bool)
    out = []
    for first in clusters[:MAX_FINDINGS]:
        co = bool(g_spike[max(first - 1, 0): first + 2].any())
        out.append(_finding(frames, s, first, z, level, co, len(clusters)))
    return out


def _zscore(x: pd.Series):
    """Robust z of each value against the previous ones: (x - level) / sigma, with the residuals."""
    level = x.shift(1).rolling(LEVEL, min_periods=LEVEL // 2).median()
    resid = x - level
    sigma = MAD_TO_SIGMA * resid.shift(1).abs().rolling(WINDOW, min_periods=WARMUP - LEVEL // 2).median()
    z = (resid / sigma.where(sigma > 0)).to_numpy(copy=True)
    z[:WARMUP] = np.nan
    return z, resid, level


def _spikes(x: pd.Series):
    z, resid, level = _zscore(x)
    record = resid.shift(1).rolling(WINDOW, min_periods=WARMUP - LEVEL // 2).max()
    first = abs(float(x.dropna().iloc[0])) if x.notna().any() else 0.0
    big = resid > np.maximum(MIN_JUMP * level.abs(), NEAR_ZERO * first)
    spike = (z > Z) & (resid > RECORD * record.clip(lower=0)).to_numpy() & big.to_numpy()
    return np.nan_to_num(spike).astype(bool), z, level.to_numpy()


def _cluster(idx: np.ndarray, steps: np.ndarray) -> list[int]:
    firsts = [int(idx[0])]
    for a, b in zip(idx[:-1], idx[1:]):
        if steps[b] - steps[a] > GAP:
            firsts.append(int(b))
    return firsts


def _finding(frames: Frames, s: pd.DataFrame, i: int, z: np.ndarray, level: np.ndarray, co_spike: bool,
             n_spikes: int) -> Finding:
    step = int(s["step"].iloc[i])
    loss = float(s["loss"].iloc[i])
    after = s["loss"].iloc[i + 1: i + 1 + 2 * LEVEL].astype(float)
    recovered = bool(len(after) and (after <= level[i] + 0.1 * abs(level[i]) + 1e-12).any())
    message = (f"The loss jumped to {num(loss)} at step {step}, {num(loss / level[i]) if level[i] else 'inf'}x its "
               f"recent level of {num(level[i])} ({num(z[i])} sigma)"
               + (", with the gradient norm spiking too" if co_spike else ", with no jump in the gradient norm")
               + ("; it came back down." if recovered else "; it has not come back down.")
               + (f" {n_spikes} spikes in the run." if n_spikes > 1 else ""))
    return Finding("loss_spike", "", step, "critical" if co_spike else "warning", message,
                   _suggestion(frames, step, co_spike, loss / level[i] if level[i] else np.inf, n_spikes),
                   {"loss": loss, "level": float(level[i]), "z": float(z[i]), "grad_co_spike": co_spike,
                    "recovered": recovered, "spikes": n_spikes})


def _suggestion(frames: Frames, step: int, co_spike: bool, jump: float, n_spikes: int) -> str:
    clip = healthy_grad_norm(frames, before=step)
    lr = lr_at(frames, step)
    fixes = []
    if clip:
        fixes.append(f"clip with `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={num(nice(clip))})` "
                     "(the 90th percentile of the gradient norm before the spike)")
    if lr and (co_spike or n_spikes > 1):
        fixes.append(f"lower the learning rate from {num(lr)} to {num(nice(lr / nice_factor(jump, 2, 5)))}")
    n = len(frames.steps)
    if step < max(100, n // 10) and lr:
        fixes.append(f"warm the learning rate up over the first {int(max(100, nice(2 * step)))} steps")
    if not co_spike:
        fixes.append(f"the gradient did not jump, so look at the batch of step {step} first (corrupt or "
                     "mislabelled samples, an outlier, a data-order artefact)")
    return sentence(fixes) if fixes else "Inspect the batch at that step."
