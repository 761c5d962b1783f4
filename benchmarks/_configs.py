"""Benchmark configurations: the plain training step, gradwatch, hand-written loggers, other tools.

Every configuration is a `Config` subclass registered in `CONFIGS` (in table order). A config
owns the whole training step (`train_step`), not just a per-step hook, so that a row which
changes the loop itself (e.g. a Lightning `Trainer` path) can override `train_step` instead of
needing a new harness. Multi-process rows (DDP) cannot be interleaved inside one process; they
would need their own launcher next to `_harness.run_interleaved` and can reuse its statistics
(`_harness.summarize`).

Lifecycle: `available()` -> `attach()` once -> `train_step()` per step -> `end_block()` at the end
of every timed block, inside the timed region -> `close()`.
"""
from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

CONFIGS: dict[str, type[Config]] = {}


def register(cls: type[Config]) -> type[Config]:
    CONFIGS[cls.name] = cls
    return cls


@register
class Config:
    """The baseline: zero_grad, forward, loss, backward, optimizer step; no logging, no host sync."""

    name = "baseline"
    note = "plain training step"
    requires: tuple[str, ...] = ()  # modules that must import, else the row is skipped with a note
    ablation = False  # a row that splits gradwatch's cost by feature: run with --ablation, not by default

    @classmethod
    def available(cls) -> str | None:
        """None when usable, else why the row is skipped."""
        for mod in cls.requires:
            try:
                importlib.import_module(mod)
            except Exception as exc:  # a broken install should skip the row, not the benchmark
                return f"{mod} not importable ({type(exc).__name__}: {exc})"
        return None

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path) -> None:
        self.model, self.optimizer, self.step_idx = model, optimizer, 0

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], loss_fn) -> None:
        x, y = batch
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.after_step(loss)
        self.step_idx += 1

    def after_step(self, loss: torch.Tensor) -> None:
        pass

    def end_block(self) -> None:
        """Settle work the tool deferred to a background thread, so it is billed to this block."""

    def close(self) -> None:
        pass


@register
class Gradwatch(Config):
    """gradwatch flushes by wall time (`flush_every`, 0.5 s). Interleaving stretches the wall
    time between this row's blocks past that, so it flushes about once per block, more often
    per step than in a real run: its overhead here is an upper bound."""

    name = "gradwatch"
    note = "gradwatch.watch() defaults"
    requires = ("gradwatch",)

    def watch_config(self):
        return None

    def attach(self, model, optimizer, run_dir):
        super().attach(model, optimizer, run_dir)
        import gradwatch

        cfg = self.watch_config()
        kwargs = {} if cfg is None else {"config": cfg}
        self.gw = gradwatch.watch(model, optimizer=optimizer, run_dir=run_dir, **kwargs)

    def after_step(self, loss):
        self.gw.step(loss)

    def end_block(self):
        self.gw._wait_written()

    def close(self):
        self.gw.close()


@register
class GradwatchGrads(Gradwatch):
    name = "gradwatch-grads"
    note = "gradwatch WatchConfig.grad_norms_only()"

    def watch_config(self):
        import gradwatch

        return gradwatch.WatchConfig.grad_norms_only()


class GradwatchWithout(Gradwatch):
    """gradwatch defaults with one feature turned off: its paired difference from the `gradwatch` row
    is what that feature costs."""

    ablation = True
    off: dict[str, object] = {}

    def watch_config(self):
        import gradwatch

        return gradwatch.WatchConfig().replace(**self.off)


@register
class GradwatchNoTrace(GradwatchWithout):
    name = "gw-no-trace"
    note = "gradwatch defaults, trace_nonfinite=False (no NaN probes in forward)"
    off = {"trace_nonfinite": False}


@register
class GradwatchNoActivations(GradwatchWithout):
    name = "gw-no-act"
    note = "gradwatch defaults, activations=False (no dead-unit or fraction reads)"
    off = {"activations": False}


@register
class GradwatchNoDetail(GradwatchWithout):
    name = "gw-no-detail"
    note = "gradwatch defaults, no detail steps (weight norm, max-abs, update ratio, fractions)"
    off = {"detail_every": 10**9}


def _noop(*args, **kwargs) -> None:
    return None


@register
class NoOpHooks(Config):
    """The price of Python hooks alone: a no-op hook at each place where `gradwatch.hooks.install` puts
    one by default, found by gradwatch's own `map_model` (output and input hooks of the traced modules,
    activation and pass-through output hooks, a post-accumulate hook per trainable parameter and the
    sentinel's tensor hook, the optimizer's pre and post hooks)."""

    name = "no-op-hooks"
    note = "hand-written: no-op Python hooks where gradwatch's default install registers its hooks"
    ablation = True

    def attach(self, model, optimizer, run_dir):
        super().attach(model, optimizer, run_dir)
        from gradwatch._model import map_model
        from gradwatch.hooks import on_demand

        mm = map_model(model, None, None)
        model.register_forward_pre_hook(_noop)
        for i, (_, m) in enumerate(mm.traced):
            if not on_demand(mm, i):
                m.register_forward_hook(_noop, with_kwargs=True)
            if i not in mm.safe and i != mm.root_traced:
                m.register_forward_pre_hook(_noop, with_kwargs=True)
        for m in [a.module for a in mm.activations] + mm.passing:
            m.register_forward_hook(_noop)
        trainable = [p for p in mm.params if p.requires_grad]
        for p in trainable:
            p.register_post_accumulate_grad_hook(_noop)
        if trainable:
            min(trainable, key=lambda p: p.numel()).register_hook(_noop)
        optimizer.register_step_pre_hook(_noop)
        optimizer.register_step_post_hook(_noop)


def _layers(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters grouped by the module that owns them directly: one group per 'layer'."""
    groups = [[p for p in m.parameters(recurse=False) if p.requires_grad] for m in model.modules()]
    return [g for g in groups if g]


@register
class Floor(Config):
    """The cheapest sensible per-layer grad-norm logger: everything stays on the device, one
    batched norm kernel per step, and the host sees the data once per `FLUSH_EVERY` steps."""

    name = "floor"
    note = "hand-written: _foreach_norm -> device buffer, .cpu() every 100 steps"
    FLUSH_EVERY = 100

    def attach(self, model, optimizer, run_dir):
        super().attach(model, optimizer, run_dir)
        layers = _layers(model)
        self.params = [p for group in layers for p in group]
        device = self.params[0].device
        # Maps each parameter's norm to its layer, so the per-layer norm is one index_add.
        self.owner = torch.tensor([i for i, g in enumerate(layers) for _ in g], device=device)
        self.n_layers = len(layers)
        # Last column holds the loss, like gradwatch-grads records it.
        self.buf = torch.zeros(self.FLUSH_EVERY, self.n_layers + 1, device=device)
        self.history: list[torch.Tensor] = []

    def after_step(self, loss):
        row = self.step_idx % self.FLUSH_EVERY
        norms = torch._foreach_norm([p.grad for p in self.params])
        squares = torch.stack(norms).square()
        per_layer = torch.zeros(self.n_layers, device=squares.device).index_add_(0, self.owner, squares)
        self.buf[row, : self.n_layers] = per_layer.sqrt()
        self.buf[row, self.n_layers] = loss.detach()
        if row == self.FLUSH_EVERY - 1:
            # copy=True: on CPU .cpu() would alias the buffer that the next steps overwrite.
            self.history.append(self.buf.to("cpu", copy=True))


@register
class NaiveItem(Config):
    """What a first attempt looks like: one host sync per parameter per step."""

    name = "naive-item"
    note = "hand-written: p.grad.norm().item() per parameter per step, Python list"

    def attach(self, model, optimizer, run_dir):
        super().attach(model, optimizer, run_dir)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.log: list[tuple[int, str, float]] = []

    def after_step(self, loss):
        self.log.append((self.step_idx, "loss", loss.item()))
        for name, p in self.named:
            self.log.append((self.step_idx, name, p.grad.norm().item()))


@register
class WandbWatch(Config):
    """wandb.watch gradient histograms plus wandb.log of the loss, offline, as a user would.

    wandb writes from its separate wandb-core service process: that work and memory are not in
    this row's numbers, except as competition for the same CPUs during every row's blocks."""

    name = "wandb"
    LOG_FREQ = 100
    note = f"wandb.watch(log='gradients', log_freq={LOG_FREQ}) + wandb.log(loss.item()), offline"
    requires = ("wandb",)

    def attach(self, model, optimizer, run_dir):
        super().attach(model, optimizer, run_dir)
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_SILENT"] = "true"
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="gradwatch-overhead", dir=str(run_dir), mode="offline")
        wandb.watch(model, log="gradients", log_freq=self.LOG_FREQ)

    def after_step(self, loss):
        self.wandb.log({"loss": loss.item()})

    def close(self):
        self.run.finish()


class _TensorBoard(Config):
    requires = ("tensorboard", "torch.utils.tensorboard")
    EVERY = 1

    def attach(self, model, optimizer, run_dir):
        super().attach(model, optimizer, run_dir)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def after_step(self, loss):
        if self.step_idx % self.EVERY == 0:
            for name, p in self.named:
                self.writer.add_histogram(f"grad/{name}", p.grad, self.step_idx)

    def end_block(self):
        self.writer.flush()  # its event-writer thread would otherwise run during other rows' blocks

    def close(self):
        self.writer.close()


@register
class TensorBoardEveryStep(_TensorBoard):
    name = "tb-hist@1"
    note = "SummaryWriter.add_histogram of every grad, every step"


@register
class TensorBoardEvery100(_TensorBoard):
    name = "tb-hist@100"
    EVERY = 100
    note = "SummaryWriter.add_histogram of every grad, every 100 steps"


@register
class Torchmortem(Config):
    """torchmortem.Autopsy as its README shows: attach, step(loss=loss.item()), detach."""

    name = "torchmortem"
    note = "torchmortem Autopsy(model, optimizer) default 'balanced' sampling, step(loss=loss.item())"
    requires = ("torchmortem",)

    def attach(self, model, optimizer, run_dir):
        super().attach(model, optimizer, run_dir)
        from torchmortem import Autopsy

        # Its hook on the first layer fires on every backward (the input needs no grad); the
        # warning is harmless and would otherwise clutter the table.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        self.autopsy = Autopsy(model, optimizer=optimizer)
        self.autopsy.attach()

    def after_step(self, loss):
        self.autopsy.step(loss=loss.item())

    def close(self):
        # detach() runs the analysis; without it an atexit hook writes a crash report into cwd.
        self.autopsy.detach()
