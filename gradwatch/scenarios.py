"""Labelled training scenarios, healthy and faulty, that train for real under `gradwatch.watch()`.

Each scenario plants one known bug (or none) in a small model that trains in about a second on a CPU.
`run_scenario()` returns raw measurements taken by the training loop itself with plain torch (losses,
per-layer gradient norms from a naive loop over parameters, fractions counted by our own hooks), so a
test can check that the pathology is real without trusting gradwatch's detectors.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .watcher import watch


@dataclass(frozen=True)
class Expect:
    """A finding that a faulty scenario must produce, at severity warning or critical."""

    kind: str  # the finding's kind, e.g. "dead_relu"
    layer: str | None  # qualified module name the finding must name; None: run-wide, or not checked
    onset: int  # step at which the pathology starts, to measure detection delay


@dataclass(frozen=True)
class Scenario:
    """One labelled run: a model, a planted bug (or none) and the findings it must produce."""

    name: str
    model: str  # "mlp" | "cnn" | "transformer" | "lstm"
    description: str  # one line: what is wrong, or "healthy: ..."
    expect: tuple[Expect, ...]  # empty for healthy scenarios
    steps: int  # optimizer steps, i.e. rows in the run's `steps` frame

    @property
    def healthy(self) -> bool:
        return not self.expect


SCENARIOS: dict[str, Scenario] = {}
_BUILDERS: dict[str, Callable[[_Ctx], dict]] = {}


def run_scenario(name: str, run_dir: str | os.PathLike, seed: int = 0, **watch_options) -> dict:
    """Train scenario `name` into `run_dir` under `gradwatch.watch()`.

    Args:
        name: a key of `SCENARIOS`.
        run_dir: folder for the run store (passed to `watch()`).
        seed: seeds the model's initialisation and the data; a run is deterministic given it.
        **watch_options: more keywords for `watch()`, e.g. `overwrite=True` or `detail_every=1`.

    Returns:
        Raw measurements taken by the loop itself, independent of gradwatch: `loss` (per step),
        `grad_norm` (global, before clipping), `layer_grad_norm` (layer -> per step, NaN where the layer
        had no gradient), `lr`, `loss_first`, `loss_last` (mean of the last 10 finite losses), and the
        scenario's own evidence (e.g. `dead_fraction`, `clip_fraction`).
    """
    if name not in SCENARIOS:
        raise KeyError(f"run_scenario: unknown scenario name={name!r}; choose one of {list(SCENARIOS)}")
    with torch.random.fork_rng(devices=[]), _one_thread():  # the caller's RNG and threads are restored
        torch.manual_seed(seed)
        ctx = _Ctx(SCENARIOS[name].steps, torch.Generator().manual_seed(seed), run_dir, watch_options)
        raw = _BUILDERS[name](ctx)
    finite = [v for v in raw["loss"] if math.isfinite(v)]
    raw["loss_first"] = raw["loss"][0]
    raw["loss_last"] = sum(finite[-10:]) / max(len(finite[-10:]), 1)
    return raw


@contextlib.contextmanager
def _one_thread():
    """Intra-op parallelism cannot pay on models this small. With one thread, the float results do not
    depend on the core count, and a run stays ~0.5 s when other processes share the cores (measured on
    2 busy cores: healthy_mlp 0.4 s on one thread, 9.6 s on two, whose workers wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _scenario(name: str, model: str, description: str, steps: int, *expect: Expect):
    def register(fn: Callable[[_Ctx], dict]) -> Callable[[_Ctx], dict]:
        SCENARIOS[name] = Scenario(name, model, description, tuple(expect), steps)
        _BUILDERS[name] = fn
        return fn
    return register


# ---- the one training loop -----------------------------------------------------------------------
_Batch = Callable[[int], tuple]  # step -> (inputs, targets); each call draws a fresh batch


class _Ctx:
    """What a scenario gets: its seeded data generator and the loop to train with."""

    def __init__(self, steps: int, g: torch.Generator, run_dir, options: dict):
        self.steps, self.g, self.run_dir, self.options = steps, g, run_dir, options
        self.step = 0  # the optimizer step in progress, read by the scenarios' measuring hooks

    def train(self, model: nn.Module, opt, batch: _Batch, loss_fn=F.cross_entropy, *, sched=None,
              clip: float | None = None, accum: int = 1, zero_grad: bool = True, lr: float | None = None,
              hooks: tuple = ()) -> dict:
        """Train `model` for `self.steps` optimizer steps under gradwatch; every bug is a keyword.

        Args:
            opt: an optimizer, or None to update by hand (`p -= lr * p.grad`, then `p.grad = None`).
            clip: `clip_grad_norm_` max_norm; the raw result gets `clip_fraction`, the share of steps
                whose norm was above it.
            accum: micro-batches per optimizer step (each loss divided by `accum`).
            zero_grad: False plants the missing-`zero_grad()` bug.
            hooks: (module, forward_hook) pairs of the scenario's own measurements, removed at the end.
        """
        layers = {name or "(root)": [p for p in m.parameters(recurse=False) if p.requires_grad]
                  for name, m in model.named_modules()}
        layers = {name: ps for name, ps in layers.items() if ps}  # trainable layers, named as gradwatch does
        raw: dict = {"loss": [], "grad_norm": [], "lr": [], "layer_grad_norm": {n: [] for n in layers}}
        clipped = 0
        handles = [m.register_forward_hook(h) for m, h in hooks]
        try:
            with watch(model, optimizer=opt, run_dir=self.run_dir, **self.options) as gw:
                for step in range(self.steps):
                    self.step = step
                    if zero_grad and opt is not None:
                        opt.zero_grad()
                    losses = [_backward(model, batch(step), loss_fn, accum) for _ in range(accum)]
                    # gw.step gets the loss tensor itself, as in a plain loop (its graph names the loss
                    # function); with accumulation, the step's total
                    loss = losses[0] if accum == 1 else torch.stack([v.detach() for v in losses]).sum()
                    norms = _layer_grad_norms(layers)
                    total = math.sqrt(sum(v * v for v in norms.values() if v is not None))
                    if clip is not None:
                        clipped += total > clip
                        nn.utils.clip_grad_norm_(model.parameters(), clip)
                    if opt is None:
                        _manual_sgd(model, lr)
                    else:
                        raw["lr"].append(opt.param_groups[0]["lr"])
                        opt.step()
                    if sched is not None:
                        sched.step()
                    gw.step(loss)
                    raw["loss"].append(float(loss.detach()))
                    raw["grad_norm"].append(total)
                    for name, v in norms.items():
                        raw["layer_grad_norm"][name].append(math.nan if v is None else v)
        finally:
            for h in handles:
                h.remove()
        if clip is not None:
            raw["clip_fraction"] = clipped / self.steps
        return raw


def _backward(model: nn.Module, xy: tuple, loss_fn, accum: int) -> torch.Tensor:
    """One micro-batch: forward, loss (divided by `accum` when accumulating), backward; returns that loss."""
    x, y = xy
    loss = loss_fn(model(x), y)
    if accum > 1:
        loss = loss / accum
    loss.backward()
    return loss


def _layer_grad_norms(layers: dict[str, list[nn.Parameter]]) -> dict[str, float | None]:
    """Per-layer L2 norm of the gradients in float64 (no overflow), None for a layer with no gradient."""
    norms = {name: [p.grad.detach().double().norm() for p in ps if p.grad is not None]
             for name, ps in layers.items()}
    have = [name for name, ns in norms.items() if ns]
    if not have:
        return dict.fromkeys(layers)
    values = torch.stack([torch.linalg.vector_norm(torch.stack(norms[name])) for name in have]).tolist()
    return dict(zip(have, values)) | {name: None for name in layers if not norms[name]}


@torch.no_grad()
def _manual_sgd(model: nn.Module, lr: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p -= lr * p.grad
            p.grad = None


# ---- data (in memory, from the scenario's seeded generator) --------------------------------------
def _blobs(g: torch.Generator, n: int = 2048, dim: int = 20, classes: int = 10) -> tuple:
    """Gaussian blobs: `classes` centres 2 apart per axis on average, unit noise. Separable, not trivially."""
    centres = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def _images(g: torch.Generator, n: int = 1024, classes: int = 4, size: int = 12) -> tuple:
    """One random 1-channel template per class, plus noise of the same scale."""
    templates = torch.randn(classes, 1, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return templates[y] + torch.randn(n, 1, size, size, generator=g), y


def _sequences(g: torch.Generator, n: int = 1024, length: int = 12, dim: int = 4) -> tuple:
    """Label: the sign of the running sum of feature 0, so the LSTM must carry state to the end."""
    x = torch.randn(n, length, dim, generator=g)
    return x, (x[:, :, 0].sum(1) > 0).long()


def _sampler(x: torch.Tensor, y: torch.Tensor, size: int, g: torch.Generator,
             corrupt: Callable | None = None) -> _Batch:
    """Random mini-batches; `corrupt(step, x, y) -> (x, y)` plants a data bug at chosen steps."""
    def batch(step: int) -> tuple:
        idx = torch.randint(0, len(x), (size,), generator=g)
        xb, yb = x[idx], y[idx]
        return corrupt(step, xb.clone(), yb.clone()) if corrupt else (xb, yb)
    return batch


def _tokens(g: torch.Generator, vocab: int, length: int, size: int) -> _Batch:
    """Copy-shift task: predict the previous token (tokens 1..vocab-1; 0 is padding)."""
    def batch(step: int) -> tuple:
        t = torch.randint(1, vocab, (size, length), generator=g)
        return t, t.roll(1, dims=1)
    return batch


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1))


# ---- models --------------------------------------------------------------------------------------
class _Net(nn.Module):
    """A plain stack, named `net.0`, `net.1`, ... so that findings name real modules."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU, *tail: nn.Module) -> _Net:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(sizes) - 2 else [])
    return _Net(*layers, *tail)


def _cnn(classes: int = 4, bn: bool = True, dropout: float = 0.0) -> _Net:
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return _Net(nn.Conv2d(1, 8, 3, padding=1), norm(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), norm(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Dropout(dropout), nn.Linear(16, classes))


class _TinyLM(nn.Module):
    """Token + position embeddings, a 1-layer TransformerEncoder, a linear head. Token 0 is padding."""

    def __init__(self, vocab: int = 16, length: int = 8, d: int = 32):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos(torch.arange(tokens.shape[1]))
        return self.head(self.enc(h, src_key_padding_mask=tokens == 0))


class _AttentionLM(nn.Module):
    """Embeddings, one residual nn.MultiheadAttention block, a linear head. Token 0 is padding.

    Called directly, MultiheadAttention returns the attention weights by default (need_weights=True),
    which takes the plain softmax path: a query whose keys are all masked gets softmax(all -inf) = NaN.
    (TransformerEncoder passes need_weights=False, whose fused path returns zeros there instead.)
    """

    def __init__(self, vocab: int = 16, length: int = 8, d: int = 32):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.attn = nn.MultiheadAttention(d, num_heads=4, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos(torch.arange(tokens.shape[1]))
        a, _ = self.attn(h, h, h, key_padding_mask=tokens == 0)
        return self.head(h + a)


class _LSTMNet(nn.Module):
    """LSTM over the sequence, linear head on the last hidden state."""

    def __init__(self, dim: int = 4, hidden: int = 32, classes: int = 2, detach: bool = False):
        super().__init__()
        self.lstm, self.head = nn.LSTM(dim, hidden, batch_first=True), nn.Linear(hidden, classes)
        self.detach = detach

    def forward(self, x):
        h = self.lstm(x)[0][:, -1]
        return self.head(h.detach() if self.detach else h)


class _Standardize(nn.Module):
    """Per-sample standardisation: 0/0 = NaN for a constant row."""

    def forward(self, x):
        return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)


def _adam(model: nn.Module, lr: float = 1e-3, **kw) -> torch.optim.Adam:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, **kw)


def _mlp_run(ctx: _Ctx, model: nn.Module | None = None, opt=None, corrupt=None, size: int = 64,
             **train_kw) -> dict:
    """The shared blob-classification setup: 10 classes, 20 features, batches of 64, Adam 1e-3 by default."""
    x, y = _blobs(ctx.g)
    model = model if model is not None else _mlp([20, 64, 64, 10])
    opt = opt if opt is not None else _adam(model)
    return ctx.train(model, opt, _sampler(x, y, size, ctx.g, corrupt), **train_kw)


# ---- our own measuring hooks -----------------------------------------------------------------------
class _EverPositive:
    """Forward hook: which units (dim 1: features or channels) were ever positive, over the whole run."""

    def __init__(self):
        self.fired: torch.Tensor | None = None

    def __call__(self, module, inputs, out):
        dims = [d for d in range(out.dim()) if d != 1]
        now = (out.detach() > 0).any(dim=dims) if dims else out.detach() > 0
        self.fired = now if self.fired is None else self.fired | now

    @property
    def dead_fraction(self) -> float:
        return 1.0 - float(self.fired.float().mean())


class _FirstNonfinite:
    """Forward hook: the steps at which the module turned finite inputs into a non-finite output."""

    def __init__(self, ctx: _Ctx):
        self.ctx, self.steps = ctx, []

    def __call__(self, module, inputs, out):
        out = out[0] if isinstance(out, tuple) else out  # MultiheadAttention returns (output, weights)
        if inputs[0].isfinite().all() and not out.isfinite().all():
            self.steps.append(self.ctx.step)

    @property
    def first(self) -> int:
        return self.steps[0] if self.steps else -1


class _Beyond:
    """Forward hook: per call, the share of the module's inputs whose magnitude is above `threshold`."""

    def __init__(self, threshold: float):
        self.threshold, self.fractions = threshold, []

    def __call__(self, module, inputs, out):
        self.fractions.append(float((inputs[0].detach().abs() > self.threshold).float().mean()))


# ---- healthy -------------------------------------------------------------------------------------
@_scenario("healthy_mlp", "mlp", "healthy: ReLU MLP on 10 Gaussian blobs, Adam 1e-3", 200)
def _healthy_mlp(ctx: _Ctx) -> dict:
    return _mlp_run(ctx)


@_scenario("healthy_cnn", "cnn", "healthy: CNN with BatchNorm + ReLU on noisy templates, SGD momentum 0.9", 120)
def _healthy_cnn(ctx: _Ctx) -> dict:
    x, y = _images(ctx.g)
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return ctx.train(model, opt, _sampler(x, y, 32, ctx.g))


def _warmup_cosine(opt, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@_scenario("healthy_transformer", "transformer",
           "healthy: tiny TransformerEncoder on a copy-shift task, AdamW, 20-step warmup + cosine", 150)
def _healthy_transformer(ctx: _Ctx) -> dict:
    model = _TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return ctx.train(model, opt, _tokens(ctx.g, 16, 8, 32), _lm_loss, sched=_warmup_cosine(opt, 20, ctx.steps))


@_scenario("healthy_lstm_clipped", "lstm",
           "healthy: LSTM sequence classifier, clip_grad_norm_ active on most steps", 150)
def _healthy_lstm_clipped(ctx: _Ctx) -> dict:
    x, y = _sequences(ctx.g)
    model = _LSTMNet()
    return ctx.train(model, _adam(model, 1e-2), _sampler(x, y, 32, ctx.g), clip=0.1)


@_scenario("healthy_sigmoid_bce", "mlp",
           "healthy: MLP + Sigmoid + BCELoss trained until confident (output sigmoid saturated on purpose)", 200)
def _healthy_sigmoid_bce(ctx: _Ctx) -> dict:
    x, y = _blobs(ctx.g, classes=2)
    model = _mlp([20, 32, 1], nn.ReLU, nn.Sigmoid())
    beyond = _Beyond(5.0)
    raw = ctx.train(model, _adam(model, 1e-2), _sampler(x, y.float()[:, None], 64, ctx.g), nn.BCELoss(),
                    hooks=((model.net[-1], beyond),))
    raw["sigmoid_beyond_5_first"], raw["sigmoid_beyond_5_last"] = beyond.fractions[0], beyond.fractions[-1]
    return raw


@_scenario("healthy_converged", "mlp",
           "healthy: noise-free linear regression that converges, then stays flat for most of the run", 300)
def _healthy_converged(ctx: _Ctx) -> dict:
    x = torch.randn(256, 16, generator=ctx.g)
    y = x @ torch.randn(16, 4, generator=ctx.g)
    model = _Net(nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the loss is about 0.5 |w - w*|^2: contracts ~0.7 a step
    return ctx.train(model, opt, lambda step: (x, y), F.mse_loss)


@_scenario("healthy_early", "mlp", "healthy: a short run stopped while the loss still falls fast", 40)
def _healthy_early(ctx: _Ctx) -> dict:
    return _mlp_run(ctx)


@_scenario("healthy_accum", "mlp", "healthy: gradient accumulation over 4 micro-batches of 16, Adam", 100)
def _healthy_accum(ctx: _Ctx) -> dict:
    return _mlp_run(ctx, size=16, accum=4)


@_scenario("healthy_manual_sgd", "mlp", "healthy: no optimizer object, p -= lr * p.grad then p.grad = None", 150)
def _healthy_manual_sgd(ctx: _Ctx) -> dict:
    x, y = _blobs(ctx.g)
    return ctx.train(_mlp([20, 64, 64, 10]), None, _sampler(x, y, 64, ctx.g), lr=0.05)


@_scenario("healthy_frozen", "mlp", "healthy: fine-tuning with the first layer frozen (requires_grad=False)", 150)
def _healthy_frozen(ctx: _Ctx) -> dict:
    model = _mlp([20, 64, 64, 10])
    frozen = model.net[0].requires_grad_(False)
    before = frozen.weight.detach().clone()
    raw = _mlp_run(ctx, model)
    raw["frozen_weight_change"] = float((frozen.weight - before).abs().max())
    return raw


@_scenario("healthy_dropout", "mlp", "healthy: Dropout(0.5) in train mode, SGD momentum: a noisy but falling loss", 200)
def _healthy_dropout(ctx: _Ctx) -> dict:
    model = _mlp([20, 64, 64, 10], nn.ReLU)
    model.net.insert(4, nn.Dropout(0.5))
    return _mlp_run(ctx, model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9))


@_scenario("healthy_tanh", "mlp", "healthy: Tanh MLP with Xavier init: tanh inputs mostly in the linear range", 150)
def _healthy_tanh(ctx: _Ctx) -> dict:
    model = _mlp([20, 64, 64, 10], nn.Tanh)
    for layer in model.net[::2]:
        nn.init.xavier_uniform_(layer.weight)
    beyond = _Beyond(2.5)
    raw = _mlp_run(ctx, model, hooks=((model.net[1], beyond),))
    raw["tanh_beyond_2_5_first"], raw["tanh_beyond_2_5_last"] = beyond.fractions[0], beyond.fractions[-1]
    return raw


@_scenario("healthy_step_lr", "cnn", "healthy: StepLR divides the LR by 10 at step 60; the loss drops, then flattens",
           120)
def _healthy_step_lr(ctx: _Ctx) -> dict:
    x, y = _images(ctx.g)
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=60, gamma=0.1)
    return ctx.train(model, opt, _sampler(x, y, 32, ctx.g), sched=sched)


# ---- faulty --------------------------------------------------------------------------------------
@_scenario("exploding_gradients", "mlp",
           "deep Tanh MLP regression, no clipping; at step 60 MultiStepLR(gamma=20), meant 1/20, makes SGD diverge",
           70, Expect("exploding_gradients", None, 60))
def _exploding_gradients(ctx: _Ctx) -> dict:
    x = torch.randn(1024, 16, generator=ctx.g)
    y = torch.tanh(x @ torch.randn(16, 8, generator=ctx.g) / 4) @ torch.randn(8, 1, generator=ctx.g)
    model = _mlp([16, 64, 64, 64, 64, 64, 1], nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[60], gamma=20.0)
    return ctx.train(model, opt, _sampler(x, y, 64, ctx.g), F.mse_loss, sched=sched)


@_scenario("vanishing_gradients", "mlp", "12 Linear layers with Sigmoid activations: the first layer gets ~no gradient",
           100, Expect("vanishing_gradients", "net.0", 0))
def _vanishing_gradients(ctx: _Ctx) -> dict:
    model = _mlp([20] + [32] * 11 + [10], nn.Sigmoid)
    raw = _mlp_run(ctx, model, torch.optim.SGD(model.parameters(), lr=0.1))
    raw["first_grad_rms"] = _grad_rms(raw, "net.0", model.net[0])
    raw["last_grad_rms"] = _grad_rms(raw, f"net.{len(model.net) - 1}", model.net[-1])
    return raw


def _grad_rms(raw: dict, name: str, layer: nn.Module) -> float:
    """Median over steps of the layer's gradient RMS (norm / sqrt(number of parameters))."""
    n = sum(p.numel() for p in layer.parameters())
    return float(torch.tensor(raw["layer_grad_norm"][name]).median()) / math.sqrt(n)


@_scenario("dead_relu", "mlp", "the Linear before the second ReLU has bias -10: that ReLU never fires", 150,
           Expect("dead_relu", "net.3", 0))
def _dead_relu(ctx: _Ctx) -> dict:
    model = _mlp([20, 64, 64, 10])
    nn.init.constant_(model.net[2].bias, -10.0)
    fired = _EverPositive()
    raw = _mlp_run(ctx, model, hooks=((model.net[3], fired),))
    raw["dead_fraction"] = fired.dead_fraction
    return raw


@_scenario("dead_relu_cnn", "cnn", "second conv (no BatchNorm) has bias -10: its ReLU channels never fire", 100,
           Expect("dead_relu", "net.6", 0))
def _dead_relu_cnn(ctx: _Ctx) -> dict:
    x, y = _images(ctx.g)
    model = _cnn(bn=False)
    nn.init.constant_(model.net[4].bias, -10.0)
    fired = _EverPositive()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    raw = ctx.train(model, opt, _sampler(x, y, 32, ctx.g), hooks=((model.net[6], fired),))
    raw["dead_fraction"] = fired.dead_fraction
    return raw


@_scenario("saturated_activations", "mlp",
           "first Linear's weights scaled x6: most inputs of the first Tanh beyond +-2.5", 150,
           Expect("saturated_activations", "net.1", 0))
def _saturated_activations(ctx: _Ctx) -> dict:
    model = _mlp([20, 64, 64, 10], nn.Tanh)
    with torch.no_grad():
        model.net[0].weight *= 6
    beyond = _Beyond(2.5)
    raw = _mlp_run(ctx, model, hooks=((model.net[1], beyond),))
    raw["tanh_beyond_2_5_first"], raw["tanh_beyond_2_5_last"] = beyond.fractions[0], beyond.fractions[-1]
    return raw


@_scenario("loss_spike", "mlp", "one corrupted batch (labels shifted by one class) at step 120 of healthy training",
           200, Expect("loss_spike", None, 120))
def _loss_spike(ctx: _Ctx) -> dict:
    return _mlp_run(ctx, corrupt=lambda step, x, y: (x, (y + 1) % 10 if step == 120 else y))


@_scenario("nan_inf", "mlp", "a per-sample Standardize module gets a constant row at step 60: 0/0 = NaN", 80,
           Expect("nan_inf", "net.0", 60))
def _nan_inf(ctx: _Ctx) -> dict:
    def blank_row(step, x, y):
        if step == 60:
            x[0] = 0.0
        return x, y

    model = _Net(_Standardize(), *_mlp([20, 64, 64, 10]).net)
    nan = _FirstNonfinite(ctx)
    raw = _mlp_run(ctx, model, corrupt=blank_row, hooks=((model.net[0], nan),))
    raw["standardize_first_nan_step"] = nan.first
    return raw


@_scenario("nan_inf_attention", "transformer",
           "an all-padding sequence at step 60: every attention key masked, softmax of all -inf = NaN", 80,
           Expect("nan_inf", "attn", 60))
def _nan_inf_attention(ctx: _Ctx) -> dict:
    tokens = _tokens(ctx.g, 16, 8, 32)

    def batch(step):
        t, target = tokens(step)
        if step == 60:
            t[0] = 0
        return t, target

    model = _AttentionLM()
    nan = _FirstNonfinite(ctx)
    raw = ctx.train(model, torch.optim.AdamW(model.parameters(), lr=3e-3), batch, _lm_loss,
                    hooks=((model.attn, nan),))
    raw["attn_first_nan_step"] = nan.first
    return raw


@_scenario("loss_plateau", "lstm", "LSTM classifier with Adam lr=1e-7: the loss stays at chance", 150,
           Expect("loss_plateau", None, 0))
def _loss_plateau(ctx: _Ctx) -> dict:
    x, y = _sequences(ctx.g)
    model = _LSTMNet()
    return ctx.train(model, _adam(model, 1e-7), _sampler(x, y, 32, ctx.g))


@_scenario("eval_mode", "cnn", "model.eval() for the whole run: BatchNorm uses its initial stats, Dropout is off", 120,
           Expect("eval_mode", None, 0))
def _eval_mode(ctx: _Ctx) -> dict:
    x, y = _images(ctx.g)
    model = _cnn(dropout=0.3).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    raw = ctx.train(model, opt, _sampler(x, y, 32, ctx.g))
    bn = model.net[1]
    raw["training_flag"] = model.training
    raw["bn_batches_tracked"] = int(bn.num_batches_tracked)
    raw["bn_running_mean_abs"] = float(bn.running_mean.abs().max())
    return raw


@_scenario("softmax_before_loss", "mlp", "model ends in nn.Softmax(dim=1) and is trained with CrossEntropyLoss", 200,
           Expect("softmax_before_loss", None, 0))
def _softmax_before_loss(ctx: _Ctx) -> dict:
    raw = _mlp_run(ctx, _mlp([20, 64, 64, 10], nn.ReLU, nn.Softmax(dim=1)))
    raw["loss_floor"] = math.log(9 + math.e) - 1  # the least CE of probabilities fed in as logits
    return raw


@_scenario("adam_weight_decay", "transformer", "torch.optim.Adam(weight_decay=1e-2): L2 through Adam, not AdamW", 120,
           Expect("adam_weight_decay", None, 0))
def _adam_weight_decay(ctx: _Ctx) -> dict:
    model = _TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-2)
    raw = ctx.train(model, opt, _tokens(ctx.g, 16, 8, 32), _lm_loss)
    raw["optimizer"], raw["weight_decay"] = type(opt).__name__, opt.param_groups[0]["weight_decay"]
    return raw


@_scenario("no_gradient", "lstm", "the LSTM's output is .detach()ed before the head: the LSTM never learns", 120,
           Expect("no_gradient", "lstm", 0))
def _no_gradient(ctx: _Ctx) -> dict:
    x, y = _sequences(ctx.g)
    model = _LSTMNet(detach=True)
    return ctx.train(model, _adam(model, 1e-2), _sampler(x, y, 32, ctx.g))


@_scenario("missing_zero_grad", "mlp", "the loop never calls zero_grad(): .grad sums every step so far", 100,
           Expect("missing_zero_grad", None, 1))
def _missing_zero_grad(ctx: _Ctx) -> dict:
    model = _mlp([20, 64, 64, 10])
    return _mlp_run(ctx, model, torch.optim.SGD(model.parameters(), lr=0.01), zero_grad=False)


@_scenario("initial_loss", "mlp", "last Linear's weights scaled x30: the step-0 loss is far above ln(10)", 100,
           Expect("initial_loss", None, 0))
def _initial_loss(ctx: _Ctx) -> dict:
    model = _mlp([20, 64, 64, 10])
    with torch.no_grad():
        model.net[-1].weight *= 30
    raw = _mlp_run(ctx, model)
    raw["chance_loss"] = math.log(10)
    return raw
