"""Reliability: hooks come off, crashes and kills leave a readable store, the store can fail without
stopping training, and watching never changes the model, its pickles, copies or training results."""
import copy
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.modules.module as module_mod
import torch.optim.optimizer as optim_mod
from torch import nn

import gradwatch

SCRIPT = Path(__file__).parent / "scripts" / "train.py"

MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_full_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
                     "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                     "_global_backward_pre_hooks", "_global_forward_hooks_with_kwargs",
                     "_global_forward_hooks_always_called")


# ---- helpers -------------------------------------------------------------------------------------
def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(12, 3))


def data(seed: int = 1, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def train_step(model, opt, x, y, gw=None):
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if gw is not None:
        gw.step(loss)
    return loss


def _size(d) -> int:
    return 0 if d is None else len(d)


def hook_counts(model: nn.Module, optimizers=()) -> dict:
    """Size of every hook registry gradwatch could touch: modules, parameters, optimizers, globals."""
    counts = {}
    for name, mod in model.named_modules():
        for attr in MODULE_HOOK_DICTS:
            counts[("module", name, attr)] = _size(getattr(mod, attr, None))
    for name, p in model.named_parameters():
        for attr in ("_post_accumulate_grad_hooks", "_backward_hooks"):
            counts[("param", name, attr)] = _size(getattr(p, attr, None))
    for i, opt in enumerate(optimizers):
        for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
            counts[("optimizer", i, attr)] = _size(getattr(opt, attr))
    for attr in GLOBAL_HOOK_DICTS:
        counts[("global", attr)] = _size(getattr(module_mod, attr, None))
    counts[("global", "optimizer_pre")] = _size(optim_mod._global_optimizer_pre_hooks)
    counts[("global", "optimizer_post")] = _size(optim_mod._global_optimizer_post_hooks)
    return counts


def layer_grad_norms(model: nn.Module) -> dict:
    """Naive per-layer gradient L2 norms, for modules that own parameters."""
    out = {}
    for name, m in model.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.grad is not None]
        if own:
            out[name] = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in own))
    return out


def start(args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for_line(proc: subprocess.Popen, want: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process ended before printing {want!r}: {proc.stderr.read()[-3000:]}")
        if line.strip() == want:
            return
    raise AssertionError(f"no {want!r} within {timeout} s")


# ---- hooks -----------------------------------------------------------------------------------------
def test_close_removes_every_hook(tmp_path):
    model = mlp(dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data()
    before = hook_counts(model, [opt])

    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run")
    during = hook_counts(model, [opt])
    grew = {k for k in before if during[k] > before[k]}
    # gradwatch really hooked in: gradient hooks on every parameter, forward hooks, optimizer hooks
    assert {("param", n, "_post_accumulate_grad_hooks") for n, _ in model.named_parameters()} <= grew
    assert ("module", "", "_forward_pre_hooks") in grew
    assert any(k[0] == "module" and k[2] == "_forward_hooks" for k in grew)
    assert ("optimizer", 0, "_optimizer_step_pre_hooks") in grew
    assert ("optimizer", 0, "_optimizer_step_post_hooks") in grew
    for _ in range(3):
        train_step(model, opt, x, y, gw)
    gw.close()

    after = hook_counts(model, [opt])
    assert {k: (before[k], after[k]) for k in before if before[k] != after[k]} == {}
    assert len(gradwatch.load_run(tmp_path / "run").steps) == 3


def test_close_twice_is_safe_and_step_after_close_raises(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run")
    for _ in range(4):
        train_step(model, opt, x, y, gw)
    gw.close()
    meta = dict(gradwatch.load_run(tmp_path / "run").meta)
    gw.close()
    gw.close("crashed")  # a no-op: the run was already closed
    run = gradwatch.load_run(tmp_path / "run")
    assert run.meta["status"] == "finished"
    assert run.meta["end_time"] == meta["end_time"]
    assert run.steps["step"].tolist() == [0, 1, 2, 3]

    with pytest.raises(gradwatch.GradwatchError, match=r"after close\(\)"):
        train_step(model, opt, x, y, gw)
    assert len(gradwatch.load_run(tmp_path / "run").steps) == 4


def test_exception_in_with_block_propagates_and_marks_crashed(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    before = hook_counts(model, [opt])
    err = ValueError("diverged at step 3")
    with pytest.raises(ValueError) as info:
        with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run") as gw:
            for _ in range(3):
                train_step(model, opt, x, y, gw)
            assert hook_counts(model, [opt]) != before
            raise err
    assert info.value is err
    assert info.value.__traceback__ is not None
    assert hook_counts(model, [opt]) == before
    run = gradwatch.load_run(tmp_path / "run")
    assert run.meta["status"] == "crashed"
    assert run.status == "crashed"
    assert "ValueError" in run.meta["error"] and "diverged at step 3" in run.meta["error"]
    assert run.steps["step"].tolist() == [0, 1, 2]


def test_keyboard_interrupt_in_with_block_marks_crashed(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with pytest.raises(KeyboardInterrupt):
        with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run") as gw:
            train_step(model, opt, x, y, gw)
            raise KeyboardInterrupt
    run = gradwatch.load_run(tmp_path / "run")
    assert run.meta["status"] == "crashed"
    assert "KeyboardInterrupt" in run.meta["error"]


def test_normal_with_exit_marks_finished(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    before = hook_counts(model, [opt])
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run") as gw:
        for _ in range(5):
            train_step(model, opt, x, y, gw)
    assert hook_counts(model, [opt]) == before
    run = gradwatch.load_run(tmp_path / "run")
    assert run.meta["status"] == "finished"
    assert run.status == "finished"
    assert "error" not in run.meta
    assert run.meta["steps"] == 5
    assert run.steps["step"].tolist() == list(range(5))


def test_watch_again_after_close(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    before = hook_counts(model, [opt])
    for i in range(2):
        with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / f"run{i}") as gw:
            for _ in range(3):
                train_step(model, opt, x, y, gw)
        assert hook_counts(model, [opt]) == before
        assert len(gradwatch.load_run(tmp_path / f"run{i}").steps) == 3


def test_two_watchers_on_one_model_are_independent(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    before = hook_counts(model, [opt])
    first = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "a")
    second = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "b")
    for _ in range(2):
        loss = train_step(model, opt, x, y)
        first.step(loss)
        second.step(loss)
    first.close()
    ref = []
    for _ in range(2):  # closing the first watcher left the second one's hooks in place
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        ref.append(layer_grad_norms(model))
        opt.step()
        second.step(loss)
    second.close()
    assert hook_counts(model, [opt]) == before
    a, b = gradwatch.load_run(tmp_path / "a"), gradwatch.load_run(tmp_path / "b")
    assert a.steps["step"].tolist() == [0, 1] and b.steps["step"].tolist() == [0, 1, 2, 3]
    pd_a, pd_b = a.wide("grad_norm"), b.wide("grad_norm")
    assert pd_a.equals(pd_b.loc[[0, 1]])
    for step, r in zip((2, 3), ref):
        for layer, value in r.items():
            assert pd_b.loc[step, layer] == pytest.approx(value, rel=1e-5)


# ---- subprocesses: kill, exit, concurrent readers, store failure -----------------------------------
def test_sigkill_leaves_committed_steps_readable(tmp_path):
    run_dir = tmp_path / "run"
    proc = start([run_dir, "--print-steps", "--sleep", "0.01", "--seconds", "60"])
    try:
        wait_for_line(proc, "started")
        done: dict[int, float] = {}
        first = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"training ended early: {proc.stderr.read()[-3000:]}"
            if line.startswith("step "):
                _, i, t = line.split()
                done[int(i)] = float(t)
                first = first if first is not None else float(t)
                if len(done) >= 40 and time.time() - first >= 2.5:
                    break
        kill_time = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for line in proc.stdout.read().splitlines():  # steps printed before the kill, not read yet
        if line.startswith("step "):
            _, i, t = line.split()
            done[int(i)] = float(t)

    must_have = sorted(i for i, t in done.items() if t < kill_time - 1.2)
    assert len(must_have) >= 20
    run = gradwatch.load_run(run_dir)
    assert run.meta["status"] == "running"  # never closed ...
    assert run.status == "crashed"  # ... but its process is gone
    runs = gradwatch.list_runs(tmp_path)
    assert runs.loc[runs["run"] == "run", "status"].tolist() == ["crashed"]
    recorded = set(run.steps["step"])
    assert set(must_have) <= recorded, sorted(set(must_have) - recorded)[:10]
    layers = run.layers
    n_layers = len(run.meta["model"]["layers"])
    assert n_layers == 3
    for metric in ("grad_norm", "weight_norm"):
        sub = layers[layers["metric"] == metric]
        per_step = sub.groupby("step").size()
        assert all(per_step.get(i, 0) == n_layers for i in must_have), metric


def test_unclosed_watcher_is_closed_at_exit(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPT), run_dir, "--max-steps", "30", "--no-close"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = gradwatch.load_run(run_dir)
    assert run.meta["status"] == "finished"
    assert run.steps["step"].tolist() == list(range(30))


def test_uncaught_exception_without_close_marks_crashed(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPT), run_dir, "--raise-at", "12", "--no-close"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "RuntimeError: boom at step 12" in proc.stderr
    run = gradwatch.load_run(run_dir)
    assert run.meta["status"] == "crashed"
    assert run.status == "crashed"
    assert run.steps["step"].tolist() == list(range(12))


def test_concurrent_reader_sees_steps_grow_without_lock_errors(tmp_path):
    run_dir = tmp_path / "run"
    proc = start([run_dir, "--seconds", "3", "--sleep", "0.002"])
    counts, layer_counts = [], []
    try:
        wait_for_line(proc, "started")
        while proc.poll() is None:
            run = gradwatch.load_run(run_dir)  # a fresh Run each time
            steps, layers = run.steps, run.layers
            counts.append(len(steps))
            layer_counts.append(len(layers))
            if len(steps):
                assert steps["step"].tolist() == list(range(len(steps)))
            assert run.status in ("running", "finished")
            time.sleep(0.02)  # leave the trainer some CPU on a 2-core machine
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert err.strip() == ""
    assert "warnings 0" in out.splitlines()
    assert not any(line.startswith("warning:") for line in out.splitlines())
    trained = int(out.strip().splitlines()[-1].split()[1])
    assert counts == sorted(counts), "the step count went down between reads"
    assert layer_counts == sorted(layer_counts)
    assert len(set(counts)) >= 3, counts  # the reader really saw the run grow
    final = gradwatch.load_run(run_dir)
    assert len(final.steps) == trained
    assert final.meta["status"] == "finished"


def run_store_failure(tmp_path, fail_for: float):
    run_dir = tmp_path / "run"
    args = [sys.executable, str(SCRIPT), run_dir, "--seconds", "1.6", "--sleep", "0.002", "--fail-after", "10"]
    if fail_for:
        args += ["--fail-for", str(fail_for)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("trained ")
    trained = int(lines[-1].split()[1])
    assert trained > 30
    assert any(line.startswith("capped at ") for line in lines)
    warns = [line for line in lines if line.startswith("warning:")]
    assert "warnings 1" in lines, proc.stdout
    assert len(warns) == 1, warns
    assert "GradwatchWarning" in warns[0] and "could not write its store" in warns[0]
    assert str(run_dir) in warns[0]
    return run_dir, trained


def test_store_write_failure_warns_once_and_training_goes_on(tmp_path):
    run_dir, trained = run_store_failure(tmp_path, fail_for=0)
    run = gradwatch.load_run(run_dir)  # still readable
    recorded = run.steps["step"].tolist()
    assert recorded[:10] == list(range(10))  # flushed before the writes started to fail
    assert len(recorded) < trained  # the failure was real: later steps never reached the store


def test_store_write_failure_then_recovery_keeps_every_step(tmp_path):
    run_dir, trained = run_store_failure(tmp_path, fail_for=0.7)
    run = gradwatch.load_run(run_dir)
    # the batches that failed were kept and written once the store could be written again
    assert run.steps["step"].tolist() == list(range(trained))
    assert run.meta["status"] == "finished"
    per_step = run.layers[run.layers["metric"] == "grad_norm"].groupby("step").size()
    assert per_step.index.tolist() == list(range(trained))
    assert (per_step == 3).all()


# ---- run_dir that cannot be written ------------------------------------------------------------------
def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hook_counts(model, [opt])
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file")
    for run_dir in (blocker / "run", blocker):
        with pytest.raises(gradwatch.GradwatchError) as info:
            gradwatch.watch(model, optimizer=opt, run_dir=run_dir)
        msg = str(info.value)
        assert "run_dir" in msg and str(run_dir) in msg
        assert "write" in msg
    assert hook_counts(model, [opt]) == before
    assert blocker.read_text() == "a regular file"


# ---- a watched model still pickles, copies and loads ---------------------------------------------------
def test_watched_model_saves_and_loads(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    keys = list(model.state_dict())
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run") as gw:
        train_step(model, opt, x, y, gw)
        assert list(model.state_dict()) == keys
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        clone = pickle.loads(pickle.dumps(model))
        for other in (loaded, clone):
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
            nn.functional.mse_loss(other(x), y).backward()  # the copy's hooks must not feed this run
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        fresh = mlp(seed=5)
        fresh.load_state_dict(torch.load(buf))
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
        train_step(model, opt, x, y, gw)
    assert list(model.state_dict()) == keys
    assert gradwatch.load_run(tmp_path / "run").steps["step"].tolist() == [0, 1]


def test_deepcopy_while_watching_does_not_feed_the_run(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = data()
    x2, y2 = data(seed=7, n=40)
    ref_grad, ref_zero = [], []
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", detail_every=1) as gw:
        train_step(model, opt, x, y, gw)
        twin = copy.deepcopy(model)
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
        for _ in range(4):
            with torch.no_grad():
                ref_zero.append(float((model[0](x) <= 0).float().mean()))
            out = model(x)
            for _ in range(2):  # the copy trains between the original's forward and its step
                train_step(twin, twin_opt, 3 * x2, y2)
            loss = nn.functional.mse_loss(out, y)
            opt.zero_grad()
            loss.backward()
            ref_grad.append(layer_grad_norms(model))
            train_step(twin, twin_opt, x2, y2)
            opt.step()
            gw.step(loss)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    run = gradwatch.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == list(range(5))
    grad = run.wide("grad_norm").loc[1:]
    for step, ref in zip(grad.index, ref_grad):
        for layer, value in ref.items():
            assert grad.loc[step, layer] == pytest.approx(value, rel=1e-5), (step, layer)
    zero = run.wide("zero_fraction").loc[1:, "1"]
    assert zero.tolist() == pytest.approx(ref_zero, abs=1e-6)


def test_load_state_dict_while_watching(tmp_path):
    model = mlp()
    other = mlp(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", detail_every=1) as gw:
        train_step(model, opt, x, y, gw)
        model.load_state_dict(other.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
        train_step(model, opt, x, y, gw)
        ref = {n: math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in m.parameters(recurse=False)))
               for n, m in model.named_modules() if list(m.parameters(recurse=False))}
    wn = gradwatch.load_run(tmp_path / "run").wide("weight_norm")
    for layer, value in ref.items():
        assert wn.loc[1, layer] == pytest.approx(value, rel=1e-5)


def _train(watched: bool, run_dir: Path) -> tuple[list[torch.Tensor], torch.Tensor]:
    model = mlp(seed=11, dropout=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data(seed=2, n=32)
    torch.manual_seed(123)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=run_dir, detail_every=1, dead_window=3) if watched \
        else None
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        if gw is not None:
            gw.step(loss)
    if gw is not None:
        gw.close()
    return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()


def test_watching_does_not_change_training(tmp_path):
    plain, plain_rng = _train(False, tmp_path / "unused")
    watched, watched_rng = _train(True, tmp_path / "run")
    assert len(plain) == len(watched)
    for a, b in zip(plain, watched):
        assert torch.equal(a, b)
    assert torch.equal(plain_rng, watched_rng)  # gradwatch draws nothing from the global RNG
    run = gradwatch.load_run(tmp_path / "run")
    assert len(run.steps) == 20
    assert run.wide("update_ratio").notna().all().all()


def test_meta_written_by_a_crash_is_valid_json(tmp_path):
    """The error entry of a crashed run survives odd exception text (quotes, newlines, non-ASCII)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    text = 'bad "value"\nline two \u00e9\u4e2d'
    with pytest.raises(RuntimeError):
        with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run"):
            raise RuntimeError(text)
    run = gradwatch.load_run(tmp_path / "run")
    assert run.meta["error"] == f"RuntimeError: {text}"
    json.dumps(run.meta)
    assert os.path.isdir(tmp_path / "run")
