"""Checks of `watch()`'s arguments, each failing with the argument, the value and the fix."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from .errors import GradwatchError
from .store.schema import DB_NAME


def check_watch_args(model, optimizer, scaler, include, exclude):
    if not isinstance(model, nn.Module):
        raise TypeError(f"watch: model must be a torch.nn.Module, got {type(model).__name__}. "
                        "Pass the model you train, e.g. gradwatch.watch(model, optimizer=opt).")
    if not any(True for _ in model.parameters()):
        raise GradwatchError(f"watch: model ({type(model).__name__}) has no parameters, so there is nothing "
                             "to watch. Pass the module that owns the trained weights.")
    optimizers = _as_optimizers(optimizer)
    model_params = {id(p) for p in model.parameters()}
    for opt in optimizers:
        held = [p for g in opt.param_groups for p in g["params"]]
        if not any(id(p) in model_params for p in held):
            raise GradwatchError(
                f"watch: optimizer ({type(opt).__name__} over {len(held)} tensors) holds none of the model's "
                "parameters. Pass the optimizer built from this model, e.g. torch.optim.Adam(model.parameters())."
            )
    if scaler is not None and not (hasattr(scaler, "is_enabled") and hasattr(scaler, "scale")):
        raise TypeError(f"watch: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    return optimizers, _patterns("include", include), _patterns("exclude", exclude)


def _as_optimizers(optimizer) -> list:
    if optimizer is None:
        return []
    opts = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for opt in opts:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"watch: optimizer must be a torch.optim.Optimizer, a list of them, or None, got "
                            f"{type(opt).__name__}. For a hand-written update, leave optimizer out.")
    return opts


def _patterns(arg: str, value) -> list[str] | None:
    if value is None:
        return None
    pats = [value] if isinstance(value, str) else value
    if not isinstance(pats, (list, tuple)) or not all(isinstance(p, str) for p in pats):
        raise TypeError(f"watch: {arg} must be a glob pattern or a list of them, got {arg}={value!r}")
    return list(pats)


def prepare_run_dir(run_dir, name: str | None, overwrite: bool) -> Path:
    """Create the run folder, or fail now, before any training, with the reason."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"watch: name must be a str, got name={name!r} ({type(name).__name__}); it names "
                        "runs/<name> when run_dir is not given.")
    if name is not None and (not name or "/" in name or name in (".", "..")):
        raise GradwatchError(f"watch: name must be a non-empty folder name without '/', got name={name!r}.")
    if run_dir is None:
        base = Path("runs") / (name or time.strftime("%Y%m%d-%H%M%S"))
        path, n = base, 1
        while (path / DB_NAME).exists():
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
    elif isinstance(run_dir, (str, os.PathLike)):
        path = Path(run_dir)
    else:
        raise TypeError(f"watch: run_dir must be a path (str or os.PathLike), got {type(run_dir).__name__}")
    if (path / DB_NAME).exists():
        if not overwrite:
            raise GradwatchError(f"watch: run_dir={str(path)!r} already holds a run. Pass a new folder, "
                                 "or overwrite=True to replace it.")
        for suffix in ("", "-wal", "-shm"):
            (path / (DB_NAME + suffix)).unlink(missing_ok=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".gradwatch-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise GradwatchError(f"watch: run_dir={str(path)!r} cannot be written ({e.strerror or e}). "
                             "Pass a folder you can write to.") from None
    return path



