"""Loss spikes: a step whose loss leaps far above the run's recent level.

Rule (after OLMo-core's spike check: 6 sigma over a 128-step window), on clean steps:
  - level: the median of the previous LEVEL steps (short, so a fast-falling loss is compared with where it
    is now, not where it was);
  - noise: 1.4826 x the MAD of the residuals loss - level over the previous WINDOW steps (robust to the
    spikes themselves);
  - a spike is a loss more than Z sigma above the level, above every loss of the previous LEVEL steps, and
    above the level by more than MIN_JUMP of the run's scale (max(|level|, initial loss)), so that a
    converged run's tiny wobbles do not count.
Spikes within GAP steps of each other are one finding. Critical when the gradient norm co-spikes (more than
Z sigma above its own level within a step): the update that followed was large. At most MAX_FINDINGS are
reported; the evidence counts all of them.
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
MIN_JUMP = 0.1
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
    g_spike, _, _ = _spikes(g) if g.notna().sum() > WARMUP else (np.zeros(len(g), bool), None, None)
    out = []
    for first in clusters[:MAX_FINDINGS]:
        co = bool(g_spike[max(first - 1, 0): first + 2].any())
        out.append(_finding(frames, s, first, z, level, co, len(clusters)))
    return out


def _spikes(x: pd.Series):
    prev = x.shift(1)
    level = prev.rolling(LEVEL, min_periods=LEVEL // 2).median()
    recent_max = prev.rolling(LEVEL, min_periods=LEVEL // 2).max()
    resid = x - level
    mad = (resid - resid.rolling(WINDOW, min_periods=WARMUP).median()).abs().shift(1)
    sigma = MAD_TO_SIGMA * mad.rolling(WINDOW, min_periods=WARMUP).median()
    scale = np.maximum(level.abs(), abs(float(x.dropna().iloc[0])) if x.notna().any() else 0.0)
    z = resid / sigma.where(sigma > 0)
    jump_ok = resid > MIN_JUMP * scale
    spike = (z > Z) & (x > recent_max) & jump_ok
    spike.iloc[:WARMUP] = False
    return spike.fillna(False).to_numpy(bool), z.to_numpy(), level.to_numpy()


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
    recovered = bool(len(after) and (after <= level[i] * 1.1 + 1e-12).any())
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
