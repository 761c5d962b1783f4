"""What the run's meta says about the optimizer and the loss: read once, from objects and graph metadata."""
from __future__ import annotations

import torch


def describe_optimizer(opt) -> dict:
    """The optimizer's class and each param group's hyperparameters, as plain JSON values."""
    groups = [{k: _plain(v) for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
              for g in opt.param_groups]
    return {"class": type(opt).__name__, "param_groups": groups}


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 and not v.is_cuda else str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


LOSS_CHAIN_DEPTH = 8


def describe_loss(loss: torch.Tensor) -> dict:
    """The loss's autograd chain, first input first, e.g. NllLossBackward0 <- LogSoftmaxBackward0 <- ...

    Read once, from graph metadata only (no tensor data, no sync). The detectors use it to tell a
    cross-entropy over C classes (C from log_softmax's output shape) and a softmax fed into it.
    """
    chain, classes, fn = [], None, loss.grad_fn
    while fn is not None and len(chain) < LOSS_CHAIN_DEPTH:
        name = type(fn).__name__
        chain.append(name)
        if name == "LogSoftmaxBackward0" and classes is None and chain[-2:-1] == ["NllLossBackward0"]:
            classes = _softmax_size(fn)
        fn = next((f for f, _ in fn.next_functions if f is not None), None)
    return {"chain": chain, "classes": classes}


def _softmax_size(fn) -> int | None:
    try:  # private autograd metadata: absent in some torch builds, and then we do without
        shape = fn._input_metadata[0].shape
        return int(shape[fn._saved_dim])
    except Exception:  # noqa: BLE001
        return None
