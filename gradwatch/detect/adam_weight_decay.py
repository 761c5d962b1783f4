"""Adam with weight_decay > 0, where AdamW is meant.

torch.optim.Adam adds weight_decay * w to the gradient, which Adam then divides by its running RMS: the
decay is strong for parameters with small gradients and weak for the rest, which is L2 regularisation,
not weight decay. AdamW (Loshchilov & Hutter 2019) decays the weights directly. A warning for each Adam
optimizer with a param group whose weight_decay is > 0 and not decoupled.
"""
from __future__ import annotations

from . import Finding, Frames, detector
from ._common import num


@detector
def detect(frames: Frames) -> list[Finding]:
    out = []
    for i, opt in enumerate(frames.meta.get("optimizer") or []):
        if opt.get("class") != "Adam":
            continue
        groups = [g for g in opt.get("param_groups", []) if (g.get("weight_decay") or 0) > 0
                  and not g.get("decoupled_weight_decay")]
        if not groups:
            continue
        wd, lr = groups[0]["weight_decay"], groups[0].get("lr")
        which = f"optimizer {i} (Adam)" if len(frames.meta["optimizer"]) > 1 else "the optimizer (Adam)"
        message = (f"{which} uses weight_decay={num(wd)}: Adam folds it into the gradient and rescales it, so "
                   "parameters with large gradients are barely decayed (L2 regularisation, not weight decay).")
        suggestion = (f"Use `torch.optim.AdamW(model.parameters(), lr={num(lr)}, weight_decay=...)`: AdamW's decay "
                      "is applied as lr x weight_decay per step, so re-tune it; 0.01 (its default) to 0.1 is the "
                      "usual range.")
        step = int(frames.steps["step"].iloc[0]) if len(frames.steps) else 0
        out.append(Finding("adam_weight_decay", "", step, "warning", message, suggestion,
                           {"weight_decay": wd, "lr": lr}))
    return out
