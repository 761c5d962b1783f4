"""Per-layer gradient statistics equal a naive reference computed from `named_parameters()`.

Every reference number is computed here, from the model's own `.grad` / weights, right after backward
(before any clipping or optimizer step), in float64.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _models import (
    TiedLM,
    assert_table_close,
    layer_grad_maxabs,
    layer_grad_norms,
    layer_weight_norms,
    metric_table,
    mlp,
    naive_layers,
    norm64,
    snapshot,
    task,
    total_grad_norm,
    update_ratios,
)
from torch import nn

import gradwatch

STEPS = 12  # covers the default detail steps 0 and 10 (weight norm, grad max-abs, update ratio)
DETAIL = 10  # WatchConfig.detail_every's default
MICRO = 4
CLIP = 1e-3  # far below every model's grad norm: clipping always binds


def _train(kind: str, mode: str, run_dir, detail: int = DETAIL):
    torch.manual_seed(0)
    model, batch, loss_fn = task(kind)
    layers = naive_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3) if mode == "amp" else None
    options = {} if detail == DETAIL else {"detail_every": detail}
    gw = gradwatch.watch(model, optimizer=opt, run_dir=run_dir, scaler=scaler, **options)
    ref = {m: {} for m in ("grad_norm", "grad_maxabs", "weight_norm", "update_ratio")}
    totals, scales, clip_totals = [], [], []
    micro = MICRO if mode == "accum" else 1
    for step in range(STEPS):
        opt.zero_grad()
        for _ in range(micro):
            x, y = batch()
            # oneDNN has no bf16 LSTM on CPU: the LSTM runs in fp32 under the scaler (scaling is what matters)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "amp" and kind != "lstm"):
                loss = loss_fn(model(x), y) / micro
            (scaler.scale(loss) if scaler else loss).backward()
        scale = scaler.get_scale() if scaler else 1.0
        scales.append(scale)
        ref["grad_norm"][step] = layer_grad_norms(layers, scale)
        if step % detail == 0:
            ref["grad_maxabs"][step] = layer_grad_maxabs(layers, scale)
        totals.append(total_grad_norm(layers, scale))
        if mode == "clip" or (mode == "amp" and kind == "mlp"):
            if scaler:
                scaler.unscale_(opt)
            clip_totals.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        before = snapshot(layers)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if step % detail == 0:
            ref["weight_norm"][step] = layer_weight_norms(layers)
            ref["update_ratio"][step] = update_ratios(layers, before)
        gw.step(loss)
    gw.close()
    return gradwatch.load_run(run_dir), layers, ref, totals, scales, clip_totals


@pytest.mark.parametrize("mode", ["plain", "clip", "accum", "amp"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer", "lstm"])
def test_layer_stats_match_naive_reference(kind, mode, tmp_path):
    _check_against_reference(kind, mode, tmp_path)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_detail_every_step(kind, tmp_path):
    """detail_every=1: weight norm, grad max-abs and update ratio on every step, all still exact."""
    _check_against_reference(kind, "clip", tmp_path, detail=1)


def _check_against_reference(kind, mode, tmp_path, detail=DETAIL):
    run, layers, ref, totals, scales, clip_totals = _train(kind, mode, tmp_path / "run", detail)
    assert sorted(ref["weight_norm"]) == list(range(0, STEPS, detail))

    # exactly one row per optimizer step, none skipped
    assert run.steps["step"].tolist() == list(range(STEPS))
    assert not run.steps["skipped"].any()
    # every layer of the naive walk is a recorded layer
    assert set(run.layers.loc[run.layers.metric == "grad_norm", "layer"].astype(str)) == set(layers)

    assert_table_close(metric_table(run, "grad_norm"), ref["grad_norm"], rtol=1e-5, what="grad_norm")
    assert_table_close(metric_table(run, "grad_maxabs"), ref["grad_maxabs"], rtol=1e-6, what="grad_maxabs")
    assert_table_close(metric_table(run, "weight_norm"), ref["weight_norm"], rtol=1e-5, what="weight_norm")
    assert_table_close(metric_table(run, "update_ratio"), ref["update_ratio"], rtol=1e-4,
                       what="update_ratio")
    np.testing.assert_allclose(run.steps["grad_norm"].to_numpy(), totals, rtol=1e-5)

    if clip_totals:  # the clip really bound, so a post-clip reading would have been CLIP
        assert min(clip_totals) > 10 * CLIP
        np.testing.assert_allclose(clip_totals, totals, rtol=1e-4)
    if mode == "amp":
        assert len(set(scales)) > 1, "the scale should grow during the run (growth_interval=3)"
        np.testing.assert_allclose(run.steps["loss_scale"].to_numpy(), scales, rtol=0)
    else:
        assert run.steps["loss_scale"].isna().all()


def test_global_norm_is_pre_clip_not_post_clip(tmp_path):
    torch.manual_seed(1)
    model = mlp()
    layers = naive_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run")
    pre, post = [], []
    for _ in range(10):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
        loss.backward()
        pre.append(total_grad_norm(layers))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        post.append(total_grad_norm(layers))
        opt.step()
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    assert max(post) < 0.011 < min(pre)
    np.testing.assert_allclose(run.steps["grad_norm"].to_numpy(), pre, rtol=1e-5)


@pytest.mark.parametrize("scheduler_first", [False, True], ids=["gw_then_sched", "sched_then_gw"])
def test_lr_column_is_the_lr_used_by_each_step(scheduler_first, tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD([
        {"params": model[0].parameters()},
        {"params": [*model[2].parameters(), *model[4].parameters()], "lr": 0.02},
    ], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: min(1.0, (s + 1) / 5), lambda s: 0.7**s])
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run")
    used = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
        loss.backward()
        used.append([g["lr"] for g in opt.param_groups])
        opt.step()
        if scheduler_first:
            sched.step()
            gw.step(loss)
        else:
            gw.step(loss)
            sched.step()
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    used = np.array(used)
    assert len(set(used[:, 0])) > 1 and len(set(used[:, 1])) > 1
    np.testing.assert_allclose(run.steps["lr"].to_numpy(), used[:, 0], rtol=1e-12)
    np.testing.assert_allclose(run.steps["lr_1"].to_numpy(), used[:, 1], rtol=1e-12)


def test_every_records_only_every_nth_step(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    layers = naive_layers(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", every=3)
    ref, totals = {}, {}
    for step in range(11):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
        loss.backward()
        if step % 3 == 0:
            ref[step] = layer_grad_norms(layers)
            totals[step] = total_grad_norm(layers)
        opt.step()
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == [0, 3, 6, 9]
    assert sorted(run.layers["step"].unique().tolist()) == [0, 3, 6, 9]
    assert_table_close(metric_table(run, "grad_norm"), ref, what="grad_norm")
    np.testing.assert_allclose(run.steps["grad_norm"].to_numpy(), [totals[s] for s in (0, 3, 6, 9)], rtol=1e-5)


class _EncHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10))
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.enc(x))


@pytest.mark.parametrize("include,exclude,expected", [
    ("enc.*", None, {"enc.0", "enc.2"}),
    (None, ["head", "enc.0"], {"enc.2"}),
    (["enc.2", "head"], "head", {"enc.2"}),
])
def test_include_exclude_restrict_layers(include, exclude, expected, tmp_path):
    torch.manual_seed(0)
    model = _EncHead()
    layers = {k: v for k, v in naive_layers(model).items() if k in expected}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", include=include, exclude=exclude)
    ref, totals = {}, []
    for step in range(6):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
        loss.backward()
        ref[step] = layer_grad_norms(layers)
        totals.append(total_grad_norm(layers))
        opt.step()
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    for metric in ("grad_norm", "grad_maxabs", "weight_norm"):
        assert set(run.layers.loc[run.layers.metric == metric, "layer"].astype(str)) == expected, metric
    assert_table_close(metric_table(run, "grad_norm"), ref, what="grad_norm")
    # the global norm is over the watched parameters only
    np.testing.assert_allclose(run.steps["grad_norm"].to_numpy(), totals, rtol=1e-5)


def test_frozen_layer_has_no_grad_rows(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    model[2].requires_grad_(False)  # a fully frozen layer
    model[0].bias.requires_grad_(False)  # and a partly frozen one: its norm is over the weight only
    all_layers = naive_layers(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", detail_every=1)
    ref_g, ref_m, ref_w, totals = {}, {}, {}, []
    for step in range(6):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
        loss.backward()
        ref_g[step] = layer_grad_norms(all_layers)
        ref_m[step] = layer_grad_maxabs(all_layers)
        totals.append(total_grad_norm(all_layers))
        opt.step()
        ref_w[step] = layer_weight_norms(all_layers)
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    assert set(ref_g[0]) == {"0", "4"}
    assert math.isclose(ref_g[5]["0"], norm64([model[0].weight.grad]), rel_tol=1e-12)  # last step's grads
    assert_table_close(metric_table(run, "grad_norm"), ref_g, what="grad_norm")
    assert_table_close(metric_table(run, "grad_maxabs"), ref_m, rtol=1e-6, what="grad_maxabs")
    assert_table_close(metric_table(run, "weight_norm"), ref_w, what="weight_norm")  # frozen layer included
    np.testing.assert_allclose(run.steps["grad_norm"].to_numpy(), totals, rtol=1e-5)


def test_weight_tied_layers_and_global_norm_count_shared_tensor_once(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    assert model.out.weight is model.emb.weight
    layers = naive_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", detail_every=1)
    ref_g, ref_w, ref_r, totals, double = {}, {}, {}, [], []
    for step in range(8):
        opt.zero_grad()
        t = torch.randint(0, 12, (4, 5))
        out = model(t)
        loss = nn.functional.cross_entropy(out.reshape(-1, 12), t.roll(1, 1).reshape(-1))
        loss.backward()
        ref_g[step] = layer_grad_norms(layers)
        totals.append(norm64([model.emb.weight.grad, model.mid.weight.grad, model.mid.bias.grad,
                              model.out.bias.grad]))
        double.append(norm64([p.grad for ps in layers.values() for p in ps]))
        before = snapshot(layers)
        opt.step()
        ref_w[step] = layer_weight_norms(layers)
        ref_r[step] = update_ratios(layers, before)
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    # both owners of the shared weight get its gradient in their norm
    assert any(p is model.emb.weight for p in layers["out"]) and any(p is model.emb.weight for p in layers["emb"])
    for step in ref_g:
        assert ref_g[step]["out"] > ref_g[step]["emb"] > 0
    assert_table_close(metric_table(run, "grad_norm"), ref_g, what="grad_norm")
    assert_table_close(metric_table(run, "weight_norm"), ref_w, what="weight_norm")
    assert_table_close(metric_table(run, "update_ratio"), ref_r, rtol=1e-4, what="update_ratio")
    assert not np.allclose(totals, double, rtol=1e-3)  # the reference can tell counting once from twice
    np.testing.assert_allclose(run.steps["grad_norm"].to_numpy(), totals, rtol=1e-5)


def test_no_optimizer_hand_written_sgd(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    layers = naive_layers(model)
    gw = gradwatch.watch(model, optimizer=None, run_dir=tmp_path / "run", detail_every=1)
    ref_g, ref_w, ref_r, totals = {}, {}, {}, []
    for step in range(12):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
        loss.backward()
        ref_g[step] = layer_grad_norms(layers)
        totals.append(total_grad_norm(layers))
        before = snapshot(layers)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
                p.grad = None
        ref_w[step] = layer_weight_norms(layers)
        ref_r[step] = update_ratios(layers, before)
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == list(range(12))
    assert run.steps["skipped"].isna().all()
    assert_table_close(metric_table(run, "grad_norm"), ref_g, what="grad_norm")
    assert_table_close(metric_table(run, "weight_norm"), ref_w, what="weight_norm")
    np.testing.assert_allclose(run.steps["grad_norm"].to_numpy(), totals, rtol=1e-5)
    ratios = metric_table(run, "update_ratio")
    assert 10 in ratios, f"update_ratio recorded at steps {sorted(ratios)}"
    assert_table_close({s: ratios[s] for s in ratios}, {s: ref_r[s] for s in ratios}, rtol=1e-4,
                       what="update_ratio")


def test_lbfgs_one_row_per_step_with_closure(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    layers = naive_layers(model)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run")
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    evals, last = [], []
    for _ in range(5):
        norms = []

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            norms.append(layer_grad_norms(layers))  # noqa: B023
            return loss

        loss = opt.step(closure)
        evals.append(norms)
        last.append(layer_grad_norms(layers))
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == list(range(5))
    assert not run.steps["skipped"].any()
    np.testing.assert_allclose(run.steps["lr"].to_numpy(), 0.5)
    assert max(len(e) for e in evals) > 1  # several closure evaluations per step
    got = metric_table(run, "grad_norm")
    for step, norms in enumerate(evals):
        # the recorded gradient is one that a backward pass of this step produced (the last one)
        assert any(all(math.isclose(got[step][k], n[k], rel_tol=1e-5) for k in n) for n in norms), step
        assert all(math.isclose(got[step][k], last[step][k], rel_tol=1e-5) for k in last[step]), step


def test_skipped_when_optimizer_step_not_called(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    layers = naive_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run")
    ref = {}
    for step in range(6):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
        loss.backward()
        ref[step] = layer_grad_norms(layers)
        if step != 3:
            opt.step()
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    assert run.steps["skipped"].tolist() == [False, False, False, True, False, False]
    assert_table_close(metric_table(run, "grad_norm"), ref, what="grad_norm")  # still measured on the skip
    np.testing.assert_allclose(run.steps["lr"].to_numpy(), 0.1)


def test_grad_scaler_skip_on_inf_gradient(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    layers = naive_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=100)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", scaler=scaler)
    bad_step, scales, ref = 3, [], {}
    for step in range(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
        h = model[0].weight.register_hook(lambda g: g * float("inf")) if step == bad_step else None
        scaler.scale(loss).backward()
        if h is not None:
            h.remove()
        scales.append(scaler.get_scale())
        ref[step] = layer_grad_norms(layers, scales[-1])
        scaler.step(opt)
        scaler.update()
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    assert scales[bad_step + 1] == scales[bad_step] / 2  # the scaler really backed off
    assert run.steps["skipped"].tolist() == [s == bad_step for s in range(6)]
    np.testing.assert_allclose(run.steps["loss_scale"].to_numpy(), scales, rtol=0)
    got = metric_table(run, "grad_norm")
    assert got[bad_step]["0"] == math.inf
    ref[bad_step]["0"] = math.inf
    assert_table_close(got, ref, what="grad_norm")
    nonfinite = metric_table(run, "nonfinite")
    assert nonfinite[bad_step] == {"0": 1.0, "2": 0.0, "4": 0.0}
    assert all(v == 0.0 for s in nonfinite if s != bad_step for v in nonfinite[s].values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_params_norms_at_float32_accuracy(dtype, tmp_path):
    """Norms of bf16/fp16 tensors are computed, not rounded to bf16/fp16: the reference is the exact norm
    of the same low-precision values (float64), and a float32 accumulation is within 1e-5 of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)
    layers = naive_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", detail_every=1)
    ref_g, ref_w, totals = {}, {}, []
    for step in range(5):
        opt.zero_grad()
        x, y = torch.randn(16, 32, dtype=dtype), torch.randn(16, 1, dtype=dtype)
        loss = nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        ref_g[step] = layer_grad_norms(layers)
        totals.append(total_grad_norm(layers))
        opt.step()
        ref_w[step] = layer_weight_norms(layers)
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    assert_table_close(metric_table(run, "grad_norm"), ref_g, rtol=1e-5, what="grad_norm")
    assert_table_close(metric_table(run, "weight_norm"), ref_w, rtol=1e-5, what="weight_norm")
    np.testing.assert_allclose(run.steps["grad_norm"].to_numpy(), totals, rtol=1e-5)


class _HalfVector(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.full((n,), 0.5, dtype=torch.float16))

    def forward(self, x):
        # The sum (2.5e6) is taken in float32, so the loss is finite; the gradient stays fp16.
        return (self.w.float() * x.float()).sum()


def test_fp16_norm_above_fp16_max_is_finite(tmp_path):
    """5000 finite fp16 gradients of 1000 each: the norm, 70710.7, is beyond fp16's max (65504) but is a
    finite number, and the layer's gradient holds no Inf."""
    model = _HalfVector(5000)
    opt = torch.optim.SGD(model.parameters(), lr=1e-8)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run")
    loss = model(torch.full((5000,), 1000.0, dtype=torch.float16))
    loss.backward()
    assert torch.isfinite(model.w.grad).all()
    expected = norm64([model.w.grad])
    assert expected > float(torch.finfo(torch.float16).max)
    opt.step()
    gw.step(loss.float())
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    got = metric_table(run, "grad_norm")[0]["(root)"]
    assert got == pytest.approx(expected, rel=1e-5)
    assert metric_table(run, "nonfinite")[0]["(root)"] == 0.0
    assert run.steps["grad_norm"].iloc[0] == pytest.approx(expected, rel=1e-5)
    assert not run.steps["nonfinite"].iloc[0]


def test_sparse_embedding_gradients(tmp_path):
    """Sparse gradients (uncoalesced after two micro-batches) count each row once, summed."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8, sparse=True)
            self.fc = nn.Linear(8, 1)

        def forward(self, t):
            return self.fc(self.emb(t)).pow(2).mean()

    model = M()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", detail_every=1)
    ref_n, ref_m, totals = {}, {}, []
    for step in range(4):
        opt.zero_grad()
        for _ in range(2):
            loss = model(torch.randint(0, 10, (3, 5)))
            loss.backward()
        g = model.emb.weight.grad
        assert g.is_sparse
        dense = [g.to_dense(), model.fc.weight.grad, model.fc.bias.grad]
        ref_n[step] = {"emb": norm64(dense[:1]), "fc": norm64(dense[1:])}
        ref_m[step] = {"emb": float(dense[0].abs().max()),
                       "fc": max(float(d.abs().max()) for d in dense[1:])}
        totals.append(norm64(dense))
        opt.step()
        gw.step(loss)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    assert_table_close(metric_table(run, "grad_norm"), ref_n, what="grad_norm")
    assert_table_close(metric_table(run, "grad_maxabs"), ref_m, rtol=1e-6, what="grad_maxabs")
    np.testing.assert_allclose(run.steps["grad_norm"].to_numpy(), totals, rtol=1e-5)
