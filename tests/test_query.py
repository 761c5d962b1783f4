"""The dashboard's query layer: binning checked against a naive pandas groupby, incremental refresh against a
fresh read of a real training run, and the broken stores and unsafe names the app must survive."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.errors import GradwatchError
from gradwatch.query import (
    HEATMAP_COLUMNS,
    MARKER_COLUMNS,
    METRIC_COLUMNS,
    SERIES_COLUMNS,
    RunView,
    list_run_dirs,
    overview,
    safe_run_path,
)
from gradwatch.store.schema import DB_NAME, GRAD_NONFINITE, LOSS_NONFINITE
from gradwatch.store.writer import Rows, Writer, create_store

LAYERS = ["fc1", "fc2", "fc3", "head"]
SITES = ["act1", "act2"]


# ---- a synthetic store, written by the real writer ---------------------------------------------------------
def _rows(start: int, stop: int, rng: np.random.Generator, every: int = 1) -> Rows:
    """Steps start..stop-1 (one in `every`), with NaN/Inf losses, Inf and unmeasured layer values."""
    out = Rows()
    for s in range(start, stop, every):
        bad_loss = s % 97 == 5
        loss = float("inf") if s % 89 == 7 else (None if bad_loss else float(1 + rng.random()))
        out.steps.append((s, 1000.0 + s, loss, float(rng.random()), json.dumps([1e-3, None if s % 5 else 2e-4]),
                          0, None, LOSS_NONFINITE if bad_loss or loss == float("inf") else 0))
        g = rng.lognormal(size=len(LAYERS)).astype("<f4")
        if s % 53 == 3:
            g[1] = np.inf
        if s % 7 == 0:
            g[2] = np.nan  # not measured
        out.values.append(("grad_norm", s, g.tobytes()))
        if s % 3 == 0:
            out.values.append(("update_ratio", s, (1e-3 * rng.lognormal(size=len(LAYERS))).astype("<f4").tobytes()))
            out.values.append(("dead_fraction", s, rng.random(len(SITES)).astype("<f4").tobytes()))
    return out


def write_store(run_dir, n: int, seed: int = 0, findings=None, config=None, every: int = 1) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = Writer(create_store(run_dir, {"status": "finished", "start_time": 1000.0, "model": {"class": "Toy"},
                                           "config": config or {"detect_every": 5.0}}))
    writer.put(Rows(series=[("layer", i, x, "Linear", 10) for i, x in enumerate(LAYERS)]
                    + [("activation", i, x, "ReLU", None) for i, x in enumerate(SITES)]))
    writer.put(_rows(0, n, np.random.default_rng(seed), every))
    if findings is not None:
        writer.put_findings(findings)
    writer.close()


def append_store(run_dir, start: int, stop: int, seed: int = 1) -> None:
    conn = sqlite3.connect(run_dir / DB_NAME, check_same_thread=False, isolation_level=None)
    writer = Writer(conn)
    writer.put(_rows(start, stop, np.random.default_rng(seed)))
    writer.close()


# ---- the naive reference ---------------------------------------------------------------------------------
def naive_bins(steps: pd.Series, values: pd.Series, bad: pd.Series, first: int, width: int) -> pd.DataFrame:
    df = pd.DataFrame({"bin": (steps.to_numpy() - first) // width, "v": values.to_numpy(np.float64),
                       "bad": bad.to_numpy()})
    df["v"] = df["v"].where(np.isfinite(df["v"]))
    out = df.groupby("bin").agg(min=("v", "min"), mean=("v", "mean"), max=("v", "max"), n=("v", "count"),
                                nonfinite=("bad", "sum"))
    out = out[(out["n"] > 0) | (out["nonfinite"] > 0)]
    out["step_lo"] = first + out.index * width
    return out.reset_index(drop=True)


def _width(binned: pd.DataFrame) -> int:
    return int((binned["step_hi"] - binned["step_lo"]).max() + 1)  # only the last bin may be cut short


def _compare(ours: pd.DataFrame, ref: pd.DataFrame) -> None:
    assert ours["step_lo"].tolist() == ref["step_lo"].tolist()
    assert ours["n"].tolist() == ref["n"].tolist()
    assert ours["nonfinite"].tolist() == ref["nonfinite"].tolist()
    for col in ("min", "mean", "max"):
        np.testing.assert_allclose(ours[col].to_numpy(), ref[col].to_numpy(), rtol=1e-6, equal_nan=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    run = tmp_path_factory.mktemp("query") / "run"
    write_store(run, 3000)
    return run


@pytest.mark.parametrize("bins", [1, 7, 64, 500])
def test_series_bins_match_a_pandas_groupby(store, bins):
    view, run = RunView(store), gradwatch.load_run(store)
    steps = run.steps
    for column, flag in (("loss", LOSS_NONFINITE), ("grad_norm", GRAD_NONFINITE), ("lr", 0), ("lr_1", 0)):
        ours = view.series_binned(column, bins=bins)
        assert list(ours.columns) == SERIES_COLUMNS
        assert 0.75 * min(bins, 3000) <= len(ours) <= bins
        v = steps[column]
        flags = steps["nonfinite"] if flag == LOSS_NONFINITE else pd.Series(False, index=steps.index)
        bad = np.isinf(v) | (v.isna() & flags)
        ref = naive_bins(steps["step"], v, bad, 0, _width(ours))
        _compare(ours, ref)
        assert (ours["step_hi"] - ours["step_lo"] + 1 <= _width(ours)).all()
    loss = view.series_binned("loss", bins=bins)
    assert loss["nonfinite"].sum() == int((np.isinf(steps["loss"]) | steps["loss"].isna()).sum())


@pytest.mark.parametrize("bins", [5, 64, 500])
def test_metric_bins_match_a_pandas_groupby(store, bins):
    view, run = RunView(store), gradwatch.load_run(store)
    for metric in ("grad_norm", "update_ratio", "dead_fraction"):
        wide = run.wide(metric)
        ours = view.metric_binned(metric, bins=bins)
        assert list(ours.columns) == METRIC_COLUMNS
        assert ours["layer"].drop_duplicates().tolist() == list(wide.columns)  # model order
        for order, name in enumerate(wide.columns):
            mine = ours[ours["layer"] == name].reset_index(drop=True)
            assert (mine["order"] == order).all()
            col = wide[name]
            ref = naive_bins(pd.Series(wide.index), col, pd.Series(np.isinf(col.to_numpy())), 0, _width(
                view.series_binned("loss", bins=bins)))
            _compare(mine, ref)
    picked = view.metric_binned("grad_norm", ["head", "fc1"], bins=bins)
    assert picked["layer"].drop_duplicates().tolist() == ["fc1", "head"]


def test_heatmap_means_finite_positive_values_and_flags_inf(store):
    view, wide = RunView(store), gradwatch.load_run(store).wide("grad_norm")
    heat = view.heatmap("grad_norm", bins=50)
    assert list(heat.columns) == HEATMAP_COLUMNS and len(heat) <= 50 * len(LAYERS)
    width = _width(heat[heat["layer"] == "fc1"])
    for name in LAYERS:
        col = wide[name]
        b = (np.asarray(wide.index) // width)
        ref = pd.DataFrame({"b": b, "v": col.where((col > 0) & np.isfinite(col)), "inf": np.isinf(col)}).groupby("b")
        mine = heat[heat["layer"] == name]
        np.testing.assert_allclose(mine["value"].to_numpy(), ref["v"].mean().to_numpy(), rtol=1e-6)
        assert mine["inf"].tolist() == ref["inf"].any().tolist()
        assert (mine["step_hi"].iloc[:-1].to_numpy() + 1 == mine["step_lo"].iloc[1:].to_numpy()).all()  # tiles
    assert heat.loc[heat["layer"] == "fc2", "inf"].any() and not heat.loc[heat["layer"] == "fc1", "inf"].any()


def test_fewer_steps_than_bins_gives_one_row_per_step(tmp_path):
    write_store(tmp_path / "run", 40, every=3)
    view = RunView(tmp_path / "run")
    loss = view.series_binned("loss")
    steps = view.steps()
    assert loss["step"].tolist() == steps["step"].tolist() == list(range(0, 40, 3))
    assert (loss["step_lo"] == loss["step_hi"]).all()
    finite = loss["n"] == 1
    assert (loss.loc[finite, "min"] == loss.loc[finite, "max"]).all()
    assert (loss.loc[finite, "mean"] == steps.loc[finite.to_numpy(), "loss"].to_numpy()).all()
    ratio = view.metric_binned("update_ratio", ["fc1"])
    assert ratio["step"].tolist() == list(range(0, 40, 3)) and (ratio["n"] == 1).all()


def test_refresh_extends_the_held_bins_exactly(tmp_path):
    """Appending across base-width doublings (w0 2 -> 4 -> 8) gives what a fresh read gives."""
    run = tmp_path / "run"
    write_store(run, 5000)
    view = RunView(run)
    queries = [lambda v: v.series_binned("loss"), lambda v: v.series_binned("grad_norm", bins=37),
               lambda v: v.metric_binned("grad_norm"), lambda v: v.metric_binned("update_ratio", bins=90),
               lambda v: v.heatmap("grad_norm"), lambda v: v.heatmap("dead_fraction", bins=17)]
    for q in queries:
        q(view)
    for start, stop in ((5000, 5003), (5003, 9000), (9000, 17000)):
        append_store(run, start, stop, seed=start)
        assert view.refresh()
        fresh = RunView(run)
        for q in queries:
            pd.testing.assert_frame_equal(q(view), q(fresh), check_exact=False, rtol=1e-5)  # float32 sums
        pd.testing.assert_frame_equal(view.steps(), fresh.steps())
    assert not view.refresh()


# ---- a real training run ---------------------------------------------------------------------------------
def _train(gw, model, opt, steps: int, g: torch.Generator) -> None:
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        gw.step(loss)


def _everything(view: RunView) -> dict:
    out = {f"series_{c}": view.series_binned(c, bins=b) for c in ("loss", "grad_norm", "lr") for b in (7, 500)}
    for metric in ("grad_norm", "grad_maxabs", "weight_norm", "update_ratio", "dead_fraction", "zero_fraction",
                   "saturation_fraction"):
        out[metric] = view.metric_binned(metric, bins=9)
        out[f"{metric}_heat"] = view.heatmap(metric, bins=11)
    out.update(steps=view.steps(), events=view.events(), findings=view.findings(), markers=view.markers())
    return out


def test_incremental_refresh_equals_a_full_read_of_a_real_run(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    run = tmp_path / "run"
    gw = gradwatch.watch(model, optimizer=opt, run_dir=run, detect_every=0)
    try:
        _train(gw, model, opt, 30, g)
        gw.flush()
        view = RunView(run)
        assert view.status == "running" and view.n_steps == 30 and view.last_step == 29
        _everything(view)  # hold every metric and its bins
        assert not view.refresh()
        _train(gw, model, opt, 47, g)
        gw.flush()
        assert view.refresh()
        assert not view.refresh()
        fresh = RunView(run)
        ours, ref = _everything(view), _everything(fresh)
        for key in ref:
            pd.testing.assert_frame_equal(ours[key], ref[key], obj=key)
        pd.testing.assert_frame_equal(view.steps(), gradwatch.load_run(run).steps)
        assert view.n_steps == 77 and view.layers("grad_norm") == ["0", "2", "4"]
        assert view.layers("dead_fraction") == ["1", "3"]
    finally:
        gw.close()
    assert view.refresh() and view.status == "finished"


def test_a_run_with_no_steps_gives_empty_frames(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    create_store(run, {"status": "running", "start_time": time.time()}).close()
    view = RunView(run)
    assert view.n_steps == 0 and view.last_step is None and not view.refresh()
    assert list(view.series_binned("loss").columns) == SERIES_COLUMNS and view.series_binned("loss").empty
    assert list(view.metric_binned("grad_norm").columns) == METRIC_COLUMNS
    assert list(view.heatmap().columns) == HEATMAP_COLUMNS and view.heatmap().empty
    assert list(view.markers().columns) == MARKER_COLUMNS and view.markers().empty
    assert view.steps().empty and view.events().empty and view.findings().empty
    assert "lr" in view.steps().columns


def test_a_metric_never_recorded_is_empty_and_an_unknown_one_is_an_error(store):
    view = RunView(store)
    assert view.metric_binned("weight_norm").empty and view.heatmap("weight_norm").empty
    with pytest.raises(GradwatchError, match="metric must be one of"):
        view.metric_binned("grad_nrom")
    with pytest.raises(GradwatchError, match="has no series"):
        view.metric_binned("grad_norm", ["nope"])
    with pytest.raises(GradwatchError, match="column must be"):
        view.series_binned("time")
    with pytest.raises(GradwatchError, match="bins must be a positive int"):
        view.series_binned("loss", bins=0)


# ---- broken stores -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 100, "half"])
def test_a_truncated_store_is_a_clear_error(tmp_path, size):
    run = tmp_path / "run"
    write_store(run, 3000)
    db = run / DB_NAME
    os.truncate(db, db.stat().st_size // 2 if size == "half" else size)
    with pytest.raises(GradwatchError, match="cannot be read .*truncated"):
        view = RunView(run)
        view.metric_binned("grad_norm")  # "half" may leave the first pages readable


def test_a_store_truncated_or_deleted_under_an_open_view(tmp_path):
    run = tmp_path / "run"
    write_store(run, 100)
    view = RunView(run)
    os.truncate(run / DB_NAME, 0)
    with pytest.raises(GradwatchError, match="cannot be read"):
        view.refresh()
    shutil.rmtree(run)
    with pytest.raises(GradwatchError, match="no longer holds gradwatch.db"):
        view.refresh()
    assert view.n_steps == 100  # what it held is still there to show


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(GradwatchError, match="is not a folder"):
        RunView(tmp_path / "nope")
    with pytest.raises(GradwatchError, match="holds no gradwatch run"):
        RunView(tmp_path)


def test_an_old_schema_names_both_versions(tmp_path):
    run = tmp_path / "run"
    write_store(run, 10)
    with sqlite3.connect(run / DB_NAME) as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(GradwatchError, match="store schema 0, and this gradwatch reads schema 1"):
        RunView(run)
    row = overview(tmp_path).iloc[0]
    assert row["health"] == "unknown" and "schema 0" in row["error"]


# ---- markers, findings ---------------------------------------------------------------------------------------
def test_markers_and_findings(tmp_path):
    run = tmp_path / "run"
    spike = ("loss_spike", "", 40, "warning", "The loss jumped 9x.", "Lower the lr.", "{}", 1.0)
    crit = ("exploding_gradients", "fc2", 3, "critical", "Inf gradient.", "Clip.", '{"ratio": 2}', 1.0)
    write_store(run, 120, findings=[spike, crit])
    conn = sqlite3.connect(run / DB_NAME, check_same_thread=False, isolation_level=None)
    w = Writer(conn)
    w.put(Rows(events=[(5, "nan", "loss", "", None, None, None), (7, "inf", "backward", "fc2", 0, None, "x")]))
    w.close()
    view = RunView(run)
    f = view.findings()
    assert f["severity"].tolist() == ["critical", "warning"] and f["evidence"][0] == {"ratio": 2}
    m = view.markers()
    assert m["step"].is_monotonic_increasing
    assert set(m["kind"]) == {"nan_inf", "loss_spike", "nonfinite"}
    assert m.loc[m["kind"] == "loss_spike", "step"].tolist() == [40]
    nan = m[m["kind"] == "nan_inf"]
    assert nan["step"].tolist() == [5, 7] and "fc2" in nan["label"].iloc[1]
    # non-finite steps 5, 7, 96, 102: the first two are marked by their events only
    assert m.loc[m["kind"] == "nonfinite", "step"].tolist() == [96, 102]


# ---- many runs -----------------------------------------------------------------------------------------------
def test_list_run_dirs_and_safe_run_path(tmp_path):
    root, outside = tmp_path / "runs", tmp_path / "elsewhere"
    write_store(root / "a", 5)
    write_store(root / "group" / "b", 5)
    write_store(outside / "c", 5)
    (root / "escape").symlink_to(outside / "c", target_is_directory=True)
    (root / "inside").symlink_to(root / "a", target_is_directory=True)
    assert [p.relative_to(root).as_posix() for p in list_run_dirs(root)] == ["a", "group/b", "inside"]
    assert safe_run_path(root, "group/b") == root / "group" / "b"
    for name, why in (("../elsewhere/c", "climbs out"), ("/etc", "absolute"), ("escape", "no run named"),
                      ("nope", "no run named"), ("", "must be a run name"), ("group/../a", "climbs out")):
        with pytest.raises(GradwatchError, match=why):
            safe_run_path(root, name)
    with pytest.raises(GradwatchError, match="is not a folder"):
        list_run_dirs(tmp_path / "missing")


def test_overview_health_from_stored_findings(tmp_path):
    def finding(sev):
        return ("x", "", 1, sev, "m", "s", "{}", 1.0)
    write_store(tmp_path / "crit", 10, findings=[finding("critical"), ("y", "fc1", 2, "warning", "m", "s", "{}", 1.0)])
    write_store(tmp_path / "warn", 10, findings=[finding("warning"), ("z", "", 3, "info", "m", "s", "{}", 1.0)])
    write_store(tmp_path / "info", 10, findings=[finding("info")])
    write_store(tmp_path / "quiet", 10, findings=[])
    write_store(tmp_path / "off", 10, config={"detect_every": 0})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / DB_NAME).write_bytes(b"not a database at all" * 100)
    df = overview(tmp_path).set_index("run")
    assert df.loc["crit", "health"] == "critical" and df.loc["crit", "findings"] == 2
    assert df.loc["warn", "health"] == "warning" and df.loc["warn", "findings"] == 1
    assert df.loc["info", "health"] == "healthy" and df.loc["quiet", "health"] == "healthy"
    assert df.loc["off", "health"] == "unknown"  # the live detectors never ran
    assert df.loc["broken", "health"] == "unknown" and "cannot read" in df.loc["broken", "error"]
    assert df.loc["crit", "steps"] == 10 and df.loc["crit", "last_step"] == 9 and df.loc["crit", "error"] == ""
    assert df.loc["crit", "model"] == "Toy" and df.loc["crit", "status"] == "finished"


def test_a_site_found_later_widens_the_held_matrix(tmp_path):
    """Rows written before a new activation site was found are shorter: they read NaN for it."""
    run = tmp_path / "run"
    write_store(run, 30)
    view = RunView(run)
    before = view.metric_binned("dead_fraction")
    conn = sqlite3.connect(run / DB_NAME, check_same_thread=False, isolation_level=None)
    w = Writer(conn)
    w.put(Rows(series=[("activation", 2, "act3", "GELU", None)],
               steps=[(s, 1000.0 + s, 1.0, 1.0, "[0.001]", 0, None, 0) for s in range(30, 36)],
               values=[("dead_fraction", s, np.array([0.1, 0.2, 0.5], "<f4").tobytes()) for s in range(30, 36, 3)]))
    w.close()
    assert view.refresh() and view.layers("dead_fraction") == SITES + ["act3"]
    after = view.metric_binned("dead_fraction")
    pd.testing.assert_frame_equal(after, RunView(run).metric_binned("dead_fraction"))
    new = after[after["layer"] == "act3"]
    assert new["step"].tolist() == [30.0, 33.0] and (new["mean"] == np.float32(0.5)).all() and new["order"].eq(2).all()
    old = after[after["layer"] != "act3"]
    pd.testing.assert_frame_equal(old[old["step"] < 30].reset_index(drop=True), before)
    wide = gradwatch.load_run(run).wide("dead_fraction")
    assert wide["act3"].isna().sum() == len(wide) - 2
