"""`GradWatchCallback`: records a Lightning `Trainer.fit` run with gradwatch (a thin adapter over `Watcher`)."""
from __future__ import annotations

import os

import torch

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('gradwatch.integrations.lightning needs Lightning: pip install "gradwatch[lightning]"') from e

from .._describe import describe_loss
from ..watcher import Watcher, watch

__all__ = ["GradWatchCallback"]


class GradWatchCallback(pl.Callback):
    """Records every optimizer step of `Trainer.fit` into a gradwatch run store.

    `Trainer(callbacks=[GradWatchCallback(run_dir="runs/x")])` is `gradwatch.watch()` plus `step()` and
    `close()` at the right Lightning hooks; it has no logic of its own.

    When things happen:
        - `on_fit_start`: `gradwatch.watch(pl_module, optimizer=trainer.optimizers, run_dir=...,
          scaler=<the precision plugin's GradScaler, if any>, **options)`.
        - `on_train_batch_end`: `step(loss)` once per optimizer step, i.e. on the batches where
          `trainer.global_step` moved; with `accumulate_grad_batches=k`, once per k batches.
        - `on_fit_end`: `close("finished")`. `on_exception`: the error goes into the run's meta and the
          run closes as "crashed" (also when `halt_on` stops training with `GradwatchHalt`).

    Gradient state: gradwatch reads gradients through its own parameter hooks at the end of each
    backward. With accumulation the last micro-batch's backward sees the accumulated gradients, the same
    ones Lightning's `on_before_optimizer_step` sees. They are unscaled (divided by the GradScaler's
    scale under `precision="16-mixed"`) and not clipped: Lightning clips later, inside the optimizer
    step, so `gradient_clip_val` does not change the recorded norms. Lightning divides each
    micro-batch's loss by k before backward, so the gradients are those of the mean loss over the k
    micro-batches, exactly what the optimizer uses.

    Loss: the loss that `training_step` returned for the last micro-batch of the step, detached (Lightning
    hands callbacks a detached copy), and with automatic optimization multiplied back by k to undo
    Lightning's division, so it is the raw loss. Its autograd chain (which tells a softmax fed into
    cross-entropy, and the class count for the initial-loss check) is read once in `on_before_backward`,
    where the loss still has its graph, without Lightning's division by k.

    Distributed: the callback watches on every rank, as `gradwatch.watch()` expects; global rank 0
    alone writes the store, and the other ranks' activation, NaN and loss statistics are merged into it
    at each flush (see the README's "Distributed training").

    Args:
        run_dir: folder for the run store, as in `gradwatch.watch()`.
        **options: any other keyword of `gradwatch.watch()` (include, exclude, name, config, overwrite,
            on_finding, halt_on, every, activations, ...).
    """

    def __init__(self, run_dir: str | os.PathLike | None = None, **options) -> None:
        for taken in ("model", "optimizer", "scaler"):
            if taken in options:
                raise TypeError(f"GradWatchCallback: {taken}= is taken from the Trainer, do not pass it "
                                f"(got {taken}={options[taken]!r}).")
        self.run_dir, self.options = run_dir, options
        self.watcher: Watcher | None = None
        self._seen_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.watcher = watch(pl_module, optimizer=list(trainer.optimizers) or None, run_dir=self.run_dir,
                             scaler=scaler, **self.options)
        self._seen_step = trainer.global_step

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss) -> None:
        if self.watcher is None or not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
            return
        described = describe_loss(loss)
        if pl_module.automatic_optimization and described["chain"][:1] == ["DivBackward0"]:
            # Lightning's division by accumulate_grad_batches, which step() undoes in the recorded loss
            described["chain"] = described["chain"][1:]
        self.watcher.note_loss_graph(described)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.watcher is None or trainer.global_step == self._seen_step:
            return  # not fitting, or a micro-batch whose optimizer step is still to come
        self._seen_step = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and pl_module.automatic_optimization:
            loss = loss * trainer.accumulate_grad_batches  # undo Lightning's division by k
        self.watcher.step(loss)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.watcher is not None:
            self.watcher.close("finished")
            self.watcher = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.watcher is not None:
            watcher, self.watcher = self.watcher, None
            watcher.__exit__(type(exception), exception, exception.__traceback__)  # records the error, "crashed"
