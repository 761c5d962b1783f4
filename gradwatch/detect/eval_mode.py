"""The model left in eval() mode while it trains.

The recorder flags a step when a forward pass with gradients on ran while the model was in eval() mode
(`steps.eval_mode`). A validation pass without torch.no_grad() flags one step now and then; the bug is a
run of them: at least MIN_RUN consecutive flagged steps (or every step of a shorter run). A warning when
the model has Dropout or BatchNorm-type modules, which behave differently in eval mode; otherwise an info
note, since eval() changes nothing yet.
"""
from __future__ import annotations

import re

from . import Finding, Frames, detector
from ._common import modules, true_runs

MIN_RUN = 5
MODE_DEPENDENT = re.compile(r"Dropout|BatchNorm|InstanceNorm|RReLU")


@detector
def detect(frames: Frames) -> list[Finding]:
    s = frames.steps
    if s.empty or not s["eval_mode"].any():
        return []
    flagged = s["eval_mode"].to_numpy(bool)
    need = min(MIN_RUN, len(flagged))
    run = next(((a, b) for a, b in true_runs(flagged) if b - a + 1 >= need), None)
    if run is None:
        return []
    a, b = run
    step = int(s["step"].iloc[a])
    affected = sorted({t for _, t in modules(frames) if MODE_DEPENDENT.search(t)})
    effect = (f"; its {', '.join(affected)} modules behave as at inference (Dropout off, BatchNorm using running "
              "statistics instead of the batch's)" if affected else "; it has no Dropout or BatchNorm, so "
              "nothing changes yet")
    message = (f"The model was in eval() mode during {b - a + 1} consecutive training steps from step {step} "
               f"({int(flagged.sum())} of {len(flagged)} steps){effect}.")
    suggestion = ("Call `model.train()` at the start of every training epoch, after any evaluation that called "
                  "`model.eval()`, and run evaluation under `torch.no_grad()`.")
    return [Finding("eval_mode", "", step, "warning" if affected else "info", message, suggestion,
                    {"steps": int(flagged.sum()), "modules": affected})]
