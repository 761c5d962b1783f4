"""Per-layer detectors, which read the wide metric frames: each fires on a clear case, stays silent on a
healthy look-alike, and flips across its thresholds (taken from the module's constants)."""
import numpy as np
import pytest
from _frames import MLP, decaying, make_frames, run_meta, warmup_cosine, wide

from gradwatch.detect import dead_relu, exploding, no_gradient, saturation, vanishing
from gradwatch.detect._common import nice, num

JUST = {"below": 0.99, "above": 1.01}  # a threshold x these: just under it, just over it


def where(findings):
    return [(f.kind, f.layer, f.step, f.severity) for f in findings]


def grads(n, model=MLP, **columns):
    """Frames whose per-layer gradient norms are `columns` (default 0.5 for every layer); global norm 1."""
    layers = [m[0] for m in model if len(m) > 2]
    metrics = {"grad_norm": wide({ly: columns.get(ly, 0.5) for ly in layers}, range(n))}
    return make_frames(n=n, metrics=metrics, meta=run_meta(model))


# ---- exploding: the run against itself -----------------------------------------------------------------
def burst(n=200, at=100, length=6, value=50.0, g=None, loss_at=None, **kw):
    """Global gradient norm `g` (default 1.0) that jumps to `value` for `length` steps from `at`; the loss
    jumps to 10 over the same steps (or only at `loss_at`). fc2's own norm grows 50x, fc1's 2x."""
    g = np.ones(n) if g is None else g.copy()
    g[at: at + length] = value
    loss = decaying(n)
    loss[slice(at, at + length) if loss_at is None else loss_at] = 10.0
    f = make_frames(loss, grad_norm=g, **kw)
    f.metrics["grad_norm"].loc[at: at + length - 1, ["fc1", "fc2"]] *= [2.0, 50.0]
    return f


def test_exploding_fires_at_the_jump_and_names_the_layer_that_grew_most():
    (f,) = exploding.detect(burst())
    assert where([f]) == [("exploding_gradients", "fc2", 100, "critical")]
    assert f.evidence["baseline_norm"] == 1.0 and f.evidence["peak_norm"] == 50.0


def test_exploding_suggests_a_clip_and_an_lr_from_the_run():
    g = 1 + 0.5 * np.random.default_rng(0).random(200)
    base = np.median(g[:100])
    (f,) = exploding.detect(burst(g=g, value=25 * base, lr=0.1))
    assert f"max_norm={num(nice(np.quantile(g[:100], 0.9)))}" in f.suggestion
    assert "from 0.1 to 0.02" in f.suggestion  # sqrt(peak / baseline) = 5: divide the LR by 5
    assert "warm the learning rate" not in f.suggestion  # step 100 is past max(50, n / 10)


@pytest.mark.parametrize("lr, advised", [(1e-3, True), (warmup_cosine(200, 1e-3, 20), False)],
                         ids=["constant_lr", "already_warming_up"])
def test_exploding_early_suggests_an_lr_warmup(lr, advised):
    (f,) = exploding.detect(burst(at=30, lr=lr))
    assert ("warm the learning rate up linearly over the first 100 steps" in f.suggestion) is advised


@pytest.mark.parametrize("side", JUST)
def test_exploding_boundary_of_growth(side):
    found = exploding.detect(burst(value=exploding.GROWTH * JUST[side]))
    assert [f.step for f in found] == ([100] if side == "above" else [])


@pytest.mark.parametrize("extra, fires", [(-1, False), (0, True)])
def test_exploding_boundary_of_persistence(extra, fires):
    assert bool(exploding.detect(burst(length=exploding.PERSIST + extra))) is fires


@pytest.mark.parametrize("offset, fires", [(2 * exploding.PERSIST - 1, True), (2 * exploding.PERSIST, False)])
def test_exploding_needs_the_loss_to_rise_within_the_next_persist_steps(offset, fires):
    found = exploding.detect(burst(length=exploding.PERSIST, loss_at=100 + offset))
    assert [f.step for f in found] == ([100] if fires else [])


LOSS_CASES = {  # the loss before the burst, and which term of the rise the rule asks for
    "relative": (np.ones(200), "half_the_median"),
    "near_zero": (1e-3 + (1.0 - 1e-3) * np.exp(-np.arange(200) / 2.0), "share_of_the_first_loss"),
    "negative": (np.full(200, -2.0), "half_the_median"),  # a log-likelihood below 0: the rise is still 1.0
}


@pytest.mark.parametrize("side", JUST)
@pytest.mark.parametrize("case", LOSS_CASES)
def test_exploding_boundary_of_the_loss_rise(case, side):
    # A 50x gradient burst at step 150: an explosion only if the loss rises above its median over the previous
    # WINDOW steps by max(0.5 x |median|, 0.05 x |first loss|).
    loss, term = LOSS_CASES[case]
    loss, at = loss.copy(), 150
    median = np.median(loss[at - exploding.WINDOW: at])
    half, share = 0.5 * abs(median), 0.05 * abs(loss[0])
    assert bool(half > share) is (term == "half_the_median")
    loss[at] = median + max(half, share) * JUST[side]
    g = np.where((np.arange(200) >= at) & (np.arange(200) < at + 6), 50.0, 1.0)
    found = exploding.detect(make_frames(loss, grad_norm=g))
    assert [f.step for f in found] == ([at] if side == "above" else [])


def test_exploding_counts_a_nonfinite_norm_as_above_after_a_finite_growth():
    n = 200
    g = np.ones(n)
    g[100], g[101:] = 50.0, np.inf
    loss = decaying(n)
    loss[101:] = np.nan
    f = make_frames(loss, grad_norm=g)
    f.metrics["grad_norm"].loc[100, "fc3"] = 50.0
    f.metrics["grad_norm"].loc[101:, "fc3"] = np.inf
    (finding,) = exploding.detect(f)
    assert where([finding]) == [("exploding_gradients", "fc3", 100, "critical")]
    assert "non-finite" in finding.message


def test_exploding_leaves_a_norm_that_is_nan_at_once_to_nan_inf():
    g = np.ones(200)
    g[100:] = np.nan
    loss = decaying(200)
    loss[100:] = np.nan
    assert exploding.detect(make_frames(loss, grad_norm=g)) == []


def test_exploding_is_silent_while_norms_grow_and_the_loss_falls():
    n = 500
    assert exploding.detect(make_frames(decaying(n), grad_norm=np.exp(np.arange(n) / 50))) == []
    g = np.where(np.arange(n) >= 100, 50.0, 1.0)  # a 50x step up, and the loss does not notice
    assert exploding.detect(make_frames(decaying(n), grad_norm=g)) == []


@pytest.mark.parametrize("scaler_skipped", [False, True])
def test_exploding_ignores_the_scalers_skipped_steps(scaler_skipped):
    # A jump then two overflowing steps with the loss up: an explosion, unless the GradScaler skipped them.
    bad = np.isin(np.arange(200), [100, 101, 102])
    g = np.where(bad, np.inf, 1.0)
    g[100] = 50.0
    f = make_frames(np.where(bad, 10.0, decaying(200)), grad_norm=g,
                    skipped=bad & scaler_skipped, meta=run_meta(scaler=True))
    assert [x.step for x in exploding.detect(f)] == ([] if scaler_skipped else [100])


# ---- exploding: first layer against the last ------------------------------------------------------------
@pytest.mark.parametrize("side", JUST)
def test_exploding_depth_boundary_of_ratio(side):
    found = exploding.detect(grads(50, fc1=exploding.DEPTH_RATIO * JUST[side], fc3=1.0))
    assert where(found) == ([("exploding_gradients", "fc1", 0, "warning")] if side == "above" else [])
    if found:
        assert found[0].evidence["first_to_last_rms"] == pytest.approx(exploding.DEPTH_RATIO * JUST["above"])


@pytest.mark.parametrize("extra, fires", [(-1, False), (0, True)])
def test_exploding_depth_boundary_of_share(extra, fires):
    # 100 steps, the first-to-last ratio 100 on the last k of them: the first high step is 100 - k.
    k = int(exploding.DEPTH_SHARE * 100) + extra
    fc1 = np.where(np.arange(100) >= 100 - k, 100.0, 1.0)
    found = exploding.detect(grads(100, fc1=fc1, fc3=1.0))
    assert where(found) == ([("exploding_gradients", "fc1", 100 - k, "warning")] if fires else [])


@pytest.mark.parametrize("model", [
    (("fc1", "Linear", 10_000),) + MLP[1:],  # 100x the norm from 100x the parameters: the same RMS scale
    (("emb", "Embedding", 100),) + MLP,      # embeddings are not part of the depth comparison
], ids=["wide_first_layer", "embedding_first"])
def test_exploding_depth_is_silent_on_width_and_embeddings(model):
    first = model[0][0]
    assert exploding.detect(grads(50, model, **{first: 100.0}, fc3=1.0)) == []


# ---- vanishing -----------------------------------------------------------------------------------------
def test_vanishing_fires_on_the_first_layer():
    (f,) = vanishing.detect(grads(50, fc1=1e-5, fc2=1e-2, fc3=0.1))
    assert where([f]) == [("vanishing_gradients", "fc1", 0, "warning")]
    assert f.evidence["starved_layers"] == ["fc1"]
    assert f.evidence["first_to_last_rms"] == pytest.approx(1e-4)
    assert "x0.01 per layer over 3 layers" in f.message  # 1e-4 over two layer-to-layer steps


def test_vanishing_step_is_the_first_low_step():
    fc1 = np.where(np.arange(100) >= 10, 1e-5, 1.0)
    assert where(vanishing.detect(grads(100, fc1=fc1, fc3=1.0))) == [("vanishing_gradients", "fc1", 10, "warning")]


@pytest.mark.parametrize("side", JUST)
def test_vanishing_boundary_of_ratio(side):
    # Last layer 0.05: the first one stays below ABSOLUTE on both sides of RATIO.
    found = vanishing.detect(grads(50, fc1=0.05 * vanishing.RATIO * JUST[side], fc3=0.05))
    assert [f.layer for f in found] == (["fc1"] if side == "below" else [])


@pytest.mark.parametrize("side", JUST)
def test_vanishing_boundary_of_absolute(side):
    # Last layer 1.0: the ratio stays below RATIO on both sides of ABSOLUTE.
    found = vanishing.detect(grads(50, fc1=vanishing.ABSOLUTE * JUST[side], fc3=1.0))
    assert [f.layer for f in found] == (["fc1"] if side == "below" else [])


@pytest.mark.parametrize("side", JUST)
def test_vanishing_boundary_of_critical_ratio(side):
    (f,) = vanishing.detect(grads(50, fc1=vanishing.CRITICAL_RATIO * JUST[side], fc3=1.0))
    assert f.severity == ("critical" if side == "below" else "warning")


@pytest.mark.parametrize("extra, fires", [(-1, False), (0, True)])
def test_vanishing_boundary_of_share(extra, fires):
    k = int(vanishing.SHARE * 100) + extra
    fc1 = np.where(np.arange(100) >= 100 - k, 1e-5, 0.5)
    assert bool(vanishing.detect(grads(100, fc1=fc1, fc3=1.0))) is fires


@pytest.mark.parametrize("extra, fires", [(-1, False), (0, True)])
def test_vanishing_boundary_of_min_steps(extra, fires):
    assert bool(vanishing.detect(grads(vanishing.MIN_STEPS + extra, fc1=1e-5, fc3=1.0))) is fires


def test_vanishing_blames_saturating_activations():
    model = (("fc1", "Linear", 100), ("a1", "Sigmoid"), ("fc2", "Linear", 100), ("a2", "Sigmoid"),
             ("fc3", "Linear", 100))
    (f,) = vanishing.detect(grads(50, model, fc1=1e-5, fc3=1.0))
    assert "Sigmoid" in f.suggestion and "0.25" in f.suggestion


@pytest.mark.parametrize("columns, model", [
    ({"fc1": 0.0, "fc3": 1.0}, MLP),                    # exactly zero: no_gradient's finding, not this one
    ({"fc1": 1e-6, "fc2": 1e-6, "fc3": 1e-6}, MLP),     # converged: every layer small alike
    ({"emb": 1e-7, "fc3": 1.0}, (("emb", "Embedding", 100),) + MLP),  # sparse embedding rows
], ids=["zero_gradient", "all_small", "embedding_first"])
def test_vanishing_is_silent(columns, model):
    assert vanishing.detect(grads(50, model, **columns)) == []


# ---- dead_relu -----------------------------------------------------------------------------------------
WINDOW = 25  # config.dead_window: the recorder's dead fraction covers steps [end - 24, end]


def dead(fractions, site="act1", n=200, model=MLP, **kw):
    """Frames with `site`'s dead fraction per window (windows end at the run's 25th, 50th, ... step)."""
    f = make_frames(n=n, meta=run_meta(model), **kw)
    ends = f.steps["step"].to_numpy()[WINDOW - 1:: WINDOW][: len(fractions)]
    f.metrics["dead_fraction"] = wide({site: np.asarray(fractions, float)}, ends)
    return f


def test_dead_relu_fires_from_the_start_of_the_first_dead_window():
    # Windows 0-24 alive, 25-49 at 60%, then 95%: the evidence starts at step 25.
    (f,) = dead_relu.detect(dead([0.1, 0.6, 0.95, 0.95], lr=0.1))
    assert where([f]) == [("dead_relu", "act1", 25, "critical")]
    assert f.evidence["dead_fraction"] == 0.95 and f.evidence["window_end"] == 49
    assert "from 0.1 to 0.01" in f.suggestion  # it died during training: the LR / 10
    assert "fc1" in f.suggestion  # the layer that feeds it, to re-initialise


def test_dead_relu_born_dead_starts_at_the_first_step_and_keeps_the_lr():
    (f,) = dead_relu.detect(dead([0.6, 0.6], start=1000))
    assert where([f]) == [("dead_relu", "act1", 1000, "warning")]
    assert "learning rate" not in f.suggestion


@pytest.mark.parametrize("side", JUST)
def test_dead_relu_boundary_of_warn(side):
    found = dead_relu.detect(dead([dead_relu.WARN * JUST[side]] * 4))
    assert where(found) == ([("dead_relu", "act1", 0, "warning")] if side == "above" else [])


@pytest.mark.parametrize("side", JUST)
def test_dead_relu_boundary_of_critical(side):
    (f,) = dead_relu.detect(dead([dead_relu.CRITICAL * JUST[side]] * 4))
    assert f.severity == ("critical" if side == "above" else "warning")


@pytest.mark.parametrize("extra, fires", [(-1, False), (0, True)])
def test_dead_relu_boundary_of_persistence(extra, fires):
    windows = [0.1] + [0.8] * (dead_relu.PERSIST + extra) + [0.1, 0.1]
    assert where(dead_relu.detect(dead(windows))) == ([("dead_relu", "act1", 25, "warning")] if fires else [])


def test_dead_relu_in_the_only_window_of_a_short_run():
    assert where(dead_relu.detect(dead([0.7], n=30))) == [("dead_relu", "act1", 0, "warning")]


def test_dead_relu_second_call_site_and_a_leaky_relu():
    model = MLP[:1] + (("act1", "LeakyReLU"),) + MLP[2:]
    (f,) = dead_relu.detect(dead([0.8, 0.8], site="act1#2", model=model))
    assert (f.layer, f.evidence["site"]) == ("act1", "act1#2")
    assert "nn.LeakyReLU(0.01)" not in f.suggestion


# ---- saturation ----------------------------------------------------------------------------------------
TANH_MLP = (("fc1", "Linear", 100), ("t1", "Tanh"), ("fc2", "Linear", 100), ("t2", "Tanh"), ("fc3", "Linear", 100))
EVERY = 10  # saturation recorded every 10 steps


def saturated(fractions, site="t1", model=TANH_MLP, **kw):
    f = make_frames(meta=run_meta(model), **kw)
    f.metrics["saturation_fraction"] = wide({site: np.asarray(fractions, float)}, np.arange(len(fractions)) * EVERY)
    return f


def test_saturation_fires_from_the_first_saturated_record():
    (f,) = saturation.detect(saturated([0.1] * 5 + [0.7] * 15, lr=0.1))
    assert where([f]) == [("saturated_activations", "t1", 50, "warning")]
    assert "+-2.5" in f.message and f.evidence["saturation_fraction"] == 0.7
    assert "from 0.1 to 0.01" in f.suggestion  # it grew during training: the LR / 10


def test_saturation_of_a_hidden_sigmoid_is_critical():
    model = TANH_MLP[:3] + (("t2", "Sigmoid"),) + TANH_MLP[4:]
    (f,) = saturation.detect(saturated([0.99] * 10, site="t2", model=model))
    assert where([f]) == [("saturated_activations", "t2", 0, "critical")] and "+-5" in f.message


def test_saturation_leaves_an_output_sigmoid_alone():
    model = MLP + (("out", "Sigmoid"),)
    assert saturation.detect(saturated([0.99] * 20, site="out", model=model)) == []


@pytest.mark.parametrize("side", JUST)
def test_saturation_boundary_of_warn(side):
    found = saturation.detect(saturated([saturation.WARN * JUST[side]] * 10))
    assert [f.step for f in found] == ([0] if side == "above" else [])


@pytest.mark.parametrize("side", JUST)
def test_saturation_boundary_of_critical(side):
    (f,) = saturation.detect(saturated([saturation.CRITICAL * JUST[side]] * 10))
    assert f.severity == ("critical" if side == "above" else "warning")


@pytest.mark.parametrize("extra, fires", [(-1, False), (0, True)])
def test_saturation_boundary_of_persistence(extra, fires):
    records = [0.1] * 3 + [0.8] * (saturation.PERSIST + extra) + [0.1] * 3
    assert [f.step for f in saturation.detect(saturated(records))] == ([30] if fires else [])


def test_saturation_on_every_record_of_a_short_run():
    assert [f.step for f in saturation.detect(saturated([0.8, 0.8]))] == [0]


# ---- no_gradient ---------------------------------------------------------------------------------------
def test_no_gradient_disconnected_and_zeroed_layers_warn_from_the_first_recorded_step():
    f = grads(50, fc1=np.nan, fc2=0.0)
    f.steps["step"] += 5
    f.metrics["grad_norm"].index += 5
    found = no_gradient.detect(f)
    assert where(found) == [("no_gradient", "fc1", 5, "warning"), ("no_gradient", "fc2", 5, "warning")]
    assert "never received a gradient" in found[0].message and "exactly zero" in found[1].message


def test_no_gradient_frozen_layers_are_one_info_note():
    f = make_frames(meta=run_meta(frozen=("fc1", "fc2")))
    f.metrics["grad_norm"][["fc1", "fc2"]] = np.nan
    (note,) = no_gradient.detect(f)
    assert where([note]) == [("no_gradient", "", 0, "info")]
    assert note.evidence == {"frozen": ["fc1", "fc2"], "parameters": 200}


def test_no_gradient_is_silent_on_a_layer_used_on_some_steps():
    branch = np.where(np.arange(50) % 3 == 0, 0.7, np.nan)  # a conditional branch
    gate = np.where(np.arange(50) % 3 == 0, 0.7, 0.0)  # an expert that is routed to now and then
    assert no_gradient.detect(grads(50, fc1=branch, fc2=gate)) == []


@pytest.mark.parametrize("extra, fires", [(-1, False), (0, True)])
def test_no_gradient_boundary_of_min_steps(extra, fires):
    assert bool(no_gradient.detect(grads(no_gradient.MIN_STEPS + extra, fc2=np.nan))) is fires


def test_no_gradient_skips_layers_without_a_recorded_metric():
    f = make_frames(metrics={"grad_norm": wide({"fc1": 0.5}, range(50))})
    assert no_gradient.detect(f) == []


def test_exploding_catches_a_run_that_blows_up_in_its_first_steps():
    """An LR far too high: the norm grows 20-1000x a step from step 1 on, with no healthy stretch to learn a
    baseline from. The median of the (at least MIN_HISTORY) steps before is enough."""
    g = np.array([0.25, 4.8, 145.0, 265.0, 1.4e5, 8.2e8, 5.2e16] + [np.inf] * 13)
    loss = np.array([1.4, 4.6, 614.0, 96.0, 4.2e6, 1.5e10, 3e22] + [np.nan] * 13)
    (f,) = exploding.detect(make_frames(loss, grad_norm=g))
    assert (f.kind, f.step, f.severity) == ("exploding_gradients", exploding.MIN_HISTORY, "critical")
    assert "then non-finite" in f.message and "this run's norm before the jump" in f.suggestion


BERT_LIKE = tuple((f"layer.{b}.{name}", "Linear", size) for b in range(2)
                  for name, size in (("query", 1056), ("key", 1056), ("value", 1056), ("out", 1056),
                                     ("ffn", 2112), ("ffn_out", 2080))) + (("classifier", "Linear", 66),)


def test_vanishing_is_silent_on_a_transformer_whose_attention_query_starts_with_tiny_gradients():
    """Norms from a real 2-layer Bert at init: query/key get ~3e-5, the rest of each block ~5e-3, the small
    classifier 0.33. The query alone is 1e-5 of the classifier per parameter; the first third is not."""
    norms = {"query": 2.8e-5, "key": 3.2e-5, "value": 3.1e-3, "out": 7.3e-3, "ffn": 7.0e-3, "ffn_out": 8.4e-3}
    columns = {f"layer.{b}.{k}": v for b in range(2) for k, v in norms.items()} | {"classifier": 0.33}
    assert vanishing.detect(grads(60, model=BERT_LIKE, **columns)) == []
    starved = {name: (v * 1e-4 if name != "classifier" else v) for name, v in columns.items()}
    (f,) = vanishing.detect(grads(60, model=BERT_LIKE, **starved))  # every block starved: vanishing
    assert (f.kind, f.layer) == ("vanishing_gradients", "layer.0.query")
