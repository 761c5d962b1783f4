"""Every detector at once: healthy runs that look like faults, degenerate frames, and symptom folding.

Each detector's own rule (fires, stays silent, boundary, numbers in the fix) is tested in
test_detectors_loss.py (rules over the steps frame and meta) and test_detectors_layers.py (rules over
the per-layer metrics). Frames are synthetic, built with tests/_frames.py.
"""
import importlib

import numpy as np
import pandas as pd
import pytest
from _frames import (
    LAYERS,
    MLP,
    SMOOTHED_CHAIN,
    decaying,
    events_frame,
    healthy_metrics,
    make_frames,
    run_meta,
    steps_frame,
    warmup_cosine,
    wide,
)

from gradwatch.detect import MODULES, Frames, run_detectors

DETECT = {name: importlib.import_module(f"gradwatch.detect.{name}").detect for name in MODULES}
no_internal_errors = pytest.mark.filterwarnings("error::gradwatch.errors.GradwatchWarning")


# ---- healthy look-alikes: no warning or critical from any detector -------------------------------------
def clipped_growth():
    """Gradient norms that grow 100x over the run while the loss keeps falling (clipping keeps it in hand)."""
    return make_frames(decaying(500), grad_norm=np.exp(np.arange(500) / 100))


def warmup_then_cosine():
    """LR warmup over 50 steps then cosine; the loss barely moves until the LR is up, then falls."""
    s = np.arange(400)
    loss = np.where(s < 40, np.log(10), 0.3 + (np.log(10) - 0.3) * np.exp(-np.clip(s - 40, 0, None) / 40))
    return make_frames(loss, lr=warmup_cosine(400, 1e-3, 50), grad_norm=1 + 0.2 * np.cos(s))


def converged_near_zero():
    return make_frames(decaying(300, end=1e-5, tau=15))


def heavy_tailed_noise():
    """A run that converges, then sits at 0.3 with 2.5% per-step noise drawn from a student-t(3). Seed 0 has
    no draw beyond 10 scales; most seeds do (see test_loss_spike_is_silent_on_heavy_tailed_noise_of_any_seed)."""
    loss = decaying(1000, noise=0.0) * (1 + 0.025 * np.random.default_rng(0).standard_t(3, 1000))
    return make_frames(loss)


def gaussian_noise():
    loss = decaying(1000, noise=0.0) * (1 + 0.025 * np.random.default_rng(0).standard_normal(1000))
    return make_frames(loss)


def fast_early_fall(n: int = 1000):
    """The loss drops from ln(10) to 0.3 within the first 30 steps, then stays converged: flat for 970 steps,
    but at 13% of where it started, which is learning, not a plateau."""
    return make_frames(decaying(n, tau=5, noise=0.005))


def power_law_curve():
    """A language model's curve: 3 + 3 s^-0.3, still falling (3.58 after warmup, 3.17 at the end), with a
    high irreducible loss and 1% noise. Each n/5-step window falls only 1-2%, but from 5.2 over the first
    steps to about 3.2 (62%): it learned."""
    n = 5000
    loss = (3 + 3 * np.arange(1, n + 1) ** -0.3) * (1 + 0.01 * np.random.default_rng(0).standard_normal(n))
    return make_frames(loss, lr=warmup_cosine(n, 3e-4, 250), meta=run_meta(classes=50_000))


def output_sigmoid():
    """A binary classifier ending in nn.Sigmoid (before nn.BCELoss) that is confident: 99% saturated."""
    f = make_frames(decaying(200, start=0.69, end=0.05),
                    meta=run_meta(MLP + (("out", "Sigmoid"),), chain=["BinaryCrossEntropyBackward0",
                                                                      "SigmoidBackward0"], classes=None))
    f.metrics["saturation_fraction"] = wide({"out": 0.99}, f.steps["step"])
    return f


def validation_every_50():
    """model.eval() for a validation pass without torch.no_grad() flags one step in 50."""
    return make_frames(decaying(300), eval_mode=np.arange(300) % 50 == 49,
                       meta=run_meta(MLP[:2] + (("drop", "Dropout"),) + MLP[2:]))


def frozen_layers():
    """Fine-tuning: fc1 and fc2 frozen (no grad, NaN in the metrics), only the head trains."""
    f = make_frames(meta=run_meta(frozen=("fc1", "fc2")))
    f.metrics["grad_norm"][["fc1", "fc2"]] = np.nan
    return f


def scaler_finding_its_scale():
    """A GradScaler that skips its first 4 steps (inf gradients, finite loss) while halving from 65536."""
    n = 200
    skipped = np.arange(n) < 4
    scale = np.r_[65536 / 2 ** np.arange(4), np.full(n - 4, 4096.0)]
    events = events_frame(*[(s, "inf", "backward", "fc3") for s in range(4)])
    f = make_frames(grad_norm=np.where(skipped, np.inf, 1.0), skipped=skipped, loss_scale=scale,
                    events=events, meta=run_meta(scaler=True))
    f.metrics["grad_norm"].loc[0:3] = np.inf
    return f


def adam(weight_decay: float, cls: str = "Adam"):
    return lambda: make_frames(meta=run_meta(optimizer=cls, weight_decay=weight_decay))


def label_smoothing():
    """cross_entropy(..., label_smoothing=0.1): no NllLoss first in the chain, and a loss that converges to
    the smoothing's floor (about 0.5 for 10 classes) instead of 0."""
    return make_frames(decaying(300, end=0.5), meta=run_meta(chain=SMOOTHED_CHAIN))


def resumed_run():
    """A run resumed at step 10 000 from a checkpoint: nothing is measured from step 0."""
    return make_frames(decaying(200, start=0.5, end=0.3), start=10_000)


LOOK_ALIKES = {
    "default": make_frames,
    "clipped_growth": clipped_growth,
    "warmup_then_cosine": warmup_then_cosine,
    "converged_near_zero": converged_near_zero,
    "gaussian_noise": gaussian_noise,
    "heavy_tailed_noise": heavy_tailed_noise,
    "fast_early_fall": fast_early_fall,
    "power_law_curve": power_law_curve,
    "output_sigmoid": output_sigmoid,
    "validation_every_50": validation_every_50,
    "frozen_layers": frozen_layers,
    "scaler_finding_its_scale": scaler_finding_its_scale,
    "adam_without_decay": adam(0.0),
    "adamw_with_decay": adam(0.05, "AdamW"),
    "label_smoothing": label_smoothing,
    "resumed_run": resumed_run,
}


@no_internal_errors
@pytest.mark.parametrize("build", LOOK_ALIKES.values(), ids=LOOK_ALIKES.keys())
def test_healthy_look_alikes_raise_nothing_above_info(build):
    findings = run_detectors(build())
    assert [f.line() for f in findings if f.severity != "info"] == []


def test_frozen_layers_are_one_info_note():
    (note,) = run_detectors(frozen_layers())
    assert (note.kind, note.layer, note.severity) == ("no_gradient", "", "info")
    assert note.evidence["frozen"] == ["fc1", "fc2"] and note.evidence["parameters"] == 200


# ---- degenerate frames: every detector returns a list, never raises ------------------------------------
def _empty_steps():
    return Frames(steps=steps_frame(np.array([])), metrics={}, events=events_frame(), meta=run_meta())


def _all_nan_metrics():
    f = make_frames()
    f.metrics = {k: v * np.nan for k, v in f.metrics.items()}
    return f


def _inf_norms():
    f = make_frames(grad_norm=np.inf)
    f.metrics["grad_norm"][:] = np.inf
    return f


def _broken_meta():
    return make_frames(meta={"model": {}, "optimizer": [{}], "loss": {"chain": None, "classes": None},
                             "scaler": {}, "config": {}})


def _odd_events():
    """Events with a phase nobody knows, a NaN rank, and steps that are not in the steps frame."""
    ev = events_frame((5, "nan", "optimizer", ""), (999, "inf", "forward", "fc9"))
    ev.loc[0, "rank"] = np.nan
    return make_frames(loss=np.r_[decaying(5), np.full(5, np.nan)], events=ev, meta=run_meta(scaler=True))


def _every_10th_step():
    f = make_frames(metrics=healthy_metrics(np.arange(0, 2000, 10)))
    f.steps["step"] *= 10
    return f


def _bare_layers():
    """Layer entries with a name only: older or hand-written meta."""
    return make_frames(meta={"model": {"layers": [{"name": n} for n in LAYERS], "modules": []}})


DEGENERATE = {
    "empty_steps": _empty_steps,
    "one_step": lambda: make_frames(decaying(1)),
    "two_steps_no_metrics": lambda: make_frames(decaying(2), metrics={}),
    "all_nan_loss": lambda: make_frames(np.full(50, np.nan)),
    "all_inf_loss": lambda: make_frames(np.full(50, np.inf), skipped=True, meta=run_meta(scaler=True)),
    "inf_grad_norms": _inf_norms,
    "all_nan_grad_norm": lambda: make_frames(grad_norm=np.nan),
    "all_skipped_na": lambda: make_frames(skipped=None),
    "missing_metrics": lambda: make_frames(metrics={}),
    "all_nan_metrics": _all_nan_metrics,
    "metrics_without_rows": lambda: make_frames(metrics=healthy_metrics([])),
    "missing_meta_keys": lambda: make_frames(meta={}),
    "broken_meta": _broken_meta,
    "no_events": lambda: Frames(steps=steps_frame(np.r_[decaying(20), np.nan]), meta=run_meta()),
    "odd_events": _odd_events,
    "zero_loss": lambda: make_frames(np.zeros(300), grad_norm=0.0),
    "negative_loss": lambda: make_frames(-decaying(300)),
    "constant_lr_zero": lambda: make_frames(lr=0.0),
    "lr_all_nan": lambda: make_frames(lr=np.nan),  # no optimizer: the reader still writes an lr column
    "every_10th_step": _every_10th_step,
    "bare_layers": _bare_layers,
    "zero_grad_norms": lambda: make_frames(metrics={"grad_norm": wide({ly: 0.0 for ly in LAYERS}, range(200))}),
}


DEGENERATE_CASES = [pytest.param(name, build, id=f"{name}-{case}")
                    for name in MODULES for case, build in DEGENERATE.items()]


@pytest.mark.parametrize("name, case", DEGENERATE_CASES)
def test_detectors_never_raise_on_degenerate_frames(name, case):
    findings = DETECT[name](case())
    assert isinstance(findings, list)
    for f in findings:
        f.to_dict()  # JSON-safe enough to serialise, and a valid severity (checked in Finding.__post_init__)


# ---- run_detectors folds symptoms into their cause ------------------------------------------------------
def dead_network():
    """act2 dies entirely at the start: fc1 and fc2 (before it) get exactly zero gradient, the loss stays at
    ln(10); fc3 (after act2) also gets zero gradient, which act2 cannot explain."""
    n = 200
    rng = np.random.default_rng(0)
    loss = np.log(10) * (1 + 0.002 * rng.standard_normal(n))
    metrics = healthy_metrics(range(n))
    metrics["grad_norm"][["fc1", "fc2"]] = 0.0
    metrics["dead_fraction"]["act2"] = 1.0
    return make_frames(loss, metrics=metrics)


@no_internal_errors
def test_critical_dead_relu_explains_upstream_zero_gradients_and_the_plateau():
    f = dead_network()
    symptoms = {(x.kind, x.layer) for x in run_detectors(f, only=["no_gradient", "loss_plateau"])}
    assert symptoms == {("no_gradient", "fc1"), ("no_gradient", "fc2"), ("loss_plateau", "")}

    (finding,) = run_detectors(f)
    assert (finding.kind, finding.layer, finding.severity) == ("dead_relu", "act2", "critical")
    assert finding.evidence["explains"] == ["loss_plateau", "no_gradient"]
    assert "also explains the loss_plateau, no_gradient" in finding.message


@no_internal_errors
def test_dead_relu_does_not_explain_zero_gradients_after_it():
    f = dead_network()
    f.metrics["grad_norm"]["fc3"] = 0.0
    kinds = [(x.kind, x.layer) for x in run_detectors(f)]
    assert kinds == [("dead_relu", "act2"), ("no_gradient", "fc3")]


@no_internal_errors
def test_a_warning_dead_relu_explains_nothing():
    f = dead_network()
    f.metrics["dead_fraction"]["act2"] = 0.6
    kinds = {x.kind for x in run_detectors(f)}
    assert kinds == {"dead_relu", "no_gradient", "loss_plateau"}


@no_internal_errors
def test_missing_zero_grad_explains_the_explosion_it_causes():
    n = 200
    burst = (np.arange(n) >= 100) & (np.arange(n) < 106)
    f = make_frames(np.where(burst, 20.0, decaying(n)), grad_norm=np.where(burst, 50.0, 1.0),
                    grad_carried=np.arange(n) > 0)
    symptoms = {(x.kind, x.step) for x in run_detectors(f, only=["exploding", "loss_spike"])}
    assert symptoms == {("exploding_gradients", 100)}  # the explosion itself explains the spike it brings
    (explosion,) = run_detectors(f, only=["exploding", "loss_spike"])
    assert explosion.evidence["explains"] == ["loss_spike"]
    (finding,) = run_detectors(f)
    assert (finding.kind, finding.step) == ("missing_zero_grad", 1)
    assert finding.evidence["explains"] == ["exploding_gradients", "loss_spike"]


def test_run_detectors_keeps_going_past_a_broken_detector(monkeypatch):
    from gradwatch.detect import DETECTORS
    from gradwatch.errors import GradwatchWarning

    def broken(frames):
        raise KeyError("boom")

    monkeypatch.setitem(DETECTORS, "eval_mode", broken)
    f = make_frames(meta=run_meta(optimizer="Adam", weight_decay=0.1))
    with pytest.warns(GradwatchWarning, match="eval_mode detector failed"):
        kinds = [x.kind for x in run_detectors(f)]
    assert kinds == ["adam_weight_decay"]


def test_findings_come_worst_first_then_by_step():
    loss = decaying(200)
    loss[150:] = np.nan
    f = make_frames(loss, eval_mode=np.arange(200) >= 100, meta=run_meta(optimizer="Adam", weight_decay=0.1))
    found = [(x.severity, x.step, x.kind) for x in run_detectors(f)]
    assert found == [("critical", 150, "nan_inf"), ("warning", 0, "adam_weight_decay"), ("info", 100, "eval_mode")]


def test_metric_of_an_unrecorded_name_is_an_empty_step_indexed_frame():
    empty = make_frames(metrics={}).metric("dead_fraction")
    assert isinstance(empty, pd.DataFrame) and empty.empty and empty.index.name == "step"
