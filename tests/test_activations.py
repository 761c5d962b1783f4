"""Dead-unit, zero and saturation fractions equal fractions counted by hand.

The reference sees the exact tensors gradwatch sees: a forward hook of our own, registered after
gradwatch's, stores a copy of each activation module's output (or input, for saturation) for every
forward run with grad enabled, keyed by step and by call (`name`, `name#2`). Every fraction is then
counted here with plain tensor comparisons. All tensors are below the 16,384-element sampling
budget, so the recorded fractions must be exact (up to float32 rounding).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from _models import metric_table
from torch import nn

import gradwatch

ATOL = 1e-6  # float32 storage of an exact ratio


class Capture:
    """Our own hooks: per step, per call site, the tensors each activation module saw."""

    def __init__(self, model: nn.Module, names: list[str], use_input: bool = False):
        self.step, self.use_input = 0, use_input
        self.data: dict[int, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        self._count: dict[str, int] = {}
        modules = dict(model.named_modules())
        model.register_forward_pre_hook(self._reset)
        for n in names:
            modules[n].register_forward_hook(self._hook_for(n))

    def _reset(self, module, args):
        self._count = {}

    def _hook_for(self, name):
        def hook(module, args, out):
            if not torch.is_grad_enabled():
                return
            k = self._count.get(name, 0)
            self._count[name] = k + 1
            site = name if k == 0 else f"{name}#{k + 1}"
            self.data[self.step][site].append((args[0] if self.use_input else out).detach().clone())
        return hook

    # ---- hand-counted references -------------------------------------------------------------
    def zero_fraction(self, step: int, site: str) -> float:
        ts = self.data[step][site]
        return sum(int((t <= 0).sum()) for t in ts) / sum(t.numel() for t in ts)

    def saturation(self, step: int, site: str, threshold: float) -> float:
        ts = self.data[step][site]
        return sum(int((t.abs() > threshold).sum()) for t in ts) / sum(t.numel() for t in ts)

    def dead_fraction(self, steps, site: str, unit_dim: int) -> float:
        ever_positive = None
        for s in steps:
            for t in self.data[s][site]:
                per_unit = (t > 0).movedim(unit_dim, 0).reshape(t.shape[unit_dim], -1).any(dim=1)
                ever_positive = per_unit if ever_positive is None else ever_positive | per_unit
        return float((~ever_positive).double().mean())


def _check_zero(run, cap: Capture, sites: list[str], steps) -> None:
    got = metric_table(run, "zero_fraction")
    assert sorted(got) == list(steps)
    for s in steps:
        assert set(got[s]) == set(sites), (s, got[s])
        for site in sites:
            assert got[s][site] == pytest.approx(cap.zero_fraction(s, site), abs=ATOL), (s, site)


def _check_dead(run, cap: Capture, site_dims: dict[str, int], window: int, n_steps: int) -> dict:
    got = metric_table(run, "dead_fraction")
    ends = [s for s in range(n_steps) if (s + 1) % window == 0]
    assert sorted(got) == ends
    ref = {}
    for end in ends:
        assert set(got[end]) == set(site_dims), (end, got[end])
        for site, dim in site_dims.items():
            ref[(end, site)] = cap.dead_fraction(range(end - window + 1, end + 1), site, dim)
            assert got[end][site] == pytest.approx(ref[(end, site)], abs=ATOL), (end, site)
    return ref


# ---- dense ReLU: dead units over a window, zero fraction per step --------------------------------

def _train(model, tmp_path, steps, loss_of, cap=None, lr=0.01, **options):
    """`steps` SGD steps under gradwatch, with `loss_of(step)` as the loss; `cap` learns each step.

    Zero and saturation fractions are detail stats: these tests check them on every step."""
    options.setdefault("detail_every", 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", **options)
    for step in range(steps):
        if cap is not None:
            cap.step = step
        opt.zero_grad()
        loss = loss_of(step)
        loss.backward()
        opt.step()
        gw.step(loss)
    gw.close()
    return gradwatch.load_run(tmp_path / "run")

def test_relu_biased_to_minus_ten_reads_dead(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].bias.fill_(-10.0)
    run = _train(model, tmp_path, 10, lambda step: model(torch.randn(8, 4)).pow(2).mean(), dead_window=5)
    dead = metric_table(run, "dead_fraction")
    assert sorted(dead) == [4, 9]
    assert all(dead[s]["1"] >= 0.95 for s in dead)
    assert all(v["1"] >= 0.95 for v in metric_table(run, "zero_fraction").values())


# unit -> steps at which one sample makes it positive; every other input is negative
PLANTED = {0: [0], 1: [4], 2: [5], 3: list(range(15)), 4: [], 5: [9, 10], 6: [14], 7: [7, 12]}


def _planted_model():
    """An identity Linear (frozen) before the ReLU, so the ReLU's output is relu(x) exactly."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(8))
        model[0].bias.zero_()
    model[0].requires_grad_(False)
    return model


def _planted_batch(step: int, n: int) -> torch.Tensor:
    x = -torch.rand(n, 8) - 0.05
    for unit, steps in PLANTED.items():
        if step in steps:
            x[torch.randint(0, n, ()), unit] = torch.rand(()) + 0.1
    return x


@pytest.mark.parametrize("micro_sizes", [(6,), (3, 5)], ids=["one_batch", "two_micro_batches"])
def test_relu_dead_and_zero_fractions_match_hand_count(micro_sizes, tmp_path):
    torch.manual_seed(0)
    model = _planted_model()
    cap = Capture(model, ["1"])
    opt = torch.optim.SGD(model[2].parameters(), lr=0.01)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", dead_window=5, detail_every=1)
    for step in range(15):
        cap.step = step
        opt.zero_grad()
        for i, n in enumerate(micro_sizes):
            x = _planted_batch(step, n) if i == 0 else -torch.rand(n, 8) - 0.05
            loss = model(x).pow(2).mean()
            loss.backward()
        opt.step()
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    ref = _check_dead(run, cap, {"1": 1}, window=5, n_steps=15)
    # the hand count agrees with the design of the planted positives: windows [0-4], [5-9], [10-14]
    alive = [{0, 1, 3}, {2, 3, 5, 7}, {3, 5, 6, 7}]
    assert [ref[(e, "1")] for e in (4, 9, 14)] == [1 - len(a) / 8 for a in alive]
    _check_zero(run, cap, ["1"], range(15))
    if len(micro_sizes) > 1:  # the fraction pools both micro-batches (not a mean of per-batch fractions)
        s = 0
        per_batch = [float((t <= 0).double().mean()) for t in cap.data[s]["1"]]
        assert cap.zero_fraction(s, "1") != pytest.approx(np.mean(per_batch), abs=1e-4)


def test_no_grad_forwards_do_not_count(tmp_path):
    torch.manual_seed(0)
    model = _planted_model()
    cap = Capture(model, ["1"])
    opt = torch.optim.SGD(model[2].parameters(), lr=0.01)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", dead_window=5, detail_every=1)
    for step in range(10):
        cap.step = step
        opt.zero_grad()
        loss = model(_planted_batch(step, 6)).pow(2).mean()
        loss.backward()
        opt.step()
        # an eval loop: all-positive inputs would make every unit alive and every output positive
        model.eval()
        with torch.no_grad():
            model(torch.rand(16, 8) + 1.0)
        with torch.inference_mode():
            model(torch.rand(16, 8) + 1.0)
        model.train()
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    ref = _check_dead(run, cap, {"1": 1}, window=5, n_steps=10)
    assert ref[(4, "1")] > 0 and ref[(9, "1")] > 0
    _check_zero(run, cap, ["1"], range(10))



def test_fractions_on_detail_steps_while_dead_units_see_every_step(tmp_path):
    """detail_every=4: zero fractions at steps 0, 4, 8 only. Unit 1 fires only at step 4 and unit 2 only
    at step 5, a step with no fractions: both still count as alive in the window 0-9."""
    torch.manual_seed(0)
    model = _planted_model()
    cap = Capture(model, ["1"])
    run = _train(model, tmp_path, 10, lambda step: model(_planted_batch(step, 6)).pow(2).mean(), cap=cap,
                 dead_window=10, detail_every=4)
    _check_zero(run, cap, ["1"], [0, 4, 8])
    dead = metric_table(run, "dead_fraction")
    assert list(dead) == [9]
    # alive in 0-9: units 0, 1, 2, 3, 5, 7; dead: 4 (never) and 6 (only at step 14)
    assert dead[9]["1"] == pytest.approx(2 / 8)


# ---- convolutions: a unit is a channel -----------------------------------------------------------
def test_conv2d_dead_channel_counts_one_eighth(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[3] = -1e3
    cap = Capture(model, ["1"])
    def loss_of(step):
        return nn.functional.cross_entropy(model(torch.randn(4, 3, 6, 6)), torch.randint(0, 2, (4,)))

    run = _train(model, tmp_path, 6, loss_of, cap=cap, dead_window=3)
    ref = _check_dead(run, cap, {"1": 1}, window=3, n_steps=6)
    assert all(v == 1 / 8 for v in ref.values())
    _check_zero(run, cap, ["1"], range(6))


@pytest.mark.parametrize("layer,unit_dim,n_units", [("conv1d", 1, 6), ("linear3d", 2, 6)])
def test_three_d_units_follow_the_layer_before(layer, unit_dim, n_units, tmp_path):
    """(N, C, L) after a Conv1d: units are channels; (N, T, F) after a Linear: units are features."""
    torch.manual_seed(0)
    if layer == "conv1d":
        model = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 7, 1))
        make = lambda: torch.randn(4, 4, 7)  # noqa: E731
    else:
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Flatten(), nn.Linear(7 * 6, 1))
        make = lambda: torch.randn(4, 7, 4)  # noqa: E731
    with torch.no_grad():
        model[0].bias[2] = -1e3
    cap = Capture(model, ["1"])
    run = _train(model, tmp_path, 6, lambda step: model(make()).pow(2).mean(), cap=cap, dead_window=3)
    ref = _check_dead(run, cap, {"1": unit_dim}, window=3, n_steps=6)
    assert all(v == 1 / n_units for v in ref.values())


def test_leaky_relu_dead_means_never_positive(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.1), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].bias[[0, 5]] = -1e3  # outputs are -100, not 0: dead all the same
    cap = Capture(model, ["1"])
    run = _train(model, tmp_path, 8, lambda step: model(torch.randn(5, 4)).pow(2).mean() * 1e-4, cap=cap,
                 lr=0.001, dead_window=4)
    assert all(int((t == 0).sum()) == 0 for t in cap.data[0]["1"])  # no exact zeros at all
    ref = _check_dead(run, cap, {"1": 1}, window=4, n_steps=8)
    assert all(v >= 2 / 8 for v in ref.values())
    _check_zero(run, cap, ["1"], range(8))  # "not positive": the negative outputs count
    assert cap.zero_fraction(0, "1") > 2 / 8


# ---- saturation ----------------------------------------------------------------------------------
def test_tanh_and_sigmoid_saturation_fractions(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 1))
    with torch.no_grad():
        model[0].weight.mul_(6.0)
        model[2].weight.mul_(25.0)
    cap = Capture(model, ["1", "3"], use_input=True)
    run = _train(model, tmp_path, 8, lambda step: model(torch.randn(6, 4)).pow(2).mean(), cap=cap)
    got = metric_table(run, "saturation_fraction")
    assert sorted(got) == list(range(8))
    for s in range(8):
        tanh_ref, sig_ref = cap.saturation(s, "1", 2.5), cap.saturation(s, "3", 5.0)
        # non-trivial, and each threshold matters: the other one would give another answer
        assert 0 < tanh_ref < 1 and 0 < sig_ref < 1
        assert cap.saturation(s, "1", 5.0) != tanh_ref and cap.saturation(s, "3", 2.5) != sig_ref
        assert got[s]["1"] == pytest.approx(tanh_ref, abs=ATOL), s
        assert got[s]["3"] == pytest.approx(sig_ref, abs=ATOL), s
    assert "dead_fraction" not in set(run.layers["metric"])  # no ReLU-family module here
    assert "zero_fraction" not in set(run.layers["metric"])


# ---- one module, two calls -----------------------------------------------------------------------
class _Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 6)
        self.fc3 = nn.Linear(6, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


def test_relu_called_twice_gets_two_series(tmp_path):
    torch.manual_seed(0)
    model = _Reused()
    with torch.no_grad():
        model.fc1.bias[0] = -1e3
        model.fc2.bias[:2] = -1e3
    cap = Capture(model, ["relu"])
    run = _train(model, tmp_path, 8, lambda step: model(torch.randn(6, 4)).pow(2).mean(), cap=cap, dead_window=4)
    ref = _check_dead(run, cap, {"relu": 1, "relu#2": 1}, window=4, n_steps=8)
    assert ref[(3, "relu")] >= 1 / 8 and ref[(3, "relu#2")] >= 2 / 6
    _check_zero(run, cap, ["relu", "relu#2"], range(8))
    assert cap.zero_fraction(0, "relu") != cap.zero_fraction(0, "relu#2")


def test_activations_false_records_no_activation_metrics(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    run = _train(model, tmp_path, 6, lambda step: model(torch.randn(6, 4)).pow(2).mean(), activations=False,
                 dead_window=2)
    metrics = set(run.layers["metric"])
    assert "grad_norm" in metrics
    assert not metrics & {"dead_fraction", "zero_fraction", "saturation_fraction"}


def test_unbatched_outputs_are_left_untouched(tmp_path):
    """1-D activation outputs (unbatched samples): each element is a unit. Two forwards before one
    backward (a siamese pair) must train as without gradwatch, and the first output must keep its values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].bias[1] = -1e3
    cap = Capture(model, ["1"])
    outs = []
    model[1].register_forward_hook(lambda m, a, o: outs.append((o, o.detach().clone())))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", dead_window=2, detail_every=1)
    for step in range(4):
        cap.step = step
        opt.zero_grad()
        loss = (model(torch.randn(4)) - model(torch.randn(4))).pow(2).sum()
        for out, copy in outs:
            assert torch.equal(out, copy), f"step {step}: an activation output was modified in place"
        outs.clear()
        loss.backward()
        opt.step()
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    ref = _check_dead(run, cap, {"1": 0}, window=2, n_steps=4)
    assert all(v >= 1 / 8 for v in ref.values())
    _check_zero(run, cap, ["1"], range(4))


def test_large_activations_are_sampled_within_tolerance(tmp_path):
    """A 2M-element conv map is sampled (16,384 elements): the fractions stay within 2 points of exact,
    and dead channels, which use every element, stay exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1), nn.Tanh())
    with torch.no_grad():
        model[0].bias[:4].fill_(-1e3)  # 4 of 32 channels dead
        model[2].weight.mul_(8.0)  # push many tanh inputs past 2.5
    exact = {"zero": [], "sat": []}
    model[1].register_forward_hook(lambda m, i, o: exact["zero"].append((o <= 0).float().mean().item()))
    model[3].register_forward_hook(lambda m, i, o: exact["sat"].append((i[0].abs() > 2.5).float().mean().item()))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", dead_window=2, detail_every=1) as gw:
        for _ in range(2):
            loss = model(torch.randn(64, 3, 32, 32)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            gw.step(loss)
    run = gradwatch.load_run(tmp_path / "run")
    assert run.wide("zero_fraction")["1"].tolist() == pytest.approx(exact["zero"], abs=0.02)
    assert run.wide("saturation_fraction")["3"].tolist() == pytest.approx(exact["sat"], abs=0.02)
    assert 0.05 < exact["sat"][0] < 0.95  # the tolerance is not trivially met
    assert run.wide("dead_fraction")["1"].dropna().tolist() == [4 / 32]


class _Planted(nn.Module):
    """Outputs a fixed tensor (plus 0 x a parameter, so that there is a layer and a backward)."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, _):
        return self.x + self.w


@pytest.mark.parametrize("window,expected", [(1, [7 / 8, 7 / 8]), (2, [6 / 8])])
def test_big_maps_read_every_kth_sample_and_turn_through_the_batch(window, expected, tmp_path):
    """64 x 8 x 16 x 16 is twice stats.UNIT_SAMPLE: dead units read every 2nd sample, even samples on
    one step and odd ones on the next. A channel positive in one sample of the batch is missed on the
    step that skips it, and is alive once a window has read both halves, as in the full-batch count."""
    x = -torch.rand(64, 8, 16, 16) - 0.1
    x[1, 2, 5, 5] = 1.0  # channel 2 fires in sample 1 only
    x[0, 5, 0, 0] = 1.0  # channel 5 in sample 0 only
    assert x.numel() == 2 * gradwatch.stats.UNIT_SAMPLE
    model = nn.Sequential(_Planted(x), nn.ReLU())
    run = _train(model, tmp_path, 2, lambda step: model(None).sum(), dead_window=window)
    assert run.wide("dead_fraction")["1"].dropna().tolist() == pytest.approx(expected, abs=ATOL)
    full_batch = 1 - float((x > 0).any(dim=(0, 2, 3)).double().mean())
    assert full_batch == 6 / 8
