"""`GradWatchCallback`: a thin adapter from Hugging Face `transformers.Trainer` to the gradwatch `Watcher`.

Needs `pip install "gradwatch[hf]"` (transformers and accelerate). Core gradwatch never imports this module.
"""
from __future__ import annotations

import os

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('gradwatch.integrations.transformers needs transformers and accelerate; '
                      'install them with: pip install "gradwatch[hf]"') from e

import torch

from ..watcher import Watcher, watch

__all__ = ["GradWatchCallback"]


class GradWatchCallback(TrainerCallback):
    """Record a `transformers.Trainer` run with gradwatch: `Trainer(..., callbacks=[GradWatchCallback(run_dir=...)])`.

    Where and in what state the gradients are read: HF Trainer has no callback event between the last
    backward of a step and its clipping (`on_pre_optimizer_step` already sees clipped grads, and accelerate
    unscales inside its clip). So the grads are read by gradwatch's own parameter hooks
    (`register_post_accumulate_grad_hook`), at the end of each backward; the reading of the last micro-batch
    of an optimizer step is kept. They are therefore **accumulated** over `gradient_accumulation_steps`,
    **not clipped** (HF clips later, inside its optimizer step), and **unscaled**: under fp16 the
    accelerate `GradScaler` is passed to gradwatch as `scaler=`, which divides by the loss scale.

    The hooks:
        on_train_begin: calls `gradwatch.watch(model, optimizer=..., run_dir=..., **options)` on every
            process, as `watch()` expects in a distributed run: the main process alone writes the store,
            and the others' statistics are merged into it. The optimizer is accelerate's wrapper; gradwatch
            hooks the torch optimizer inside it, so a step the GradScaler skips is recorded as skipped.
        on_step_end: once per optimizer step, after accumulation, clipping and `optimizer.step()`; calls
            `watcher.step(loss)`.
        on_train_end: closes the watcher with status "finished". An exception that escapes `train()` does
            not reach a callback; the watcher's atexit handler then marks the run.

    The loss: HF's `logging_nan_inf_filter` replaces NaN/inf losses in its own logs, and gradwatch must see
    them. So the callback takes the loss from the model's forward output (`outputs.loss`, detached, kept on
    its device) with a forward hook, only in training mode with grad enabled (evaluation forwards are not
    counted). With gradient accumulation the step's loss is the **mean of its micro-batches' losses**, so one
    NaN micro-batch makes the step NaN. This is the per-batch mean loss the model returned; HF's logged
    `loss` can differ from it (with accumulation, transformers 5.24 logged about `gradient_accumulation_steps`
    times this value in examples/hf_trainer_example.py). A model whose output has no `loss` (a custom
    `compute_loss`) gives steps without a loss.

    fp16 limitation: the scaler is looked up once, at `on_train_begin`, on the accelerate optimizer
    (`optimizer.scaler`, the same object as `trainer.accelerator.scaler`). Accelerate creates it when the
    `Accelerator` is built, before training begins, so it is always there for `Trainer`; a scaler swapped in
    later would not be seen. Pass `scaler=` explicitly to override.

    Args:
        run_dir: folder for the run store, as in `gradwatch.watch()`.
        **options: every other keyword of `gradwatch.watch()` (`every=`, `include=`, `config=`,
            `overwrite=`, `halt_on=`, `scaler=`, ...).
    """

    def __init__(self, run_dir: str | os.PathLike | None = None, **options):
        for bad in ("model", "optimizer"):
            if bad in options:
                raise TypeError(f"GradWatchCallback: {bad}= is taken from the Trainer; remove {bad}={options[bad]!r}")
        self.run_dir, self.options = run_dir, options
        self.watcher: Watcher | None = None
        self._hook = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0

    # ---- Trainer events --------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return
        self.close("crashed")  # a second train() on the same callback starts a fresh watcher
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        options = dict(self.options)
        if options.get("scaler") is None:
            options["scaler"] = getattr(optimizer, "scaler", None)
        self.watcher = watch(model, optimizer=inner, run_dir=self.run_dir, **options)
        self._hook = model.register_forward_hook(self._keep_loss)

    def on_step_end(self, args, state, control, **kwargs):
        if self.watcher is None:
            return
        loss = None
        if self._loss_count:
            loss = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        self.watcher.step(loss)

    def on_train_end(self, args, state, control, **kwargs):
        self.close("finished")

    # ---- internals -------------------------------------------------------------------------------
    def close(self, status: str = "finished") -> None:
        """Remove the loss hook and close the watcher with `status`. Safe to call twice."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.watcher is not None:
            watcher, self.watcher = self.watcher, None
            watcher.close(status)

    def _keep_loss(self, module, args, output) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        loss = loss.detach().reshape(()).float()  # stays on its device: no host sync here
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1
