"""The dashboard pages under Streamlit's AppTest, on real stores written by short real training runs.

Each page is run headless in-process: the elements it shows (titles, badges, findings, charts), no exception,
and a clear message, never a traceback, for each kind of bad input the issue lists.
"""
from __future__ import annotations

import io
import shutil
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("altair")

import torch  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import gradwatch  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
TIMEOUT = 30
CHART = "vega_lite_chart"  # how AppTest names st.altair_chart elements (Streamlit 1.4x+)


# ---- real runs ----------------------------------------------------------------------------------------------
class Trainer:
    """A tiny MLP on a learnable teacher task; `zero_grad=False` or `dead=True` plants a bug."""

    def __init__(self, run_dir: Path, zero_grad: bool = True, dead: bool = False):
        torch.manual_seed(0)
        self.g = torch.Generator().manual_seed(0)
        self.teacher = torch.randn(16, 4, generator=self.g)
        self.model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        if dead:  # every unit of the second ReLU starts, and stays, negative
            with torch.no_grad():
                self.model[2].bias.fill_(-10.0)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.zero_grad = zero_grad
        self.gw = gradwatch.watch(self.model, optimizer=self.opt, run_dir=run_dir, detect_every=0.2)

    def steps(self, n: int) -> Trainer:
        for _ in range(n):
            x = torch.randn(64, 16, generator=self.g)
            loss = F.cross_entropy(self.model(x), (x @ self.teacher).argmax(1))
            if self.zero_grad:
                self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.gw.step(loss)
        self.gw.flush()
        return self

    def close(self) -> None:
        self.gw.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    Trainer(root / "healthy").steps(60).close()
    Trainer(root / "nozero", zero_grad=False).steps(60).close()
    Trainer(root / "dead", dead=True).steps(60).close()
    return root


def app(runs_dir: Path | str, monkeypatch) -> AppTest:
    monkeypatch.setenv("GRADWATCH_RUNS_DIR", str(runs_dir))
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


def page(at: AppTest, script: str, **params) -> AppTest:
    """Open one page of the app with these URL query parameters (AppTest needs a first run to know the pages)."""
    at.run()
    for k, v in params.items():
        at.query_params[k] = v
    return at.switch_page(script).run()


def text(at: AppTest) -> str:
    """Everything the page says, joined (markdown, alerts, captions, headers, expander labels, metrics)."""
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "error", "warning", "info", "success"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [e.label for e in at.expander]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    return "\n".join(parts)


def charts(at: AppTest) -> int:
    return len(at.get(CHART))


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


# ---- the pages ----------------------------------------------------------------------------------------------
def test_overview_lists_every_run_with_status_health_and_a_link(runs, monkeypatch):
    at = app(runs, monkeypatch).run()
    ok(at)
    assert at.title[0].value == "Runs"
    links = {link.proto.label: link.proto for link in at.get("page_link")}
    assert set(links) >= {"healthy", "nozero", "dead"}
    assert "run=nozero" in links["nozero"].query_string
    body = text(at)
    assert ":green-badge[:material/check_circle: finished]" in body
    assert "critical" in body and "healthy" in body
    assert "3** runs" in body
    assert any(link.proto.label == "Compare runs" for link in at.get("page_link"))
    assert not at.error


def test_run_page_of_a_sick_run_shows_verdict_findings_charts_and_downloads(runs, monkeypatch):
    at = page(app(runs, monkeypatch), "run_page.py", run="nozero")
    ok(at)
    assert at.header[0].value == "nozero"
    body = text(at)
    assert ":red-badge[" in body and "critical" in body  # the verdict badge
    assert any("missing_zero_grad" in e.label and "[**critical**]" in e.label for e in at.expander)
    assert "zero_grad(set_to_none=True)" in body  # the finding's suggestion
    assert at.error and "Missing zero grad" in at.error[0].value  # the headline of the worst finding
    assert {m.label: m.value for m in at.metric}["Steps"] == "60"
    # loss, grad norm, LR, update ratio, heatmap, layer curves, dead units (saturation: no tanh here)
    assert charts(at) >= 7
    assert {b.label for b in at.get("download_button")} == {"Steps (CSV)", "Layers, long form (CSV)",
                                                          "Health report (HTML)"}
    assert any(d.label == "Layers to plot" for d in at.multiselect)


def test_the_downloads_build_the_runs_csv_frames_and_its_html_report(runs, monkeypatch):
    import importlib

    import pandas as pd

    app(runs, monkeypatch).run()  # registers the app's package, whatever the install
    sections = importlib.import_module("gradwatch._dashboard._sections")
    html = sections._deferred(lambda: sections._report_html(runs / "nozero"), html=True)()
    assert html.lstrip().lower().startswith("<!doctype html") and "missing_zero_grad" in html
    layers = pd.read_csv(io.StringIO(sections._deferred(lambda: sections._layers_csv(runs / "nozero"))()))
    assert list(layers.columns) == ["step", "layer", "metric", "value"] and len(layers) > 100
    broken = sections._deferred(lambda: sections._report_html(runs / "nosuchrun"), html=True)()
    assert "could not build this file" in broken and "<p>" in broken


def test_run_page_of_a_healthy_run_says_healthy(runs, monkeypatch):
    at = page(app(runs, monkeypatch), "run_page.py", run="healthy")
    ok(at)
    assert not at.error
    assert at.success and "Healthy" in at.success[0].value
    assert charts(at) >= 7


def test_dead_relu_finding_names_the_layer_and_its_fix(runs, monkeypatch):
    at = page(app(runs, monkeypatch), "run_page.py", run="dead")
    ok(at)
    label = next(e.label for e in at.expander if "dead_relu" in e.label)
    assert "`3`" in label
    assert "LeakyReLU" in text(at)


def test_a_findings_jump_button_zooms_the_charts_to_its_step(runs, monkeypatch):
    at = page(app(runs, monkeypatch), "run_page.py", run="nozero")
    jump = next(b for b in at.button if b.label.startswith("Show step"))
    step = int(jump.label.split()[2])
    jump.click().run()
    ok(at)
    lo, hi = at.session_state["zoom:nozero"]
    assert lo <= step <= hi and (lo, hi) != (0, 59)
    assert at.session_state["focus:nozero"] == step
    assert at.slider(key="zoom_slider:nozero").value == (lo, hi)
    assert f"step {step}" in text(at)
    assert charts(at) >= 6  # dead units are measured once per 25-step window: maybe none in the range
    at.button(key="reset:nozero").click().run()
    ok(at)
    assert at.session_state["zoom:nozero"] is None and at.slider(key="zoom_slider:nozero").value == (0, 59)


def test_picking_layers_and_a_metric_redraws_the_layer_curves(runs, monkeypatch):
    at = page(app(runs, monkeypatch), "run_page.py", run="healthy")
    before = charts(at)
    at.multiselect(key="layers:healthy").set_value(["2"]).run()
    at.selectbox(key="layer_metric:healthy").set_value("weight_norm").run()
    ok(at)
    assert charts(at) == before
    at.multiselect(key="layers:healthy").set_value([]).run()
    ok(at)
    assert charts(at) == before - 1 and "Pick one or more layers" in text(at)


def test_a_crashed_run_is_marked_crashed(tmp_path, monkeypatch):
    trainer = Trainer(tmp_path / "boom")
    with pytest.raises(RuntimeError), trainer.gw:
        trainer.steps(5)
        raise RuntimeError("training died")
    at = app(tmp_path, monkeypatch).run()
    ok(at)
    assert ":red-badge[:material/dangerous: crashed]" in text(at)
    at = page(app(tmp_path, monkeypatch), "run_page.py", run="boom")
    ok(at)
    assert ":red-badge[:material/dangerous: crashed]" in text(at)


def test_compare_overlays_two_runs(runs, monkeypatch):
    at = page(app(runs, monkeypatch), "compare.py")
    ok(at)
    assert at.title[0].value == "Compare runs"
    assert len(at.multiselect[0].value) == 2
    assert charts(at) == 3  # loss, global grad norm, one layer's metric
    at.selectbox(key="cmp_metric").set_value("dead_fraction").run()
    ok(at)
    assert charts(at) == 3


def test_compare_takes_its_runs_from_the_url_and_drops_unknown_ones(runs, monkeypatch):
    at = app(runs, monkeypatch).run()
    at.query_params["runs"] = ["dead", "healthy", "../../etc"]
    at.switch_page("compare.py").run()
    ok(at)
    assert at.multiselect[0].value == ["dead", "healthy"]
    assert any("../../etc" in w.value for w in at.warning)
    assert charts(at) == 3


# ---- live ---------------------------------------------------------------------------------------------------
def test_a_running_run_shows_running_and_new_steps_on_the_next_rerun(tmp_path, monkeypatch):
    trainer = Trainer(tmp_path / "live").steps(20)
    try:
        at = page(app(tmp_path, monkeypatch), "run_page.py", run="live")
        ok(at)
        assert ":blue-badge[:material/autorenew: running]" in text(at)
        assert {m.label: m.value for m in at.metric}["Steps"] == "20"
        trainer.steps(15)
        at.run()  # what the fragment's run_every does every 2 s in a browser
        ok(at)
        assert {m.label: m.value for m in at.metric}["Steps"] == "35"
    finally:
        trainer.close()
    at.run()
    ok(at)
    assert ":green-badge[:material/check_circle: finished]" in text(at)


def test_the_cached_view_reads_only_new_rows(tmp_path, monkeypatch):
    from gradwatch._dashboard import _state

    trainer = Trainer(tmp_path / "live").steps(10)
    try:
        at = page(app(tmp_path, monkeypatch), "run_page.py", run="live")
        path = tmp_path / "live"
        view = _state._cached(str(path), _state._identity(path)).view
        assert view.n_steps == 10
        trainer.steps(5)
        at.run()
        assert _state._cached(str(path), _state._identity(path)).view is view and view.n_steps == 15
    finally:
        trainer.close()


# ---- bad input: a clear message each, never a traceback -----------------------------------------------------
@pytest.mark.parametrize("script", ["overview.py", "run_page.py", "compare.py"])
def test_a_missing_runs_dir_is_an_error_on_every_page(tmp_path, monkeypatch, script):
    at = page(app(tmp_path / "nope", monkeypatch), script)
    ok(at)
    assert at.error and "does not exist" in at.error[0].value


def test_an_empty_runs_dir_says_how_to_record_a_run(tmp_path, monkeypatch):
    at = app(tmp_path, monkeypatch).run()
    ok(at)
    assert at.info and "gradwatch.watch(" in at.info[0].value and not at.error
    at = page(app(tmp_path, monkeypatch), "run_page.py")
    ok(at)
    assert at.info and "No runs yet" in at.info[0].value


def test_a_run_with_no_steps_yet(tmp_path, monkeypatch):
    trainer = Trainer(tmp_path / "fresh")
    trainer.gw.flush()
    try:
        at = page(app(tmp_path, monkeypatch), "run_page.py", run="fresh")
        ok(at)
        assert at.info and "No steps recorded yet" in at.info[0].value
        assert charts(at) == 0 and not at.error
    finally:
        trainer.close()


def _copy_run(runs: Path, dst: Path) -> Path:
    shutil.copytree(runs / "healthy", dst)
    return dst


def test_a_corrupted_database(runs, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "gradwatch.db").write_bytes(b"this is not a database" * 100)
    at = app(tmp_path, monkeypatch).run()
    ok(at)
    assert "unreadable" in text(at)
    at = page(app(tmp_path, monkeypatch), "run_page.py", run="bad")
    ok(at)
    assert at.error and "cannot be read" in at.error[0].value


def test_a_truncated_database(runs, tmp_path, monkeypatch):
    run = _copy_run(runs, tmp_path / "cut")
    db = run / "gradwatch.db"
    db.write_bytes(db.read_bytes()[:3000])
    at = page(app(tmp_path, monkeypatch), "run_page.py", run="cut")
    ok(at)
    assert at.error and "gradwatch.db" in at.error[0].value


def test_a_run_written_by_an_older_schema(runs, tmp_path, monkeypatch):
    run = _copy_run(runs, tmp_path / "old")
    with sqlite3.connect(run / "gradwatch.db") as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    conn.close()
    at = page(app(tmp_path, monkeypatch), "run_page.py", run="old")
    ok(at)
    assert at.error and "schema" in at.error[0].value
    at = app(tmp_path, monkeypatch).run()
    ok(at)
    assert "schema" in text(at)


def test_a_run_deleted_while_its_page_is_open(runs, tmp_path, monkeypatch):
    run = _copy_run(runs, tmp_path / "doomed")
    at = page(app(tmp_path, monkeypatch), "run_page.py", run="doomed")
    ok(at)
    assert charts(at) >= 7
    shutil.rmtree(run)
    at.run()
    ok(at)
    assert at.error and "doomed" in at.error[0].value
    assert charts(at) == 0


@pytest.mark.parametrize("name", ["../../etc", "/etc", "..", "healthy/../../x", "nosuchrun"])
def test_run_names_from_the_url_never_leave_runs_dir(runs, monkeypatch, name):
    at = page(app(runs, monkeypatch), "run_page.py", run=name)
    ok(at)
    assert at.error and charts(at) == 0
    assert "safe_run_path" in at.error[0].value or "no run named" in at.error[0].value
