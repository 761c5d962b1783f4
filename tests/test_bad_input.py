"""Bad input fails early and clearly: a GradwatchError or TypeError whose message names the argument,
the bad value and the fix; the CLI exits 2 with one line and no traceback."""
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch

GRADWATCH_CLI = Path(sys.executable).parent / "gradwatch"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def make_run(run_dir: Path, steps: int = 3) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    with gradwatch.watch(model, optimizer=opt, run_dir=run_dir) as gw:
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            gw.step(loss)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()) and all(
        not p._post_accumulate_grad_hooks for p in model.parameters())


# ---- model and optimizer ---------------------------------------------------------------------------
@pytest.mark.parametrize("model, shown", [(lambda x: x, "function"), (torch.zeros(3), "Tensor"),
                                          ("model.pt", "str")], ids=["function", "tensor", "str"])
def test_model_not_a_module(tmp_path, model, shown):
    with pytest.raises(TypeError) as info:
        gradwatch.watch(model, run_dir=tmp_path / "run")
    msg = str(info.value)
    assert "model" in msg and "nn.Module" in msg and shown in msg
    assert "gradwatch.watch(model" in msg  # the fix
    assert not (tmp_path / "run").exists()


def test_model_without_parameters(tmp_path):
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    with pytest.raises(gradwatch.GradwatchError) as info:
        gradwatch.watch(model, run_dir=tmp_path / "run")
    msg = str(info.value)
    assert "model" in msg and "Sequential" in msg and "no parameters" in msg
    assert "Pass the module that owns the trained weights" in msg
    assert not (tmp_path / "run").exists()


def test_optimizer_over_other_parameters(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1)
    with pytest.raises(gradwatch.GradwatchError) as info:
        gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run")
    msg = str(info.value)
    assert "optimizer" in msg and "SGD" in msg and "none of the model's parameters" in msg
    assert "model.parameters()" in msg
    assert no_hooks(model)


@pytest.mark.parametrize("opt, shown", [("adam", "str"), (dict(lr=0.1), "dict"),
                                        (torch.optim.SGD, "type")], ids=["str", "dict", "class"])
def test_optimizer_of_wrong_type(tmp_path, opt, shown):
    with pytest.raises(TypeError) as info:
        gradwatch.watch(mlp(), optimizer=opt, run_dir=tmp_path / "run")
    msg = str(info.value)
    assert "optimizer" in msg and "torch.optim.Optimizer" in msg and shown in msg
    assert "leave optimizer out" in msg


def test_optimizer_list_with_a_bad_entry(tmp_path):
    model = mlp()
    good = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer.*got str"):
        gradwatch.watch(model, optimizer=[good, "sgd"], run_dir=tmp_path / "run")
    assert no_hooks(model) and not good._optimizer_step_pre_hooks


def test_scaler_of_wrong_type(tmp_path):
    with pytest.raises(TypeError, match=r"scaler must be a torch\.amp\.GradScaler, got float"):
        gradwatch.watch(mlp(), run_dir=tmp_path / "run", scaler=1.0)


# ---- loss --------------------------------------------------------------------------------------------
@pytest.fixture
def watcher(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run")
    yield gw, model, opt
    gw.close()


def _backward(model, opt):
    loss = nn.functional.mse_loss(model(torch.ones(2, 4)), torch.zeros(2, 2))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def test_loss_not_a_scalar(watcher, tmp_path):
    gw, model, opt = watcher
    _backward(model, opt)
    with pytest.raises(gradwatch.GradwatchError) as info:
        gw.step(torch.ones(4))
    msg = str(info.value)
    assert "loss" in msg and "(4,)" in msg and "loss.mean()" in msg
    # the bad call changed nothing: the next good step is step 0
    gw.step(_backward(model, opt))
    gw.close()
    assert gradwatch.load_run(tmp_path / "run").steps["step"].tolist() == [0]


@pytest.mark.parametrize("loss, shown", [("0.5", "'0.5'"), (True, "True"), ([0.5], "[0.5]"),
                                         ({"loss": 1.0}, "dict")],
                         ids=["str", "bool", "list", "dict"])
def test_loss_of_wrong_type(watcher, loss, shown):
    gw, model, opt = watcher
    _backward(model, opt)
    with pytest.raises(TypeError) as info:
        gw.step(loss)
    msg = str(info.value)
    assert "loss" in msg and shown in msg
    assert "0-dim tensor or a float" in msg


def test_step_after_close(watcher):
    gw, model, opt = watcher
    gw.close()
    with pytest.raises(gradwatch.GradwatchError) as info:
        gw.step(_backward(model, opt))
    msg = str(info.value)
    assert "step()" in msg and "after close()" in msg and "gradwatch.watch(" in msg


# ---- schedule options and config ---------------------------------------------------------------------
@pytest.mark.parametrize("option, value, fix", [
    ("every", 0, ">= 1"), ("every", -1, ">= 1"), ("every", 1.5, "an int"), ("every", True, "an int"),
    ("every", "10", "an int"), ("dead_window", 0, ">= 1"), ("detail_every", 0, ">= 1"),
    ("flush_every", 0, ">= 0.01"), ("flush_every", 5, "at most 1"), ("flush_every", float("nan"), ">= 0.01"),
    ("flush_every", "fast", "a number"), ("update_memory_mb", 0, ">= 1"),
    ("activations", "yes", "True or False"), ("grad_norm", 1, "True or False"),
])
def test_bad_schedule_value(tmp_path, option, value, fix):
    model = mlp()
    with pytest.raises(gradwatch.GradwatchError) as info:
        gradwatch.watch(model, run_dir=tmp_path / "run", **{option: value})
    msg = str(info.value)
    assert f"{option}={value!r}" in msg
    assert fix in msg
    assert not (tmp_path / "run").exists()  # checked before anything is created
    assert no_hooks(model)
    with pytest.raises(gradwatch.GradwatchError, match=option):
        gradwatch.WatchConfig(**{option: value})


def test_bad_value_in_options_overrides_config(tmp_path):
    with pytest.raises(gradwatch.GradwatchError, match=r"every=0"):
        gradwatch.watch(mlp(), run_dir=tmp_path / "run", config=gradwatch.WatchConfig(every=5), every=0)


def test_unknown_option_lists_valid_ones(tmp_path):
    with pytest.raises(TypeError) as info:
        gradwatch.watch(mlp(), run_dir=tmp_path / "run", evry=10)
    msg = str(info.value)
    assert "evry" in msg
    for valid in ("every", "grad_norm", "detail_every", "activations", "dead_window", "flush_every"):
        assert valid in msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config, shown", [({"every": 10}, "dict"), ("light", "str"),
                                           (gradwatch.WatchConfig, "type")], ids=["dict", "str", "class"])
def test_config_of_wrong_type(tmp_path, config, shown):
    with pytest.raises(TypeError) as info:
        gradwatch.watch(mlp(), run_dir=tmp_path / "run", config=config)
    msg = str(info.value)
    assert "config" in msg and "WatchConfig" in msg and shown in msg


# ---- include / exclude ---------------------------------------------------------------------------------
def test_include_matching_nothing(tmp_path):
    model = mlp()
    with pytest.raises(gradwatch.GradwatchError) as info:
        gradwatch.watch(model, run_dir=tmp_path / "run", include="encoder.*")
    msg = str(info.value)
    assert "include" in msg and "encoder.*" in msg
    assert "'0'" in msg  # shows what module names look like
    assert "glob patterns" in msg
    assert no_hooks(model)
    # the failed call left no run behind: the same folder can be used at once
    with gradwatch.watch(model, run_dir=tmp_path / "run", include="0"):
        pass
    assert gradwatch.load_run(tmp_path / "run").meta["model"]["layers"][0]["name"] == "0"


def test_exclude_of_everything(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(gradwatch.GradwatchError) as err:
        gradwatch.watch(model, run_dir=tmp_path / "run", exclude="*")
    assert "exclude" in str(err.value) and "'*'" in str(err.value)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


@pytest.mark.parametrize("arg", ["include", "exclude"])
@pytest.mark.parametrize("value", [5, ["0", 3], {"0": 1}], ids=["int", "list-with-int", "dict"])
def test_include_of_wrong_type(tmp_path, arg, value):
    with pytest.raises(TypeError) as info:
        gradwatch.watch(mlp(), run_dir=tmp_path / "run", **{arg: value})
    msg = str(info.value)
    assert f"{arg}={value!r}" in msg and "glob pattern" in msg


# ---- run_dir -------------------------------------------------------------------------------------------
def test_run_dir_that_holds_a_run(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir, steps=5)
    model = mlp()
    with pytest.raises(gradwatch.GradwatchError) as info:
        gradwatch.watch(model, run_dir=run_dir)
    msg = str(info.value)
    assert str(run_dir) in msg and "already holds a run" in msg and "overwrite=True" in msg
    assert no_hooks(model)
    assert len(gradwatch.load_run(run_dir).steps) == 5  # untouched

    with pytest.raises(gradwatch.GradwatchError):
        make_run(run_dir, steps=2)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, optimizer=opt, run_dir=run_dir, overwrite=True) as gw:
        for _ in range(2):
            gw.step(_backward(model, opt))
    run = gradwatch.load_run(run_dir)
    assert run.steps["step"].tolist() == [0, 1]
    assert run.meta["status"] == "finished" and run.meta["steps"] == 2


@pytest.mark.parametrize("run_dir", [3, 1.5, ["runs/a"]], ids=["int", "float", "list"])
def test_run_dir_of_wrong_type(run_dir):
    with pytest.raises(TypeError, match=r"run_dir must be a path"):
        gradwatch.watch(mlp(), run_dir=run_dir)


@pytest.mark.parametrize("name", [5, ["exp"]], ids=["int", "list"])
def test_name_of_wrong_type(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError) as info:
        gradwatch.watch(mlp(), name=name)
    msg = str(info.value)
    assert "name" in msg and repr(name) in msg and "str" in msg
    assert not (tmp_path / "runs").exists()


# ---- load_run / list_runs ------------------------------------------------------------------------------
def test_load_run_on_folder_without_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(gradwatch.GradwatchError) as info:
        gradwatch.load_run(tmp_path / "empty")
    msg = str(info.value)
    assert str(tmp_path / "empty") in msg and "no gradwatch run" in msg and "list_runs" in msg


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_load_run_on_missing_path_or_file(tmp_path, kind):
    path = tmp_path / "nope"
    if kind == "file":
        path.write_text("x")
    with pytest.raises(gradwatch.GradwatchError) as info:
        gradwatch.load_run(str(path))
    msg = str(info.value)
    assert f"run_dir={str(path)!r}" in msg and "not a folder" in msg


@pytest.mark.parametrize("arg", [None, 3, ["runs/a"], b"runs/a"], ids=["none", "int", "list", "bytes"])
def test_load_run_on_non_path(arg):
    with pytest.raises(TypeError) as info:
        gradwatch.load_run(arg)
    msg = str(info.value)
    assert "run_dir" in msg and "path" in msg and type(arg).__name__ in msg


@pytest.mark.parametrize("damage", ["garbage", "truncated-header", "truncated-page", "empty"])
def test_load_run_on_corrupt_store(tmp_path, damage):
    run_dir = tmp_path / "run"
    make_run(run_dir)
    db = run_dir / "gradwatch.db"
    if damage == "garbage":
        db.write_bytes(b"\x00garbage\xff" * 3000)
    else:
        with open(db, "r+b") as f:
            f.truncate({"truncated-header": 100, "truncated-page": 4096, "empty": 0}[damage])
    with pytest.raises(gradwatch.GradwatchError) as info:
        gradwatch.load_run(run_dir)
    msg = str(info.value)
    assert str(run_dir) in msg and "cannot be read" in msg


def test_load_run_on_other_sqlite_file(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    conn = sqlite3.connect(run_dir / "gradwatch.db")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(gradwatch.GradwatchError, match="not a gradwatch store"):
        gradwatch.load_run(run_dir)


def test_load_run_on_other_schema_version(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir)
    conn = sqlite3.connect(run_dir / "gradwatch.db")
    conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(gradwatch.GradwatchError) as info:
        gradwatch.load_run(run_dir)
    msg = str(info.value)
    assert "schema 7" in msg and "schema 1" in msg and gradwatch.__version__ in msg


def test_wide_with_unknown_metric(tmp_path):
    make_run(tmp_path / "run")
    with pytest.raises(gradwatch.GradwatchError) as info:
        gradwatch.load_run(tmp_path / "run").wide("grad_nrom")
    msg = str(info.value)
    assert "metric='grad_nrom'" in msg and "grad_norm" in msg


def test_list_runs_on_missing_folder(tmp_path):
    with pytest.raises(gradwatch.GradwatchError) as info:
        gradwatch.list_runs(tmp_path / "nope")
    msg = str(info.value)
    assert str(tmp_path / "nope") in msg and "not a folder" in msg


@pytest.mark.parametrize("arg", [None, 3], ids=["none", "int"])
def test_list_runs_on_non_path(arg):
    with pytest.raises(TypeError) as info:
        gradwatch.list_runs(arg)
    msg = str(info.value)
    assert "runs_dir" in msg and type(arg).__name__ in msg


def test_list_runs_reports_an_unreadable_run_and_lists_the_others(tmp_path):
    make_run(tmp_path / "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "gradwatch.db").write_bytes(b"not sqlite" * 500)
    runs = gradwatch.list_runs(tmp_path).set_index("run")
    assert runs.loc["good", "status"] == "finished" and runs.loc["good", "steps"] == 3
    assert runs.loc["bad", "status"].startswith("unreadable")


# ---- CLI -------------------------------------------------------------------------------------------------
def cli(*args, console=False):
    cmd = [str(GRADWATCH_CLI)] if console else [sys.executable, "-m", "gradwatch"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gradwatch: error: ")
    for n in needles:
        assert n in lines[0]


def test_cli_export_missing_run(tmp_path):
    assert GRADWATCH_CLI.exists()
    proc = cli("export", tmp_path / "missing", console=True)
    assert_one_line_error(proc, str(tmp_path / "missing"))
    assert proc.stdout == ""


def test_cli_export_corrupt_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "gradwatch.db").write_bytes(b"junk" * 1000)
    assert_one_line_error(cli("export", tmp_path / "run"), "cannot be read")


def test_cli_runs_missing_folder(tmp_path):
    assert_one_line_error(cli("runs", tmp_path / "missing"), str(tmp_path / "missing"))


def test_cli_export_bad_format(tmp_path):
    make_run(tmp_path / "run")
    proc = cli("export", tmp_path / "run", "--format", "xml")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "invalid choice: 'xml'" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "export").exists()


def test_cli_export_to_unwritable_output(tmp_path):
    make_run(tmp_path / "run")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = cli("export", tmp_path / "run", "-o", blocker / "out")
    assert_one_line_error(proc, str(blocker / "out"))
