"""Mixed precision: a GradScaler that skips step after step.

A GradScaler starts high (65536 by default) and halves its scale at each overflow, skipping that step;
a handful of skips at the start, and an isolated one later, are it finding its scale. A finding when:
  - a run of at least MAX_RUN consecutive skipped steps happens after the first SEARCH steps, or
  - more than MAX_SHARE of the steps after SEARCH were skipped, once there are MIN_STEPS of them (a scaler
    still searching at step 21 is not yet a pattern).
Critical when the scale fell below 1 (the gradients overflow even unscaled) or most steps were skipped.
"""
from __future__ import annotations

import numpy as np

from . import Finding, Frames, detector
from ._common import num, pct, scaler_in_use, true_runs

SEARCH = 20  # steps the scaler may spend finding its scale
MAX_RUN = 5
MAX_SHARE = 0.1
MIN_STEPS = 20  # steps after SEARCH before the share rule applies


@detector
def detect(frames: Frames) -> list[Finding]:
    s = frames.steps
    if not scaler_in_use(frames.meta) or s.empty or not s["skipped"].fillna(False).any():
        return []
    late = s[s["step"] >= s["step"].iloc[0] + SEARCH]
    skipped = late["skipped"].fillna(False).to_numpy(bool)
    if not len(skipped):
        return []
    runs = [(a, b) for a, b in true_runs(skipped) if b - a + 1 >= MAX_RUN]
    share = float(skipped.mean())
    if not runs and (share <= MAX_SHARE or len(skipped) < MIN_STEPS):
        return []
    first = runs[0][0] if runs else int(np.flatnonzero(skipped)[0])
    step = int(late["step"].iloc[first])
    scale = s["loss_scale"].dropna()
    low = float(scale.min()) if len(scale) else None
    critical = (low is not None and low < 1.0) or share > 0.5
    longest = max((b - a + 1 for a, b in runs), default=1)
    message = (f"The GradScaler skipped {pct(share)} of the optimizer steps after its first {SEARCH}, up to "
               f"{longest} in a row, starting at step {step}; the loss scale went down to {num(low)}.")
    suggestion = ("The fp16 gradients overflow at almost any scale: look for a layer whose activations "
                  "exceed 65504 in fp16 (attention logits, an unnormalised sum), keep it in float32 under "
                  "`torch.autocast(device_type, enabled=False)`, or train in bfloat16, which has float32's range.")
    return [Finding("amp_overflow", "", step, "critical" if critical else "warning", message, suggestion,
                    {"skipped_share": share, "longest_run": longest, "min_loss_scale": low})]
