"""`gradwatch demo`: five real runs, the healthy one clean, every other one flagged with its own kind."""
import logging
import sys
import time
import types

import gradwatch
from gradwatch.cli import main
from gradwatch.demo import DEMO_RUNS
from gradwatch.scenarios import SCENARIOS


def test_demo_trains_labelled_runs_prints_verdicts_and_reruns_cleanly(tmp_path, capsys, monkeypatch):
    root = tmp_path / "demo"
    level = logging.getLogger("gradwatch").level
    start = time.monotonic()
    assert main(["demo", "--runs-dir", str(root), "--no-dashboard"]) == 0
    took = time.monotonic() - start
    out = capsys.readouterr().out

    assert took < 60, f"the demo took {took:.1f}s, over the 60 s budget"
    assert logging.getLogger("gradwatch").level == level  # the live log is hushed only while training
    runs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(runs) >= 4 and "healthy" in runs
    assert runs == sorted(DEMO_RUNS)
    for run, scenario in DEMO_RUNS.items():
        report = gradwatch.diagnose(root / run)
        flagged = {f.kind for f in report.at_least("warning")}
        expected = {e.kind for e in SCENARIOS[scenario].expect}
        if run == "healthy":
            assert not flagged, f"the healthy demo run has findings: {flagged}"
        else:
            assert expected and expected <= flagged, f"{run}: expected {expected}, got {flagged}"
        assert report.n_steps == SCENARIOS[scenario].steps
        assert report.summary() in out  # every run named, with its verdict
    assert "healthy: finished, 200 steps, healthy" in out
    for kind in ("exploding_gradients", "vanishing_gradients", "dead_relu", "nan_inf"):
        assert f"] {kind}" in out  # the top finding of each sick run, with its fix
    assert out.count("  fix: ") == len(DEMO_RUNS) - 1

    # a second run replaces the demo runs (same step counts, no appended rows), keeps anything else, and
    # opens the dashboard through the launcher with the CLI's port and host
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("keep me")
    calls = []
    fake = types.ModuleType("gradwatch._launch")
    fake.launch_dashboard = lambda runs_dir, port, host: calls.append((str(runs_dir), port, host)) or 0
    monkeypatch.setitem(sys.modules, "gradwatch._launch", fake)
    assert main(["demo", "--runs-dir", str(root), "--port", "8599", "--host", "127.0.0.1"]) == 0
    out = capsys.readouterr().out
    assert calls == [(str(root), 8599, "127.0.0.1")]
    assert "Opening the dashboard on http://127.0.0.1:8599" in out
    assert (root / "mine" / "notes.txt").read_text() == "keep me"
    for run, scenario in DEMO_RUNS.items():
        assert gradwatch.load_run(root / run).steps.shape[0] == SCENARIOS[scenario].steps
