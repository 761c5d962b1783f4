"""NaN/Inf localisation: the event names the producer, its phase, its step and the kind of value.

Each scenario plants one non-finite source at a chosen step in an otherwise healthy loop. The reference
for per-layer flags is computed here from the model's own `.grad` right after backward.
"""
from __future__ import annotations

import math

import pytest
import torch
from _models import metric_table, naive_layers
from torch import nn

import gradwatch

BAD = 4  # the step at which the planted source fires
STEPS = 8


def _train(model, run_dir, batch, loss_fn=None, before=None, skip_bad=False, **watch_kw):
    """A plain SGD loop; returns the run and, per step, the loss and the layers whose grads are non-finite."""
    loss_fn = loss_fn or (lambda out, y, step: nn.functional.mse_loss(out, y))
    layers = naive_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=run_dir, **watch_kw)
    losses, bad, kinds = [], [], []
    for step in range(STEPS):
        if before:
            before(step)
        opt.zero_grad()
        x, y = batch(step)
        loss = loss_fn(model(x), y, step)
        loss.backward()
        losses.append(loss.item())
        bad.append({name: float(any(not torch.isfinite(p.grad).all() for p in ps if p.grad is not None))
                    for name, ps in layers.items() if any(p.grad is not None for p in ps)})
        kinds.append({name: "nan" if any(torch.isnan(p.grad).any() for p in ps if p.grad is not None) else "inf"
                      for name, ps in layers.items() if bad[-1].get(name)})
        if not (skip_bad and any(bad[-1].values())):
            opt.step()
        gw.step(loss)
    gw.close()
    _train.kinds = kinds  # per step: layer -> "nan" / "inf", for the layers whose grads are not finite
    return gradwatch.load_run(run_dir), losses, bad


def _batch(step, n=16):
    return torch.randn(n, 4), torch.randn(n, 1)


def _check_flags(run, losses, bad) -> None:
    """steps.nonfinite / steps.loss / layers.nonfinite against the reference, at every step."""
    first_bad = next(s for s in range(STEPS) if not math.isfinite(losses[s]) or any(bad[s].values()))
    got_loss = run.steps["loss"].tolist()
    for s in range(STEPS):
        if math.isnan(losses[s]):
            assert math.isnan(got_loss[s]), s
        else:
            assert got_loss[s] == pytest.approx(losses[s], rel=1e-6), s
    assert run.steps["nonfinite"].tolist()[:first_bad] == [False] * first_bad
    assert run.steps["nonfinite"].iloc[first_bad]
    nonfinite = metric_table(run, "nonfinite")
    for s in range(STEPS):
        assert nonfinite[s] == bad[s], s
        grad_norm = metric_table(run, "grad_norm")[s]
        for layer, flag in bad[s].items():
            assert (grad_norm[layer] == math.inf) == bool(flag), (s, layer, grad_norm[layer])


def _one_event(run):
    ev = run.events
    assert len(ev) == 1, ev.to_dict("records")
    return ev.iloc[0]


# ---- forward producers ---------------------------------------------------------------------------
class Standardize(nn.Module):
    """(x - mean) / std over the batch, with no eps: NaN when every row is the same."""

    def forward(self, x):
        return (x - x.mean(0)) / x.std(0)


class DivideByZero(nn.Module):
    """x / d with d a plain attribute: d = 0 turns signed inputs into +inf and -inf."""

    d = 1.0

    def forward(self, x):
        return x / self.d


class Blowup(nn.Module):
    """exp(gain * x): a huge gain gives +inf (and zeros), never NaN."""

    gain = 1.0

    def forward(self, x):
        return torch.exp(self.gain * x)


def _same_rows_at_bad(step):
    x, y = _batch(step)
    if step == BAD:
        x = x[:1].expand(16, 4).clone()
    return x, y


@pytest.mark.parametrize("producer,kind", [("std0", "nan"), ("div0", "inf"), ("exp", "inf")])
def test_forward_producer_is_named_once_with_step_and_kind(producer, kind, tmp_path):
    torch.manual_seed(0)
    planted = {"std0": Standardize, "div0": DivideByZero, "exp": Blowup}[producer]()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), planted, nn.Linear(8, 1))

    def before(step):
        if producer == "div0":
            planted.d = 0.0 if step == BAD else 1.0
        elif producer == "exp":
            planted.gain = 1e4 if step == BAD else 1.0

    seen = {}

    def spy(module, args, out):
        if "out" not in seen and not torch.isfinite(out).all():
            seen["out"] = (bool(torch.isfinite(args[0]).all()), bool(torch.isnan(out).any()),
                           bool(torch.isinf(out).any()))

    planted.register_forward_hook(spy)
    batch = _same_rows_at_bad if producer == "std0" else _batch
    run, losses, bad = _train(model, tmp_path / "run", batch, before=before)
    finite_in, has_nan, has_inf = seen["out"]  # what the producer really returned, at its first bad call
    assert finite_in and (has_nan if kind == "nan" else has_inf and not has_nan)
    assert all(math.isfinite(v) for v in losses[:BAD]) and not math.isfinite(losses[BAD])
    ev = _one_event(run)  # the NaN weights that follow are one streak, reported once
    assert (ev["step"], ev["phase"], ev["module"], ev["kind"]) == (BAD, "forward", "2", kind)
    _check_flags(run, losses, bad)
    assert run.steps["nonfinite"].iloc[BAD:].all()  # the weights are NaN from then on


class LogBlock(nn.Module):
    """Two child Linears with functional code between them: log(|h| + offset)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.offset = 1.0

    def forward(self, x):
        return self.fc2(torch.log(self.fc1(x).abs() + self.offset))


class LogRoot(LogBlock):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(super().forward(self.inp(x)))


@pytest.mark.parametrize("where", ["child", "root"])
def test_functional_nan_names_the_custom_module_not_the_child_that_received_it(where, tmp_path):
    torch.manual_seed(0)
    if where == "child":
        block = LogBlock()
        model, expected = nn.Sequential(nn.Linear(4, 8), block, nn.Linear(8, 1)), "1"
    else:
        model = block = LogRoot()
        expected = "(root)"

    def before(step):
        block.offset = -1e3 if step == BAD else 1.0  # log of a negative number

    run, losses, bad = _train(model, tmp_path / "run", _batch, before=before)
    ev = _one_event(run)
    assert (ev["step"], ev["phase"], ev["module"], ev["kind"]) == (BAD, "forward", expected, "nan")
    _check_flags(run, losses, bad)


class InplaceStandardize(nn.Module):
    """Standardizes its input in place (statistics not backpropagated): at call time the input was
    finite, so this module is the producer."""

    def forward(self, x):
        std = x.detach().std(0)
        return x.sub_(x.mean(0)).div_(std)


def test_in_place_producer_is_named(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), InplaceStandardize(), nn.Linear(8, 1))
    run, losses, bad = _train(model, tmp_path / "run", _same_rows_at_bad)
    ev = _one_event(run)
    assert (ev["step"], ev["phase"], ev["module"], ev["kind"]) == (BAD, "forward", "1", "nan")
    _check_flags(run, losses, bad)


def test_multihead_attention_with_every_key_masked(tmp_path):
    """softmax over a row of -inf is NaN: the attention module itself is the producer."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 1)
            self.mask_all = False

        def forward(self, x):
            h = self.inp(x)
            pad = torch.zeros(x.shape[:2], dtype=torch.bool)
            if self.mask_all:
                pad[0] = True
            a, _ = self.attn(h, h, h, key_padding_mask=pad)
            return self.out(a).mean(1)

    model = Attn()

    def before(step):
        model.mask_all = step == BAD

    run, losses, bad = _train(model, tmp_path / "run", lambda s: (torch.randn(3, 5, 4), torch.randn(3, 1)),
                              before=before)
    ev = _one_event(run)
    assert (ev["step"], ev["phase"], ev["module"], ev["kind"]) == (BAD, "forward", "attn", "nan")
    _check_flags(run, losses, bad)


# ---- input and loss ------------------------------------------------------------------------------
def test_nan_in_input_batch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def batch(step):
        x, y = _batch(step)
        if step == BAD:
            x[3, 2] = float("nan")
        return x, y

    run, losses, bad = _train(model, tmp_path / "run", batch)
    ev = _one_event(run)  # probed as it enters the model
    assert (ev["step"], ev["phase"], ev["module"], ev["kind"]) == (BAD, "input", "(root)", "nan")
    _check_flags(run, losses, bad)


def _bce_by_hand(out, y, step):
    """Binary cross-entropy written out: logits pushed to -1e4 give p == 0 and 0 * log(0) = NaN."""
    logits = out - 1e4 if step == BAD else out
    p = torch.sigmoid(logits)
    t = (y > 0).float()
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def test_nan_loss_from_finite_outputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    run, losses, bad = _train(model, tmp_path / "run", _batch, loss_fn=_bce_by_hand, skip_bad=True)
    assert math.isnan(losses[BAD])
    ev = _one_event(run)
    assert (ev["step"], ev["phase"], ev["module"], ev["kind"]) == (BAD, "loss", "", "nan")
    _check_flags(run, losses, bad)
    assert run.steps["nonfinite"].tolist() == [s == BAD for s in range(STEPS)]  # weights kept finite


def _nll_by_hand(out, y, step):
    """-log softmax[target] with logits blown up: the target's probability underflows to 0."""
    logits = torch.cat([out, -out], dim=1) * (1e4 if step == BAD else 1.0)
    p = torch.softmax(logits, dim=1)
    return -torch.log(p[:, 0]).mean()


def test_inf_loss_kind_is_inf(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    run, losses, bad = _train(model, tmp_path / "run", _batch, loss_fn=_nll_by_hand, skip_bad=True)
    assert losses[BAD] == math.inf
    ev = _one_event(run)
    assert (ev["step"], ev["phase"], ev["module"], ev["kind"]) == (BAD, "loss", "", "inf")
    assert run.steps["nonfinite"].tolist() == [s == BAD for s in range(STEPS)]


def test_inf_loss_with_finite_gradients_is_flagged(tmp_path):
    """A loss of +inf is not finite even when every gradient is (an inf constant term)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss_fn(out, y, step):
        penalty = -torch.log(torch.tensor(0.0 if step == BAD else 1.0))
        return nn.functional.mse_loss(out, y) + penalty

    run, losses, bad = _train(model, tmp_path / "run", _batch, loss_fn=loss_fn)
    assert losses[BAD] == math.inf and not any(any(b.values()) for b in bad)
    assert run.steps["nonfinite"].tolist() == [s == BAD for s in range(STEPS)]
    ev = _one_event(run)
    assert (ev["step"], ev["phase"], ev["module"], ev["kind"]) == (BAD, "loss", "", "inf")


# ---- backward ------------------------------------------------------------------------------------
class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class Poison(nn.Module):
    """Identity forward; a NaN gradient in backward while `active`."""

    active = False

    def forward(self, x):
        return _NaNGrad.apply(x) if self.active else x


@pytest.mark.parametrize("detail_every", [10, 2])
def test_nan_gradient_from_backward_names_layer_closest_to_loss(tmp_path, detail_every):
    """detail_every=2: the streak's two steps have different row layouts (detail, then not), which the flush
    decodes apart; the streak is still seen whole, in step order."""
    torch.manual_seed(0)
    poison = Poison()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), poison, nn.Linear(8, 1))
    bad_steps = {BAD, BAD + 1, BAD + 3}  # a two-step streak, a clean step, a new streak

    def before(step):
        poison.active = step in bad_steps

    # like a GradScaler: a step with non-finite grads is not applied, so the weights stay finite
    run, losses, bad = _train(model, tmp_path / "run", _batch, before=before, skip_bad=True,
                              detail_every=detail_every, flush_every=1.0)
    assert all(math.isfinite(v) for v in losses)
    assert bad[BAD] == {"0": 1.0, "2": 1.0, "4": 0.0}
    ev = run.events
    assert ev["step"].tolist() == [BAD, BAD + 3], ev.to_dict("records")
    assert (ev["phase"] == "backward").all() and (ev["module"] == "2").all() and (ev["kind"] == "nan").all()
    assert run.steps["nonfinite"].tolist() == [s in bad_steps for s in range(STEPS)]
    _check_flags(run, losses, bad)


class SqrtGate(nn.Module):
    """x * sqrt(g): the forward is finite at g == 0, its gradient is not (d sqrt / dg = inf)."""

    def __init__(self, n):
        super().__init__()
        self.g = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * torch.sqrt(self.g)


def test_sqrt_at_zero_in_parameterised_module(tmp_path):
    torch.manual_seed(0)
    gate = SqrtGate(8)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), gate, nn.Linear(8, 1))

    def before(step):
        with torch.no_grad():
            gate.g.fill_(0.0 if step == BAD else 1.0)

    run, losses, bad = _train(model, tmp_path / "run", _batch, before=before, skip_bad=True)
    assert math.isfinite(losses[BAD])
    assert bad[BAD] == {"0": 0.0, "2": 1.0, "3": 0.0}
    ev = _one_event(run)
    assert (ev["step"], ev["phase"], ev["module"], ev["kind"]) == (BAD, "backward", "2", _train.kinds[BAD]["2"])
    _check_flags(run, losses, bad)


# ---- tracing off ---------------------------------------------------------------------------------
def test_trace_off_still_flags_the_step_but_names_no_producer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), Standardize(), nn.Linear(8, 1))
    run, losses, bad = _train(model, tmp_path / "run", _same_rows_at_bad, trace_nonfinite=False)
    assert math.isnan(losses[BAD])
    _check_flags(run, losses, bad)
    assert run.steps["nonfinite"].iloc[BAD:].all()
    ev = run.events
    assert not (ev["phase"] == "forward").any()
    assert not (ev["module"] == "2").any()
    assert (ev["step"] >= BAD).all()


def test_large_gradient_norms_combine_without_overflow(tmp_path):
    """A weight and a bias gradient of 1.5e19 each: every per-tensor norm fits float32, but the sum of their
    squares (4.5e38) does not. They are combined in float64, so the layer norm is exact, not inf."""
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", detect_every=0) as gw:
        opt.zero_grad()
        loss = (model(torch.ones(1, 1)) * 1.5e19).sum()
        loss.backward()
        assert model.weight.grad.item() == model.bias.grad.item() == pytest.approx(1.5e19)
        opt.step()
        gw.step(loss)
    run = gradwatch.load_run(tmp_path / "run")
    assert run.wide("grad_norm").iloc[0]["(root)"] == pytest.approx(math.hypot(1.5e19, 1.5e19), rel=1e-6)
    assert run.steps["grad_norm"].iloc[0] == pytest.approx(math.hypot(1.5e19, 1.5e19), rel=1e-6)
    assert not run.steps["nonfinite"].any() and run.events.empty


def test_safe_modules_carry_a_hook_only_on_the_steps_that_probe_them(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", detail_every=3, detect_every=0)
    hooked = []
    for _ in range(7):
        hooked.append(len(model[0]._forward_hooks))  # what the coming step's forward will run with
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        gw.step(loss)
    gw.close()
    assert hooked == [1, 0, 0, 1, 0, 0, 1]
    assert len(model[0]._forward_hooks) == 0 and len(model[1]._forward_hooks) == 0


def test_a_float16_output_keeps_the_safe_modules_probed_on_every_step(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    gw = gradwatch.watch(model, run_dir=tmp_path / "run", detail_every=5, detect_every=0)
    with torch.autocast("cpu", dtype=torch.float16):
        for _ in range(3):
            model(torch.randn(5, 4)).float().pow(2).mean().backward()
            gw.step()
            assert len(model[0]._forward_hooks) == 1
    gw.close()
