"""Live diagnosis while training: the monitor thread, on_finding, halt_on, the log line, the findings table.

Also the two recordings the detectors rely on: .grad left over from the previous step (missing
zero_grad), and the loss's autograd chain.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.errors import GradwatchHalt


def _mlp(out: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out))


def _batch(n: int = 32, classes: int = 5):
    return torch.randn(n, 8), torch.randint(0, classes, (n,))


def _train(model, opt, gw, steps: int, zero_grad: bool = True) -> None:
    for _ in range(steps):
        x, y = _batch()
        if zero_grad:
            opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        gw.step(loss)


def test_grad_carried_marks_steps_whose_grad_was_not_reset(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "a", detect_every=0) as gw:
        _train(model, opt, gw, 3, zero_grad=True)
        _train(model, opt, gw, 3, zero_grad=False)
        opt.zero_grad(set_to_none=False)  # zeroed in place, not set to None: still a reset
        _train(model, opt, gw, 2, zero_grad=False)
    carried = gradwatch.load_run(tmp_path / "a").steps["grad_carried"].tolist()
    assert carried == [False, False, False, True, True, True, False, True]


def test_accumulation_with_one_zero_grad_per_step_is_not_carried(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "a", detect_every=0) as gw:
        for _ in range(4):
            opt.zero_grad()
            for _ in range(3):
                x, y = _batch()
                (nn.functional.cross_entropy(model(x), y) / 3).backward()
            opt.step()
            gw.step()
    assert not gradwatch.load_run(tmp_path / "a").steps["grad_carried"].any()


def test_loss_chain_and_classes_are_recorded(tmp_path):
    model = nn.Sequential(_mlp(out=7), nn.Softmax(dim=1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "a", detect_every=0) as gw:
        x, y = _batch(classes=7)
        loss = nn.functional.cross_entropy(model(x), y) / 2
        loss.backward()
        opt.step()
        gw.step(loss)
    described = gradwatch.load_run(tmp_path / "a").meta["loss"]
    assert described["chain"][:4] == ["DivBackward0", "NllLossBackward0", "LogSoftmaxBackward0", "SoftmaxBackward0"]
    assert described["classes"] == 7


def test_live_findings_reach_the_callback_the_log_and_the_store(tmp_path, caplog):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = []
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "a", detect_every=0.1,
                             on_finding=seen.append) as gw:
            _train(model, opt, gw, 40, zero_grad=False)
    kinds = [f.kind for f in seen]
    assert kinds.count("missing_zero_grad") == 1  # announced once, however many passes saw it
    lines = [r.getMessage() for r in caplog.records if "missing_zero_grad" in r.getMessage()]
    assert len(lines) == 1 and "zero_grad(set_to_none=True)" in lines[0]
    stored = gradwatch.load_run(tmp_path / "a").findings
    assert "missing_zero_grad" in stored["kind"].tolist()
    assert stored["first_seen"].notna().all()
    fresh = gradwatch.diagnose(tmp_path / "a").findings
    assert sorted((f.kind, f.layer, f.step) for f in fresh) == sorted(
        zip(stored["kind"], stored["layer"], stored["step"]))


def test_halt_on_critical_stops_a_doomed_run_early(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with pytest.raises(GradwatchHalt, match="missing_zero_grad") as info:
        with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "a", detect_every=0.1,
                             halt_on="critical") as gw:
            for _ in range(100_000):
                _train(model, opt, gw, 1, zero_grad=False)
    assert info.value.finding.severity == "critical"
    assert gw.global_step < 100_000
    run = gradwatch.load_run(tmp_path / "a")
    assert run.status == "crashed" and "GradwatchHalt" in run.meta["error"]


def test_halt_on_critical_ignores_warnings(tmp_path):
    model = nn.Sequential(_mlp(), nn.Softmax(dim=1))  # softmax_before_loss is a warning
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "a", detect_every=0.1,
                         halt_on="critical") as gw:
        _train(model, opt, gw, 60)
    assert "softmax_before_loss" in gradwatch.load_run(tmp_path / "a").findings["kind"].tolist()


def test_detect_every_zero_runs_no_monitor(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "a", detect_every=0) as gw:
        _train(model, opt, gw, 10, zero_grad=False)
    assert gradwatch.load_run(tmp_path / "a").findings.empty


@pytest.mark.parametrize("kwargs,match", [
    ({"halt_on": "fatal"}, "halt_on must be None, 'warning' or 'critical', got halt_on='fatal'"),
    ({"halt_on": "critical", "detect_every": 0}, "halt_on needs the live detectors"),
    ({"detect_every": -1}, "detect_every must be 0 .* got detect_every=-1"),
])
def test_bad_live_options_are_clear_errors(kwargs, match, tmp_path):
    with pytest.raises(gradwatch.GradwatchError, match=match):
        gradwatch.watch(_mlp(), run_dir=tmp_path / "a", **kwargs)


def test_on_finding_must_be_callable(tmp_path):
    with pytest.raises(TypeError, match="on_finding must be a function"):
        gradwatch.watch(_mlp(), run_dir=tmp_path / "a", on_finding="print")
