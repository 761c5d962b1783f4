"""Registers gradwatch's hooks and returns their handles. No I/O and no host sync here.

Every hook is a small object that forwards to the `Recorder`. Pickled or deep-copied (`torch.save(model)`,
`copy.deepcopy(model)`), a hook turns into a no-op, so a watched model still saves and copies, and a copy
never feeds this run.
"""
from __future__ import annotations

import torch
from torch import nn

from ._model import ModelMap
from .recorder import Recorder


class _Disabled:
    """What a gradwatch hook becomes in a pickled or copied model: a hook that does nothing."""

    def __call__(self, *args, **kwargs):
        return None


class _Hook:
    """Forwards to the Recorder. An exception inside gradwatch is recorded, never raised into training."""

    def __init__(self, rec: Recorder, index: int = -1):
        self.rec, self.index = rec, index

    def __call__(self, *args):
        try:
            self.run(*args)
        except Exception as e:  # noqa: BLE001 - gradwatch must not crash the user's training
            self.rec.internal_error(e)
        return None

    def run(self, *args) -> None:
        raise NotImplementedError

    def __reduce__(self):
        return (_Disabled, ())

    def __deepcopy__(self, memo):
        return _Disabled()


class _ForwardHook(_Hook):
    """A module hook. torch.compile runs it eagerly instead of tracing into it: traced, its Python (graph
    task ids, id()-keyed caches) would split the model's graph and keep recompiling it. Parameter and
    optimizer hooks run outside compiled graphs and skip the wrapper's cost."""

    @torch.compiler.disable
    def __call__(self, *args):
        return super().__call__(*args)


class _GradReady(_Hook):
    def run(self, param):
        self.rec.on_grad_ready()


class _GradIncoming(_Hook):
    def run(self, grad):
        self.rec.on_grad_incoming(self.param)

    def __init__(self, rec: Recorder, param):
        super().__init__(rec)
        self.param = param


class _ForwardStart(_ForwardHook):
    def run(self, module, args):
        self.rec.on_forward_start(module.training, args)


class _ModuleOutput(_ForwardHook):
    def run(self, module, args, kwargs, out):
        self.rec.on_module_output(self.index, args, kwargs, out)


class _ModuleInput(_ForwardHook):
    def run(self, module, args, kwargs):
        self.rec.on_module_input(args, kwargs)


class _SafeOutput(_ForwardHook):
    """A SAFE_IN_FLOAT32 module: probed on detail steps (a weight made NaN by hand or by a checkpoint shows
    there), and whenever it computes in float16."""

    def run(self, module, args, kwargs, out):
        half = isinstance(out, torch.Tensor) and out.dtype == torch.float16
        if half:
            self.rec.half_seen = True
        if self.rec.detail or half:
            self.rec.on_module_output(self.index, args, kwargs, out)


class SafeProbes:
    """The SAFE_IN_FLOAT32 modules' output hooks, registered only for the steps that use them.

    Most steps probe none of these modules (see `_SafeOutput`), and a hook that returns at once still
    costs its module the fast call path: 5-10 us a call, a visible share of a small model's step. So they
    are registered for detail steps only, or for good once a float16 output was seen. Under torch.compile
    Dynamo does not guard on submodules' hooks and keeps calling those it compiled with, which then
    return at once as before; the root module's hook, which Dynamo does guard on, stays registered.
    """

    def __init__(self, rec: Recorder, mm: ModelMap):
        self._hooks = [(m, _SafeOutput(rec, i)) for i, (_, m) in enumerate(mm.traced) if on_demand(mm, i)]
        self._handles: list = []

    def want(self, on: bool) -> None:
        """Register the hooks (`on`) or remove them, if they are not so already."""
        if on and not self._handles:
            self._handles = [m.register_forward_hook(h, with_kwargs=True) for m, h in self._hooks]
        elif not on and self._handles:
            remove(self._handles)

    def close(self) -> None:
        self.want(False)


def on_demand(mm: ModelMap, traced: int) -> bool:
    """The traced module's output hook is SafeProbes' (registered per step), not one of install()'s."""
    return traced in mm.safe and traced != mm.root_traced


class _ActivationOutput(_ForwardHook):
    def run(self, module, args, out):
        self.rec.on_activation(self.index, args, out)


class _PassThrough(_ForwardHook):
    def run(self, module, args, out):
        self.rec.on_pass_through(args, out)


class _OptimizerPre(_Hook):
    def __init__(self, rec: Recorder, watcher):
        super().__init__(rec)
        self.watcher = watcher

    def run(self, optimizer, args, kwargs):
        self.rec.on_optimizer_step(optimizer)
        spec = self.watcher.ratio_spec_for(optimizer)
        if spec is not None:
            self.rec.snapshot(id(optimizer), spec)


class _OptimizerPost(_OptimizerPre):
    def run(self, optimizer, args, kwargs):
        spec = self.watcher.ratio_spec_for(optimizer)
        if spec is not None:
            self.rec.measure_update(id(optimizer), spec)


def install(model: nn.Module, mm: ModelMap, rec: Recorder, cfg, optimizers: list, watcher) -> list:
    """Register every hook gradwatch needs; the caller owns the returned handles."""
    handles = []
    try:
        if cfg.grad_norm:
            trainable = [p for p in mm.params if p.requires_grad]
            handles += [p.register_post_accumulate_grad_hook(_GradReady(rec)) for p in trainable]
            if trainable:  # the smallest parameter tells whether .grad was reset between steps
                sentinel = min(trainable, key=lambda p: p.numel())
                handles.append(sentinel.register_hook(_GradIncoming(rec, sentinel)))
        handles.append(model.register_forward_pre_hook(_ForwardStart(rec)))
        if cfg.activations:
            handles += [a.module.register_forward_hook(_ActivationOutput(rec, i))
                        for i, a in enumerate(mm.activations)]
        if cfg.trace_nonfinite:
            handles += [m.register_forward_hook((_SafeOutput if i in mm.safe else _ModuleOutput)(rec, i),
                                                with_kwargs=True)
                        for i, (_, m) in enumerate(mm.traced) if not on_demand(mm, i)]
            # Inputs are judged before the module runs: one that modifies them in place is still caught.
            handles += [m.register_forward_pre_hook(_ModuleInput(rec), with_kwargs=True)
                        for i, (_, m) in enumerate(mm.traced) if i not in mm.safe and i != mm.root_traced]
            handles += [m.register_forward_hook(_PassThrough(rec)) for m in mm.passing]
            if not cfg.activations:
                handles += [a.module.register_forward_hook(_PassThrough(rec)) for a in mm.activations]
        for opt in optimizers:
            handles.append(opt.register_step_pre_hook(_OptimizerPre(rec, watcher)))
            handles.append(opt.register_step_post_hook(_OptimizerPost(rec, watcher)))
    except BaseException:
        remove(handles)
        raise
    return handles


def remove(handles: list) -> None:
    """Remove every handle, even if one of them fails."""
    errors = []
    while handles:
        h = handles.pop()
        try:
            h.remove()
        except Exception as e:  # noqa: BLE001 - keep removing the others
            errors.append(e)
    if errors:
        raise errors[0]
