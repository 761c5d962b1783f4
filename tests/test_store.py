"""The run store: what a short run writes, read back through load_run, wide(), the CLI export and
list_runs; default run folders; and the metadata that describes a run."""
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import gradwatch

STEPS = 6  # the last one produces an Inf in layer "2"


class Net(nn.Module):
    """Owns a parameter itself, so the model has a "(root)" layer besides its submodules."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.body = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.Tanh())
        self.head = nn.Linear(7, 3, bias=False)

    def forward(self, x):
        return self.head(self.body(x)) * self.scale


def own_norms(model: nn.Module, grad: bool) -> dict:
    out = {}
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if own:
            ts = [p.grad if grad else p.detach() for p in own]
            out[name or "(root)"] = math.sqrt(sum(float((t.double() ** 2).sum()) for t in ts))
    return out


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A short run with clipping, update ratios on every step, and an Inf on the last step.

    Returns (run_dir, reference) where reference holds naive per-step values to check the store against.
    """
    run_dir = tmp_path_factory.mktemp("store") / "run"
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
    ref = {"grad": [], "total": [], "weight": [], "ratio": [], "loss": []}
    with gradwatch.watch(model, optimizer=opt, run_dir=run_dir, detail_every=1) as gw:
        for step in range(STEPS):
            if step == STEPS - 1:
                with torch.no_grad():
                    model.body[2].weight[0, 0] = float("inf")
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            ref["grad"].append(own_norms(model, grad=True))
            ref["total"].append(math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters())))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)  # gradwatch records the pre-clip norms
            before = own_norms(model, grad=False)
            snap = {n: [p.detach().clone() for p in m.parameters(recurse=False)]
                    for n, m in model.named_modules() if list(m.parameters(recurse=False))}
            opt.step()
            gw.step(loss)
            ref["loss"].append(float(loss.detach()))
            ref["weight"].append(own_norms(model, grad=False))
            ref["ratio"].append({
                (n or "(root)"): math.sqrt(sum(float(((p.detach() - q).double() ** 2).sum())
                                               for p, q in zip(m.parameters(recurse=False), snap[n])))
                / before[n or "(root)"]
                for n, m in model.named_modules() if list(m.parameters(recurse=False))})
    return run_dir, ref


# ---- round trip --------------------------------------------------------------------------------------------
def test_values_match_a_naive_reference(short_run):
    run_dir, ref = short_run
    run = gradwatch.load_run(run_dir)
    steps = run.steps
    assert steps["step"].tolist() == list(range(STEPS))
    assert steps["loss"].iloc[:-1].tolist() == pytest.approx(ref["loss"][:-1], rel=1e-6)
    assert steps["lr"].tolist() == [2e-3] * STEPS
    assert steps["grad_norm"].iloc[:-1].tolist() == pytest.approx(ref["total"][:-1], rel=1e-5)
    assert steps["nonfinite"].tolist() == [False] * (STEPS - 1) + [True]
    assert not steps["skipped"].any()
    clean = range(STEPS - 1)  # before the Inf
    for metric, key in (("grad_norm", "grad"), ("weight_norm", "weight"), ("update_ratio", "ratio")):
        wide = run.wide(metric)
        assert list(wide.columns) == ["(root)", "body.0", "body.2", "head"]
        for step in clean:
            for layer, value in ref[key][step].items():
                assert wide.loc[step, layer] == pytest.approx(value, rel=1e-4), (metric, step, layer)
    events = run.events
    assert len(events) == 1
    assert events.loc[0, "step"] == STEPS - 1 and events.loc[0, "module"] == "body.2"
    assert events.loc[0, "phase"] == "forward"


def test_layers_long_form_matches_wide(short_run):
    run_dir, _ = short_run
    run = gradwatch.load_run(run_dir)
    layers = run.layers
    assert list(layers.columns) == ["step", "layer", "metric", "value"]
    metrics = set(layers["metric"])
    assert {"grad_norm", "grad_maxabs", "weight_norm", "update_ratio", "nonfinite", "zero_fraction",
            "saturation_fraction"} <= metrics
    n = 0
    for metric in sorted(metrics):
        wide = run.wide(metric)
        assert wide.index.tolist() == list(range(STEPS))
        long = layers[layers["metric"] == metric]
        n += len(long)
        assert len(long) == int(wide.notna().sum().sum())
        for row in long.itertuples():
            w = wide.loc[row.step, row.layer]
            assert (row.value == w) or (math.isinf(w) and row.value == w), (metric, row)
    assert n == len(layers)
    assert layers["value"].notna().all()
    activations = {a["name"] for a in run.meta["model"]["activations"]}
    assert set(layers.loc[layers["metric"] == "zero_fraction", "layer"].astype(str)) == {"body.1"}
    assert activations == {"body.1", "body.3"}


def assert_same_as_csv(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Column by column: numbers and flags by value, text (categories included) as strings; None is empty."""
    assert list(got.columns) == list(expected.columns)
    assert len(got) == len(expected)
    for col in expected.columns:
        exp = expected[col]
        if pd.api.types.is_numeric_dtype(exp) or pd.api.types.is_bool_dtype(exp):
            pd.testing.assert_series_equal(got[col].astype(float), exp.astype(float), check_names=False,
                                           check_exact=True)
        else:
            as_text = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in exp]
            read = [None if isinstance(v, float) and math.isnan(v) else str(v) for v in got[col]]
            assert read == as_text, col


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_cli_export_round_trip(short_run, tmp_path, fmt):
    run_dir, _ = short_run
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "export", str(run_dir), "--format", fmt,
                           "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = sorted(Path(p).name for p in proc.stdout.split())
    assert written == sorted([f"steps.{fmt}", f"layers.{fmt}", f"events.{fmt}", "meta.json"])
    run = gradwatch.load_run(run_dir)
    for name in ("steps", "layers", "events"):
        expected = getattr(run, name)
        assert len(expected) > 0, name
        if fmt == "csv":
            # only empty fields are missing: the event kind "nan" is text
            got = pd.read_csv(out / f"{name}.csv", keep_default_na=False, na_values=[""])
            assert_same_as_csv(got, expected)
        else:
            got = pd.read_parquet(out / f"{name}.parquet")
            pd.testing.assert_frame_equal(got, expected)
    meta = json.loads((out / "meta.json").read_text())
    assert meta == json.loads(json.dumps(run.meta))
    assert meta["status"] == "finished"


def test_cli_export_defaults_to_run_dir_export(tmp_path):
    run_dir = tmp_path / "run"
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, optimizer=opt, run_dir=run_dir) as gw:
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        gw.step()
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "export", str(run_dir)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == [
        "events.csv", "layers.csv", "meta.json", "steps.csv"]
    steps = pd.read_csv(run_dir / "export" / "steps.csv")
    assert steps["step"].tolist() == [0]
    assert steps["loss"].isna().all()  # no loss was given


def test_readers_never_import_torch(short_run, tmp_path):
    run_dir, _ = short_run
    code = (
        "import sys, gradwatch\n"
        "from gradwatch.store.export import export_run\n"
        f"run = gradwatch.load_run({str(run_dir)!r})\n"
        "run.layers, run.steps, run.events, run.meta, run.status, run.wide('grad_norm')\n"
        f"runs = gradwatch.list_runs({str(run_dir.parent)!r})\n"
        "assert len(runs) == 1, runs\n"
        f"export_run({str(run_dir)!r}, 'csv', {str(tmp_path / 'out')!r})\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_list_runs_describes_each_run(short_run):
    run_dir, _ = short_run
    runs = gradwatch.list_runs(run_dir.parent)
    assert runs["run"].tolist() == ["run"]
    row = runs.iloc[0]
    assert row["status"] == "finished" and row["steps"] == STEPS and row["last_step"] == STEPS - 1
    assert row["model"] == "Net" and row["path"] == str(run_dir)
    meta = gradwatch.load_run(run_dir).meta
    assert row["started"] == pd.to_datetime(meta["start_time"], unit="s")
    assert row["updated"] >= row["started"]


# ---- default run folders ---------------------------------------------------------------------------------
def _quick(**kw):
    model = nn.Linear(2, 2)
    with gradwatch.watch(model, **kw) as gw:
        model(torch.ones(1, 2)).sum().backward()
        gw.step()
    return gw.run_dir


def test_default_run_dir_is_a_timestamp_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = _quick()
    second = _quick()
    assert first.parent == Path("runs") and second.parent == Path("runs")
    assert re.fullmatch(r"\d{8}-\d{6}", first.name)
    assert re.fullmatch(r"\d{8}-\d{6}(-1)?", second.name)
    assert first != second
    for d in (first, second):
        assert (tmp_path / d / "gradwatch.db").is_file()
        assert gradwatch.load_run(tmp_path / d).meta["name"] == d.name
    assert sorted(gradwatch.list_runs(tmp_path / "runs")["run"]) == sorted([first.name, second.name])


def test_named_run_dirs_count_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dirs = [_quick(name="x") for _ in range(3)]
    assert dirs == [Path("runs/x"), Path("runs/x-1"), Path("runs/x-2")]
    for d in dirs:
        run = gradwatch.load_run(tmp_path / d)
        assert run.meta["name"] == d.name and len(run.steps) == 1


# ---- meta --------------------------------------------------------------------------------------------------
def test_meta_describes_the_run(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    t0 = time.time()
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", every=2)
    t1 = time.time()
    live = gradwatch.load_run(tmp_path / "run")
    assert live.meta["status"] == "running" and live.status == "running"
    for _ in range(4):
        model(torch.ones(2, 5)).sum().backward()
        opt.step()
        gw.step()
    gw.close()
    meta = gradwatch.load_run(tmp_path / "run").meta

    naive = [(name or "(root)", sum(p.numel() for p in m.parameters(recurse=False)))
             for name, m in model.named_modules() if list(m.parameters(recurse=False))]
    summary = meta["model"]
    assert [(ly["name"], ly["parameters"]) for ly in summary["layers"]] == naive
    assert [ly["type"] for ly in summary["layers"]] == ["Net", "Linear", "Linear", "Linear"]
    assert summary["class"] == "Net"
    assert summary["parameters"] == sum(p.numel() for p in model.parameters()) == sum(n for _, n in naive)
    assert [(a["name"], a["type"]) for a in summary["activations"]] == [("body.1", "ReLU"), ("body.3", "Tanh")]

    (optimizer,) = meta["optimizer"]
    assert optimizer["class"] == "AdamW"
    (group,) = optimizer["param_groups"]
    assert group["lr"] == 3e-4 and group["weight_decay"] == 0.05
    assert group["n_params"] == len(list(model.parameters()))

    assert meta["torch_version"] == torch.__version__
    assert meta["gradwatch_version"] == gradwatch.__version__ == importlib.metadata.version("gradwatch")
    assert meta["python_version"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert meta["schema_version"] == 1
    assert t0 <= meta["start_time"] <= t1
    assert meta["start_time"] <= meta["end_time"] <= time.time()
    assert meta["status"] == "finished" and meta["steps"] == 4
    assert meta["pid"] == os.getpid()
    assert meta["config"]["every"] == 2
    assert meta["device"] == "cpu"
    assert meta["name"] == "run"
