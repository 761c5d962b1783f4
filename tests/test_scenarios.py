"""The labelled scenarios: each pathology (or health) is real, and the detectors report it.

`test_pathology_is_real` reads only the raw torch measurements that the scenario's own training loop
took (losses, float64 gradient norms over `parameters()`, fractions counted by its own hooks), so it
checks the label, not gradwatch. `test_scenario_outcome` checks the detectors against the label.
Each scenario trains once per module, shared by both tests.
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch

import gradwatch
from gradwatch.scenarios import SCENARIOS, run_scenario


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> (run_dir, raw measurements), each scenario trained on first use."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            run_dir = tmp_path_factory.mktemp(name) / "run"
            cache[name] = (run_dir, run_scenario(name, run_dir))
        return cache[name]

    return get


# ---- helpers over the raw series -----------------------------------------------------------------
def mean(xs) -> float:
    return sum(xs) / len(xs)


def median(xs) -> float:
    return statistics.median(xs)


def all_finite(raw) -> bool:
    return all(math.isfinite(v) for v in raw["loss"] + raw["grad_norm"])


def assert_learns(raw, factor: float) -> None:
    """Healthy: nothing non-finite, and the mean of the last 10 losses below `factor` x the first 10."""
    assert all_finite(raw), "a healthy run produced a non-finite loss or gradient"
    first, last = mean(raw["loss"][:10]), mean(raw["loss"][-10:])
    assert last < factor * first, f"loss fell only from {first:.4g} to {last:.4g} (want < {factor} x)"


def assert_nan_from(raw, onset: int) -> None:
    """Finite before `onset`, non-finite from `onset` on."""
    losses = raw["loss"]
    assert all(math.isfinite(v) for v in losses[:onset])
    assert not math.isfinite(losses[onset])


# ---- what each label means, in raw numbers (one check per scenario) ---------------------------------
CHECKS: dict = {}


def check(name: str):
    def register(fn):
        CHECKS[name] = fn
        return fn
    return register


@check("healthy_mlp")
@check("healthy_accum")
@check("healthy_dropout")
def check_learns_blobs(raw):
    assert_learns(raw, 0.05)


@check("healthy_cnn")
def check_healthy_cnn(raw):
    assert_learns(raw, 0.3)


@check("healthy_transformer")
def check_healthy_transformer(raw):
    assert_learns(raw, 0.1)
    lr, peak = raw["lr"], max(raw["lr"])
    assert lr[0] == pytest.approx(peak / 20) and lr[19] == pytest.approx(peak), "linear warmup over 20 steps"
    assert lr[-1] < 0.01 * peak, "cosine decay to ~0"


@check("healthy_lstm_clipped")
def check_healthy_lstm_clipped(raw):
    assert_learns(raw, 0.3)
    assert raw["clip_fraction"] > 0.5, f"clipping engaged on only {raw['clip_fraction']:.0%} of steps"


@check("healthy_sigmoid_bce")
def check_healthy_sigmoid_bce(raw):
    assert_learns(raw, 0.01)
    # confident on purpose: the output sigmoid's inputs are beyond +-5 (saturated) on most samples
    assert raw["sigmoid_beyond_5_last"] > 0.9, f"only {raw['sigmoid_beyond_5_last']:.0%} beyond +-5"


@check("healthy_converged")
def check_healthy_converged(raw):
    assert_learns(raw, 1e-6)
    tail = raw["loss"][100:]
    assert max(tail) < 1e-6, "converged by step 100"
    assert max(tail) - min(tail) < 1e-9, "then flat"


@check("healthy_early")
def check_healthy_early(raw):
    assert_learns(raw, 0.7)
    # stopped while still falling fast: the last 5 losses 20% below the 5 from ten steps earlier
    assert mean(raw["loss"][-5:]) < 0.8 * mean(raw["loss"][-15:-10])


@check("healthy_manual_sgd")
def check_healthy_manual_sgd(raw):
    assert_learns(raw, 0.05)
    assert raw["lr"] == [], "trained without an optimizer object"


@check("healthy_frozen")
def check_healthy_frozen(raw):
    assert_learns(raw, 0.05)
    assert raw["frozen_weight_change"] == 0
    assert "net.0" not in raw["layer_grad_norm"], "net.0 has no trainable parameter"


@check("healthy_tanh")
def check_healthy_tanh(raw):
    assert_learns(raw, 0.05)
    first, last = raw["tanh_beyond_2_5_first"], raw["tanh_beyond_2_5_last"]
    assert max(first, last) < 0.25, f"tanh inputs beyond +-2.5: {first:.0%} at the start, {last:.0%} at the end"


@check("healthy_step_lr")
def check_healthy_step_lr(raw):
    assert_learns(raw, 0.3)
    assert raw["lr"][60] == pytest.approx(raw["lr"][59] / 10), "StepLR divides the LR by 10 at step 60"


@check("exploding_gradients")
def check_exploding(raw):
    gn, loss = raw["grad_norm"], raw["loss"]
    assert all_finite(raw), "the run should end before the values overflow to inf"
    assert mean(loss[50:60]) < 0.5 * mean(loss[:10]), "the model learns before the LR jump at step 60"
    before = median(gn[:60])
    assert before < 5, f"grad norm before the LR jump should be ordinary, got median {before:.3g}"
    assert max(gn[60:]) > 1e6 * before, f"grad norm grew only to {max(gn[60:]):.3g} from {before:.3g}"
    assert max(loss[60:]) > 1e6 * mean(loss[50:60]), "the loss diverges"


@check("vanishing_gradients")
def check_vanishing(raw):
    assert raw["first_grad_rms"] < 1e-3 * raw["last_grad_rms"], (
        f"first layer grad RMS {raw['first_grad_rms']:.3g} vs last {raw['last_grad_rms']:.3g}")


@check("dead_relu")
@check("dead_relu_cnn")
def check_dead_relu(raw):
    assert raw["dead_fraction"] >= 0.9, f"only {raw['dead_fraction']:.0%} of the units never fired"


@check("saturated_activations")
def check_saturated(raw):
    first, last = raw["tanh_beyond_2_5_first"], raw["tanh_beyond_2_5_last"]
    assert min(first, last) > 0.5, f"tanh inputs beyond +-2.5: {first:.0%} at the start, {last:.0%} at the end"


@check("loss_spike")
def check_spike(raw):
    loss = raw["loss"]
    before = median(loss[100:120])
    assert max(loss[100:120]) < 3 * before, "no spike before the corrupted batch"
    assert loss[120] > 20 * before, f"spike {loss[120]:.3g} vs recent median {before:.3g}"
    assert median(loss[140:160]) < 3 * before, "the loss recovers within 20-40 steps"


@check("nan_inf")
def check_nan_inf(raw):
    assert_nan_from(raw, 60)
    assert raw["standardize_first_nan_step"] == 60, "Standardize turned finite inputs into NaN at step 60"


@check("nan_inf_attention")
def check_nan_inf_attention(raw):
    assert_nan_from(raw, 60)
    assert raw["attn_first_nan_step"] == 60, "attn turned finite inputs into NaN at step 60"


@check("loss_plateau")
def check_plateau(raw):
    # Adam at lr 1e-7 moves no weight by more than 1.5e-5 in 150 steps: the loss stays at chance, ln 2
    assert all_finite(raw)
    assert abs(mean(raw["loss"][:10]) - mean(raw["loss"][-10:])) < 0.01
    assert abs(median(raw["loss"]) - math.log(2)) < 0.05


@check("eval_mode")
def check_eval_mode(raw):
    assert raw["training_flag"] is False
    assert raw["bn_batches_tracked"] == 0, "BatchNorm never updated its running statistics"


@check("softmax_before_loss")
def check_softmax(raw):
    # probabilities fed in as logits: CE can never go below log(9 + e) - 1 = 1.46, where a healthy
    # model of the same shape (healthy_mlp) ends near 0.01
    assert min(raw["loss"]) >= raw["loss_floor"] - 1e-4
    assert raw["loss_last"] < raw["loss_floor"] + 0.05, "it trains, and presses against the floor"


@check("adam_weight_decay")
def check_adam_weight_decay(raw):
    assert raw["optimizer"] == "Adam" and raw["weight_decay"] == 1e-2


@check("no_gradient")
def check_no_gradient(raw):
    assert all(math.isnan(v) for v in raw["layer_grad_norm"]["lstm"]), "the LSTM never gets a gradient"
    assert all(v > 0 for v in raw["layer_grad_norm"]["head"]), "the head does"


@check("missing_zero_grad")
def check_missing_zero_grad(raw):
    gn, loss = raw["grad_norm"], raw["loss"]
    # .grad holds the sum of every step's gradient: its norm climbs while the loss falls, where in a
    # healthy run the gradient shrinks with the loss
    assert gn[50] > 10 * gn[0], f"grad norm should keep growing: step 0 {gn[0]:.3g}, step 50 {gn[50]:.3g}"
    assert mean(loss[-10:]) < 0.1 * loss[0]


@check("initial_loss")
def check_initial_loss(raw):
    assert raw["loss_first"] > 3 * raw["chance_loss"], (
        f"step-0 loss {raw['loss_first']:.3g} vs chance ln(10) = {raw['chance_loss']:.3g}")


def test_every_scenario_is_checked_and_the_set_is_balanced():
    assert set(CHECKS) == set(SCENARIOS)
    healthy = [s for s in SCENARIOS.values() if s.healthy]
    faulty = [s for s in SCENARIOS.values() if not s.healthy]
    assert list(SCENARIOS)[: len(healthy)] == [s.name for s in healthy], "healthy scenarios come first"
    assert {s.model for s in faulty} == {"mlp", "cnn", "transformer", "lstm"}
    assert {s.model for s in healthy} == {"mlp", "cnn", "transformer", "lstm"}


@pytest.mark.parametrize("name", SCENARIOS)
def test_pathology_is_real(name, trained):
    run_dir, raw = trained(name)
    CHECKS[name](raw)
    assert len(raw["loss"]) == SCENARIOS[name].steps
    assert len(gradwatch.load_run(run_dir).steps) == SCENARIOS[name].steps


def test_a_scenario_is_deterministic_and_leaves_the_caller_alone(tmp_path):
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    a = run_scenario("healthy_early", tmp_path / "a")
    b = run_scenario("healthy_early", tmp_path / "b")
    c = run_scenario("healthy_early", tmp_path / "c", seed=1)
    assert a["loss"] == b["loss"]
    assert a["loss"] != c["loss"]
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_outcome(name, trained):
    run_dir, _ = trained(name)
    scenario = SCENARIOS[name]
    found = gradwatch.diagnose(run_dir).at_least("warning")
    if scenario.healthy:
        assert found == [], "false alarm:\n" + "\n".join(f.line() for f in found)
    for expect in scenario.expect:
        hits = [f for f in found if f.kind == expect.kind]
        assert hits, f"no {expect.kind} finding; found: {[(f.kind, f.layer) for f in found]}"
        if expect.layer is not None:
            assert expect.layer in {f.layer for f in hits}, f"{expect.kind} named {[f.layer for f in hits]}"
