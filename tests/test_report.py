"""The report renderers (Markdown, JSON, HTML with inline SVG) and `gradwatch report`.

Reports are built by hand from synthetic frames and findings, so nothing here depends on the detectors.
Golden files: run with GRADWATCH_UPDATE_GOLDEN=1 to rewrite tests/golden/report.* after a deliberate change.
"""
import importlib
import json
import math
import os
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import _svg
from gradwatch.cli import main
from gradwatch.detect import Finding, Frames, sort_findings
from gradwatch.diagnosis import REPORT_SCHEMA, Report
from gradwatch.report import MAX_BINS, MAX_CELLS, _bin_mean, render, to_html, to_json, to_markdown

GOLDEN = Path(__file__).parent / "golden"
LAYERS = ["fc1", "fc2", "head"]
SPIKE = 37  # the step where the synthetic loss and fc2's gradient jump
CLIP = "Clip gradients: `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=2.5)` before `opt.step()`."


# ---- synthetic reports -------------------------------------------------------------------------------------
def steps_frame(n: int, loss: np.ndarray | None = None) -> pd.DataFrame:
    s = np.arange(n)
    loss = 2.0 * np.exp(-s / 30) + 0.05 * np.sin(s) if loss is None else loss
    return pd.DataFrame({"step": s, "time": 1.7e9 + 0.5 * s, "loss": loss, "lr": 1e-3,
                         "grad_norm": 1.0 + 0.1 * np.cos(s), "skipped": False, "loss_scale": np.nan,
                         "nonfinite": ~np.isfinite(loss), "eval_mode": False})


def demo_frames() -> Frames:
    s = np.arange(60)
    loss = 2.0 * np.exp(-s / 30) + 0.05 * np.sin(s)
    loss[SPIKE] = 25.0
    grad = pd.DataFrame({"fc1": 0.5 + 0.05 * np.sin(s), "fc2": 0.05 * np.exp(-s / 20), "head": 2.0 + 0 * s},
                        index=pd.Index(s, name="step"))
    grad.loc[SPIKE, "fc2"] = 80.0
    dead_steps = np.arange(0, 60, 5)
    dead = pd.DataFrame({"act": np.linspace(0.05, 0.4, len(dead_steps))}, index=pd.Index(dead_steps, name="step"))
    return Frames(steps=steps_frame(60, loss), metrics={"grad_norm": grad, "dead_fraction": dead})


DEMO_META = {
    "name": "demo", "status": "finished", "start_time": 1_700_000_000.0, "end_time": 1_700_000_030.0,
    "gradwatch_version": "0.1.0", "torch_version": "2.4.0", "python_version": "3.11.7", "device": "cpu",
    "model": {"class": "MLP", "parameters": 12_345, "trainable_parameters": 12_345,
              "layers": [{"name": n, "type": "Linear", "parameters": p, "trainable": True, "shapes": {}}
                         for n, p in zip(LAYERS, (4_160, 4_160, 4_025))],
              "activations": [{"name": "act", "type": "ReLU", "kind": "relu"}]},
    "optimizer": [{"class": "AdamW", "param_groups": [{"lr": 0.001, "weight_decay": 0.01, "betas": [0.9, 0.999],
                                                       "n_params": 6}]}],
    "config": {"every": 1, "detail_every": 10},
}

DEMO_FINDINGS = [
    Finding("adam_weight_decay", "", 0, "info", "Adam with weight_decay=0.01 couples decay to the gradient scale.",
            "Use `torch.optim.AdamW` for decoupled weight decay.", {"weight_decay": 0.01}),
    Finding("loss_spike", "", SPIKE, "warning", f"Loss jumped to 25 at step {SPIKE}, 31x its running median.",
            "Lower the learning rate to 5e-4 or add warmup.", {"ratio": 31.0, "median": 0.8, "loss": 25.0}),
    Finding("exploding_gradients", "fc2", SPIKE, "critical",
            f"Gradient norm of fc2 reached 80 at step {SPIKE}, 1600x its median of 0.05.", CLIP,
            {"grad_norm": 80.0, "median": 0.05, "steps": [SPIKE]}),
]


def demo_report(findings=None, frames=None, meta=None) -> Report:
    frames = demo_frames() if frames is None else frames
    n = len(frames.steps)
    return Report(run_dir="runs/demo", name="demo", status="finished", n_steps=n,
                  last_step=int(frames.steps["step"].iloc[-1]) if n else None,
                  findings=sort_findings(DEMO_FINDINGS if findings is None else findings),
                  meta=DEMO_META if meta is None else meta, frames=frames)


# ---- golden files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["md", "json", "html"])
def test_golden(fmt):
    path = GOLDEN / f"report.{fmt}"
    text = render(demo_report(), fmt)
    if os.environ.get("GRADWATCH_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{path} differs; GRADWATCH_UPDATE_GOLDEN=1 rewrites it"


def test_render_rejects_an_unknown_format():
    with pytest.raises(ValueError, match=r"fmt must be one of \['md', 'html', 'json'\], got fmt='pdf'"):
        render(demo_report(), "pdf")


# ---- Markdown ---------------------------------------------------------------------------------------------
def test_markdown_lists_findings_worst_first_with_their_fixes():
    md = to_markdown(demo_report())
    assert md.startswith("# gradwatch report: demo\n")
    assert "**Verdict:** demo: finished, 60 steps, 1 critical, 1 warning, 1 info" in md
    assert "| model | MLP, 12,345 parameters |" in md and "| optimizer | AdamW, lr 0.001 |" in md
    assert md.index("### Critical (1)") < md.index("### Warning (1)") < md.index("### Info (1)")
    assert f"- **exploding_gradients** in `fc2` at step {SPIKE}: Gradient norm of fc2 reached 80" in md
    assert f"- **loss_spike** run-wide at step {SPIKE}" in md
    assert f"  - Fix: {CLIP}" in md  # code in backticks is kept as written


def test_markdown_keeps_a_multiline_message_inside_its_list_item():
    f = Finding("k", "a|b", 3, "warning", "first line\nsecond line", "fix it")
    md = to_markdown(demo_report([f]))
    assert "first line\n  second line\n  - Fix: fix it" in md


# ---- JSON -------------------------------------------------------------------------------------------------
def _strict_loads(text: str):
    def no_constant(name):
        raise AssertionError(f"{name} in JSON output")
    return json.loads(text, parse_constant=no_constant)


def test_json_round_trips_with_a_versioned_schema():
    doc = _strict_loads(to_json(demo_report()))
    assert list(doc) == ["schema", "run", "summary", "findings"]
    assert doc["schema"] == REPORT_SCHEMA == "gradwatch.report/1"
    assert doc["summary"] == {"healthy": False, "worst": "critical",
                              "counts": {"info": 1, "warning": 1, "critical": 1},
                              "line": "demo: finished, 60 steps, 1 critical, 1 warning, 1 info"}
    run = doc["run"]
    assert (run["name"], run["n_steps"], run["last_step"], run["start_time"]) == ("demo", 60, 59, 1.7e9)
    assert run["model"] == {"class": "MLP", "parameters": 12_345, "trainable_parameters": 12_345,
                            "n_layers": 3, "n_activations": 1}
    assert run["optimizer"][0]["param_groups"][0]["lr"] == 0.001
    assert [f["severity"] for f in doc["findings"]] == ["critical", "warning", "info"]
    first = doc["findings"][0]
    assert list(first) == ["kind", "layer", "step", "severity", "message", "suggestion", "evidence"]
    assert first["evidence"] == {"grad_norm": 80.0, "median": 0.05, "steps": [SPIKE]}


def test_json_writes_nan_inf_and_numpy_values_as_plain_json():
    f = Finding("nan_inf", "fc1", 4, "critical", "m", "s",
                {"value": float("nan"), "peak": float("inf"), "n": np.int64(3), "ok": np.bool_(True),
                 "trace": np.array([1.0, np.nan]), "pair": (1, -math.inf)})
    doc = _strict_loads(to_json(demo_report([f], meta={"start_time": float("nan")})))
    assert doc["findings"][0]["evidence"] == {"n": 3, "ok": True, "pair": [1, None], "peak": None,
                                              "trace": [1.0, None], "value": None}
    assert doc["run"]["start_time"] is None


# ---- HTML -------------------------------------------------------------------------------------------------
VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}


class TagChecker(HTMLParser):
    """Fails on an end tag that does not close the innermost open element."""

    def __init__(self):
        super().__init__()
        self.stack, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def parse(html: str) -> TagChecker:
    checker = TagChecker()
    checker.feed(html)
    checker.close()
    assert checker.stack == [], f"unclosed: {checker.stack}"
    return checker


def test_html_is_self_contained_and_well_formed():
    html = to_html(demo_report())
    tags = parse(html).tags
    assert "http://" not in html and "https://" not in html
    assert not [t for t, a in tags if t in ("script", "link", "img", "iframe") or "src" in a or "href" in a]
    assert "@import" not in html and "url(" not in html
    charts = [a["aria-label"] for t, a in tags if t == "svg" and a.get("role") == "img"]
    assert charts == ["Loss", "Gradient norm per layer (log colour scale, mean per step bin)",
                      "Dead fraction per activation"]


def test_html_shows_verdict_findings_and_metadata():
    html = to_html(demo_report())
    assert '<p class="verdict critical">demo: finished, 60 steps, 1 critical, 1 warning, 1 info</p>' in html
    assert html.index('class="finding critical"') < html.index('class="finding warning"') < html.index(
        'class="finding info"')
    assert "<code>torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=2.5)</code>" in html
    assert "<th>model</th><td>MLP, 12,345 parameters</td>" in html
    assert "2023-11-14 22:13:20 UTC" in html


def test_html_marks_the_loss_spike_and_non_finite_steps():
    frames = demo_frames()
    frames.steps.loc[50, ["loss", "nonfinite"]] = [np.nan, True]
    html = to_html(demo_report(frames=frames))
    assert f"<title>loss_spike at step {SPIKE}: Loss jumped" in html
    assert "<title>non-finite values at step 50</title>" in html


def test_html_escapes_names_from_the_run():
    evil = "<script>alert(1)</script>"
    frames = demo_frames()
    frames.metrics["grad_norm"] = frames.metrics["grad_norm"].rename(columns={"fc1": evil})
    meta = {**DEMO_META, "model": {**DEMO_META["model"], "class": evil}}
    f = Finding("k", evil, 1, "warning", evil, evil, {evil: evil})
    html = to_html(demo_report([f], frames=frames, meta=meta))
    parse(html)
    assert "<script" not in html and html.count("&lt;script&gt;") >= 6


def test_loss_chart_is_log_scaled_only_when_the_positive_loss_spans_two_decades():
    wide = steps_frame(50, np.geomspace(1e3, 1e-1, 50))
    assert "loss (log)" in to_html(demo_report(frames=Frames(steps=wide)))
    narrow = steps_frame(50, np.linspace(5, 0.1, 50))
    assert "loss (log)" not in to_html(demo_report(frames=Frames(steps=narrow)))


# ---- healthy, empty and broken data -------------------------------------------------------------------------
def test_a_report_without_findings_says_healthy():
    report = demo_report([])
    assert "No problems found." in to_markdown(report) and "No problems found." in to_html(report)
    assert '<p class="verdict healthy">' in to_html(report)
    summary = _strict_loads(to_json(report))["summary"]
    assert summary["healthy"] is True and summary["worst"] is None and summary["line"].endswith("healthy")


def nasty_frames() -> Frames:
    loss = np.linspace(1, 2, 20)
    loss[[3, 4]] = np.nan
    loss[7] = np.inf
    grad = pd.DataFrame({"a": np.full(20, np.nan), "b": np.linspace(0, 1, 20)}, index=pd.Index(range(20), name="step"))
    grad.loc[7, "b"] = np.inf
    dead = pd.DataFrame({"r": [np.nan, 0.5, np.inf]}, index=pd.Index([0, 5, 10], name="step"))
    return Frames(steps=steps_frame(20, loss), metrics={"grad_norm": grad, "dead_fraction": dead})


def without_frames() -> Report:
    report = demo_report()
    report.frames = None
    return report


@pytest.mark.parametrize("make", [
    lambda: demo_report(frames=nasty_frames()),
    lambda: demo_report(frames=Frames(steps=steps_frame(20, np.full(20, np.nan)))),  # every loss NaN
    lambda: demo_report(frames=Frames(steps=steps_frame(1))),  # a single step
    lambda: demo_report(frames=Frames(steps=steps_frame(10, np.full(10, 0.7)))),  # a constant loss
    lambda: demo_report(frames=Frames(steps=steps_frame(0)), meta={}),  # nothing recorded, no metadata
    without_frames,
], ids=["nan-inf", "all-nan", "one-step", "constant", "empty", "no-frames"])
@pytest.mark.parametrize("fmt", ["md", "json", "html"])
def test_renderers_survive_odd_data(make, fmt):
    text = render(make(), fmt)
    if fmt == "html":
        values = [v for _, attrs in parse(text).tags for v in attrs.values() if v]
        assert not [v for v in values if re.search(r"\b(nan|inf)\b", v, re.IGNORECASE)]  # no x="nan"
    if fmt == "json":
        _strict_loads(text)


def test_inf_gradients_get_their_own_colour():
    html = to_html(demo_report(frames=nasty_frames()))
    assert f'fill="{_svg.INF_COLOUR}"' in html


def test_a_100k_step_run_renders_small_and_fast():
    n, layers = 100_000, 50
    s = np.arange(n)
    loss = 3 * np.exp(-s / 20_000) + 0.01 * np.sin(s / 7)
    loss[[12_345, 67_890]] = [40.0, np.nan]
    grad = pd.DataFrame(np.abs(np.sin(np.outer(s, np.arange(1, layers + 1)) / 1000)) + 1e-4,
                        index=pd.Index(s, name="step"), columns=[f"blocks.{i}.mlp.fc" for i in range(layers)])
    dead = pd.DataFrame({f"blocks.{i}.act": np.linspace(0, i / 20, n) for i in range(20)},
                        index=pd.Index(s, name="step"))
    frames = Frames(steps=steps_frame(n, loss), metrics={"grad_norm": grad, "dead_fraction": dead})
    report = demo_report(frames=frames)
    start = time.perf_counter()
    html = to_html(report)
    elapsed = time.perf_counter() - start
    assert len(html.encode()) < 2_000_000, f"{len(html.encode()):,} bytes"
    assert elapsed < 5.0, f"{elapsed:.1f} s"
    assert "<title>non-finite values at step 67890</title>" in html
    assert f'viewBox="0 0 {MAX_BINS} {layers}"' in html  # the heatmap: 200 step bins x 50 layers


def test_a_deep_model_keeps_the_heatmap_small():
    rng = np.random.default_rng(0)  # noise: no two neighbouring cells share a colour, the worst case
    grad = pd.DataFrame(rng.lognormal(size=(5_000, 400)), index=pd.Index(range(5_000), name="step"),
                        columns=[f"layers.{i}" for i in range(400)])
    html = to_html(demo_report(frames=Frames(steps=steps_frame(5_000), metrics={"grad_norm": grad})))
    assert html.count("<rect") < MAX_CELLS + 100 and len(html.encode()) < 2_000_000


# ---- SVG builders -------------------------------------------------------------------------------------------
def test_bin_mean_averages_each_bin_and_keeps_inf():
    wide = pd.DataFrame({"a": [1.0, 3.0, np.nan, np.nan, 5.0, np.inf]}, index=pd.Index(range(6), name="step"))
    values, span = _bin_mean(wide, 3)
    assert span == (0.0, 6.0)
    np.testing.assert_array_equal(values, [[2.0, np.nan, np.inf]])


def test_envelope_keeps_spikes_and_gaps():
    xs = np.arange(10_000, dtype=float)
    ys = np.ones(10_000)
    ys[4321], ys[100:200] = 50.0, np.nan
    ys[5000:6000] = np.nan
    ex, ey = _svg.envelope(xs, ys, 200)
    assert len(ex) <= 200 and ey[ex == 4321][0] == 50.0
    assert np.isnan(ey).any() and np.all(np.diff(ex) >= 0)


def test_ticks_are_round_numbers():
    assert _svg.ticks(0, 59) == [0, 10, 20, 30, 40, 50]
    assert _svg.ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert _svg.ticks(3.0, 3.0) == [3.0]


def test_line_chart_draws_a_single_point_as_a_dot_and_escapes_text():
    svg = _svg.line_chart([("a<b", [5], [1.0]), ("c&d", [5], [2.0])], title="t<1>", y_label="y&")
    assert svg.count("<circle") == 2
    assert "t&lt;1&gt;" in svg and "a&lt;b" in svg and "y&amp;" in svg and "a<b" not in svg


def test_charts_without_data_say_so():
    assert "no data" in _svg.line_chart([], title="x")
    assert "no data" in _svg.line_chart([("a", [1, 2], [np.nan, np.inf])], title="x")
    assert "no data" in _svg.heatmap(np.full((2, 3), np.nan), ["a", "b"], (0, 3), title="x")


# ---- the CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real run store from a short training run."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=run_dir)
    for _ in range(8):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        gw.step(loss)
    gw.close()
    return run_dir


@pytest.fixture
def detectors(monkeypatch):
    """Set the findings `diagnose` sees (the real detectors are tested on their own)."""
    found: list[Finding] = []
    monkeypatch.setattr(importlib.import_module("gradwatch.diagnosis"), "run_detectors", lambda frames: list(found))
    return found


WARN = Finding("loss_spike", "", 3, "warning", "Loss jumped.", "Lower the learning rate.")
CRIT = Finding("nan_inf", "2", 5, "critical", "NaN in the output of 2.", "Lower the learning rate.")


def test_cli_report_prints_markdown_by_default(real_run, detectors, capsys):
    assert main(["report", str(real_run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# gradwatch report: run\n") and "| model | Sequential, 49 parameters |" in out
    assert "| optimizer | SGD, lr 0.1 |" in out and "No problems found." in out


def test_cli_report_fails_only_at_or_above_fail_on(real_run, detectors, capsys):
    detectors.append(WARN)
    assert main(["report", str(real_run)]) == 0  # no --fail-on: never fails
    assert main(["report", str(real_run), "--fail-on", "critical"]) == 0
    assert main(["report", str(real_run), "--fail-on", "warning"]) == 1
    capsys.readouterr()
    detectors.append(CRIT)
    assert main(["report", str(real_run), "--fail-on", "critical", "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["worst"] == "critical" and doc["run"]["n_steps"] == 8


def test_cli_report_writes_a_file_and_says_where(real_run, detectors, tmp_path, capsys):
    detectors.append(CRIT)
    out = tmp_path / "new" / "dir" / "report.html"
    assert main(["report", str(real_run), "-o", str(out), "--fail-on", "warning"]) == 1
    std = capsys.readouterr()
    assert std.out == f"{out}\n"
    assert std.err == "run: finished, 8 steps, 1 critical\n"
    html = out.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")  # the format follows the suffix
    assert 'aria-label="Loss"' in html and 'aria-label="Gradient norm per layer' in html


@pytest.mark.parametrize("args, needle", [
    (["missing"], "is not a folder"),
    (["empty"], "holds no gradwatch run"),
    (["corrupt"], "cannot be read"),
    (["run", "-o", "blocker/report.md"], "-o/--output="),
])
def test_cli_report_bad_input_exits_2(real_run, detectors, tmp_path, capsys, monkeypatch, args, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "gradwatch.db").write_bytes(b"junk" * 1000)
    (tmp_path / "blocker").write_text("x")
    (tmp_path / "run").symlink_to(real_run)
    monkeypatch.chdir(tmp_path)
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradwatch: error: ") and needle in err and len(err.strip().splitlines()) == 1


def test_cli_report_rejects_a_bad_format(real_run, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", str(real_run), "--format", "pdf"])
    assert exc.value.code == 2 and "invalid choice: 'pdf'" in capsys.readouterr().err
