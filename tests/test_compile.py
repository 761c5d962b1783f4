"""gradwatch on a `torch.compile`d model (CPU), checked against naive references from the uncompiled module.

Backend: "aot_eager": the same Dynamo capture and AOTAutograd forward and backward graphs as inductor,
without the C++ codegen. Inductor works here (gcc is installed) and gave the same numbers when tried by hand,
but gradwatch's hooks split this MLP into 30 graphs (see `test_hooks_do_not_split_the_compiled_graph`), and
with a cold cache inductor took 19 s over 12 steps on 2 cores (9 s unwatched): too slow for 8 tests. Graph
breaks are Dynamo's, whatever the backend; the tests that only count them or trace NaN use "eager".

What this file pins down (torch 2.13):
  - `watch()` before the first compiled call (watching the module or what `torch.compile` returned): every
    hook runs. Dynamo cannot compile gradwatch's forward hooks; it breaks the graph around them and runs
    them eagerly. Grad norms, loss, dead-unit and zero fractions, and the NaN producer all equal the
    references. Dynamo recompiles for about 9 steps, then no more.
  - `watch()` after the first compiled call (also with `model.compile()` in place): Dynamo guards on the
    root module's hooks but not on its submodules' (`torch._dynamo.config.skip_nnmodule_hook_guards`), so
    the activation modules' hooks never run: no dead-unit, zero or saturation fractions, and no per-module
    NaN tracing. Gradients are read by parameter hooks, which run in autograd's accumulation outside any
    compiled graph: grad norms, loss and `skipped` stay right. `torch._dynamo.reset()` after `watch()`
    brings everything back.
  - `WatchConfig.grad_norms_only()` leaves the model in one compiled graph.
  - `watch(torch.compile(model))` names the layers "_orig_mod.<name>": `OptimizedModule` holds the model
    as its `_orig_mod` submodule.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import assert_table_close, layer_grad_norms, metric_table, naive_layers
from torch import nn
from torch._dynamo.utils import counters

import gradwatch

BACKEND = "aot_eager"
WINDOW = 3  # dead_window: dead-unit fractions are recorded at steps 2, 5, 8, ...
DEAD_UNITS = 4  # first-layer units given a bias of -50: they never fire on randn inputs
PREFIX = {"module": "", "compiled": "_orig_mod.", "in_place": ""}  # layer names, by what is watched


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch and counts only its own graph breaks."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class MLP(nn.Module):
    """A model class of the user's own: Dynamo compiles its forward (it skips torch.nn's own frames, so a
    bare `nn.Sequential` under `model.compile()` would not be compiled at all)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(6, 16), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(16, 16), nn.ReLU()
        self.out = nn.Linear(16, 3)
        with torch.no_grad():
            self.fc1.bias[:DEAD_UNITS] = -50.0

    def forward(self, x):
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x)))))


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


class _Ref:
    """Per step, from the uncompiled module: layer grad norms, the loss, and both ReLU outputs."""

    def __init__(self):
        self.grad_norm: dict[int, dict[str, float]] = {}
        self.loss: list[float] = []
        self.relu: list[tuple[torch.Tensor, torch.Tensor]] = []


def _train(model: MLP, compiled, opt, steps: int, ref: _Ref, gw=None) -> None:
    for _ in range(steps):
        step = len(ref.loss)
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        with torch.no_grad():  # the ReLU outputs with this step's weights, by plain functional calls
            h1 = torch.relu(nn.functional.linear(x, model.fc1.weight, model.fc1.bias))
            h2 = torch.relu(nn.functional.linear(h1, model.fc2.weight, model.fc2.bias))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        ref.grad_norm[step] = layer_grad_norms(naive_layers(model))
        ref.loss.append(float(loss.detach()))
        ref.relu.append((h1, h2))
        opt.step()
        if gw is not None:
            gw.step(loss)


def _dead_ref(ref: _Ref, prefix: str) -> dict[int, dict[str, float]]:
    """At the last step of each window: the share of units never > 0 over the window's samples."""
    out = {}
    for end in range(WINDOW - 1, len(ref.relu), WINDOW):
        window = ref.relu[end - WINDOW + 1: end + 1]
        out[end] = {prefix + name: float((torch.cat([w[i] for w in window]).amax(0) <= 0).float().mean())
                    for i, name in enumerate(("act1", "act2"))}
    return out


def _zero_ref(ref: _Ref, prefix: str) -> dict[int, dict[str, float]]:
    return {s: {prefix + "act1": float((h1 <= 0).float().mean()), prefix + "act2": float((h2 <= 0).float().mean())}
            for s, (h1, h2) in enumerate(ref.relu)}


def _renamed(table: dict[int, dict[str, float]], prefix: str) -> dict[int, dict[str, float]]:
    return {s: {prefix + k: v for k, v in row.items()} for s, row in table.items()}


def _hook_counts(model: nn.Module, opt) -> list[int]:
    mods = [len(d) for m in model.modules()
            for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)]
    params = [len(d or {}) for p in model.parameters()
              for d in (p._post_accumulate_grad_hooks, p._backward_hooks)]
    return mods + params + [len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)]


def _compiles() -> tuple[int, int]:
    """Frames Dynamo compiled, and graph breaks it took, so far."""
    return counters["frames"]["total"], sum(counters["graph_break"].values())


def _compile(model: MLP, target: str):
    """(what is called, what is watched): `torch.compile(model)`, watched as the module or as the
    OptimizedModule it returns, or `model.compile()` in place."""
    if target == "in_place":
        model.compile(backend=BACKEND)
        return model, model
    compiled = torch.compile(model, backend=BACKEND)
    return compiled, (model if target == "module" else compiled)


def _watch(watched, opt, run_dir):
    return gradwatch.watch(watched, optimizer=opt, run_dir=run_dir, detail_every=1, dead_window=WINDOW,
                           detect_every=0)


def _check_everything(run, ref: _Ref, prefix: str) -> None:
    assert run.steps["step"].tolist() == list(range(len(ref.loss)))
    assert not run.steps["skipped"].any()
    np.testing.assert_allclose(run.steps["loss"].to_numpy(), ref.loss, rtol=1e-6)
    assert_table_close(metric_table(run, "grad_norm"), _renamed(ref.grad_norm, prefix), rtol=1e-5,
                       what="grad_norm")
    dead = _dead_ref(ref, prefix)
    assert all(row[prefix + "act1"] >= DEAD_UNITS / 16 for row in dead.values())
    assert_table_close(metric_table(run, "dead_fraction"), dead, rtol=1e-6, what="dead_fraction")
    assert_table_close(metric_table(run, "zero_fraction"), _zero_ref(ref, prefix), rtol=1e-6,
                       what="zero_fraction")


@pytest.mark.parametrize("target", ["module", "compiled"])
def test_watch_before_first_compiled_call_records_everything(tmp_path, target):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    compiled, watched = _compile(model, target)
    before = _hook_counts(watched, opt)
    gw = _watch(watched, opt, tmp_path / "run")
    ref = _Ref()
    _train(model, compiled, opt, 4 * WINDOW, ref, gw)
    warm = _compiles()
    assert warm[1] > 0  # each hook call runs eagerly between compiled pieces of the graph
    _train(model, compiled, opt, 2 * WINDOW, ref, gw)
    # Warm after the first steps: nothing compiles again.
    assert _compiles() == warm
    gw.close()
    assert _hook_counts(watched, opt) == before

    run = gradwatch.load_run(tmp_path / "run")
    _check_everything(run, ref, PREFIX[target])
    assert run.meta["loss"]["classes"] == 3  # the loss's autograd chain is read through the compiled graph


@pytest.mark.parametrize("target", ["module", "compiled", "in_place"])
def test_watch_after_first_compiled_call_records_gradients_but_no_activations(tmp_path, target):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    compiled, watched = _compile(model, target)
    _train(model, compiled, opt, 2, _Ref())  # Dynamo compiles the forward before any hook exists
    before = _hook_counts(watched, opt)
    gw = _watch(watched, opt, tmp_path / "run")
    ref = _Ref()
    _train(model, compiled, opt, 2 * WINDOW, ref, gw)
    gw.close()
    assert _hook_counts(watched, opt) == before

    # Why: Dynamo guards on the root module's hooks but not on its submodules' (this flag; set it to False
    # before the first compiled call and every hook runs), so the activation modules' hooks never run.
    assert torch._dynamo.config.skip_nnmodule_hook_guards
    run = gradwatch.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == list(range(2 * WINDOW))
    assert not run.steps["skipped"].any()
    np.testing.assert_allclose(run.steps["loss"].to_numpy(), ref.loss, rtol=1e-6)
    np.testing.assert_allclose(run.steps["lr"].to_numpy(), 0.05)
    assert_table_close(metric_table(run, "grad_norm"), _renamed(ref.grad_norm, PREFIX[target]),
                       rtol=1e-5, what="grad_norm")
    recorded = set(run.layers["metric"].astype(str))
    assert {"grad_norm", "grad_maxabs", "weight_norm", "update_ratio", "nonfinite"} <= recorded
    assert not recorded & {"dead_fraction", "zero_fraction"}
    assert not (run.series["kind"] == "activation").any()


def test_dynamo_reset_after_watch_brings_the_activations_back(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    compiled, watched = _compile(model, "module")
    _train(model, compiled, opt, 2, _Ref())
    gw = _watch(watched, opt, tmp_path / "run")
    torch._dynamo.reset()  # drops the code compiled without the hooks: the next call recompiles with them
    ref = _Ref()
    _train(model, compiled, opt, WINDOW, ref, gw)
    gw.close()
    _check_everything(gradwatch.load_run(tmp_path / "run"), ref, "")


@pytest.mark.parametrize("when,producer", [("before", "fc2"), ("after", "(root)")])
def test_nan_producer(tmp_path, when, producer):
    """A NaN planted in fc2's weight. watch() before the first compiled call: named fc2, as in eager. After
    it: only the root module's hooks run, so the NaN is seen at the model's output, without its producer."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    compiled = torch.compile(model, backend="eager")
    if when == "after":
        _train(model, compiled, opt, 2, _Ref())
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", detail_every=1, detect_every=0)
    _train(model, compiled, opt, 2, _Ref(), gw)
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    _train(model, compiled, opt, 1, _Ref(), gw)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    assert run.events[["step", "kind", "phase", "module"]].values.tolist() == [[2, "nan", "forward", producer]]
    (finding,) = [f for f in gradwatch.diagnose(tmp_path / "run").findings if f.kind == "nan_inf"]
    assert (finding.layer, finding.step) == (producer, 2)


def test_grad_norms_only_keeps_the_model_in_one_graph(tmp_path):
    """Without activation and NaN-tracing hooks only the root's forward pre-hook is left: it breaks the
    graph before the model runs, and the model itself compiles into one graph, as it does unwatched."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", detect_every=0,
                         config=gradwatch.WatchConfig.grad_norms_only())
    ref = _Ref()
    _train(model, torch.compile(model, backend="eager"), opt, 2 * WINDOW, ref, gw)
    gw.close()
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["stats"]["calls_captured"] == 5  # 3 Linear and 2 ReLU: the whole forward
    run = gradwatch.load_run(tmp_path / "run")
    assert_table_close(metric_table(run, "grad_norm"), ref.grad_norm, rtol=1e-5, what="grad_norm")
    np.testing.assert_allclose(run.steps["loss"].to_numpy(), ref.loss, rtol=1e-6)


def test_hooks_run_eagerly_without_recompiling(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", detect_every=0)
    forward_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    _train(model, torch.compile(model, backend="eager"), opt, 6, _Ref(), gw)
    gw.close()
    gave_up = [reason for reason in counters["unimplemented"] if "recompile limit" in reason.lower()]
    assert not gave_up, "Dynamo hit its recompile limit and fell back to eager"
    assert sum(counters["graph_break"].values()) <= forward_hooks
