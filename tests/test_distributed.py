"""Two processes on the gloo backend, on CPU: DDP and FSDP2 runs against single-process references.

Each scenario spawns 2 ranks that train the same seeded model on their half of a global batch and call
`gradwatch.watch()` on every rank. The reference trains an identical model in this process on the whole
global batch: DDP averages the ranks' gradients, so with a mean loss its gradients are the reference's.
"""
from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import (
    assert_table_close,
    layer_grad_norms,
    layer_weight_norms,
    metric_table,
    naive_layers,
    snapshot,
    update_ratios,
)
from torch import nn

import gradwatch

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD, BATCH, STEPS, NAN_STEP, WINDOW = 2, 8, 10, 8, 4
LR = 1e-3


class PerSampleNorm(nn.Module):
    """Standardizes each sample over its features: 0/0 = NaN for a sample whose features are all equal."""

    def forward(self, x):
        return (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), PerSampleNorm(), nn.Linear(6, 3))
    with torch.no_grad():  # hidden unit j copies feature j; units 4 and 5 never fire
        model[0].weight.zero_()
        model[0].weight[:4, :4] = torch.eye(4)
        model[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, -10.0, -10.0]))
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0-3 go to rank 0, rows 4-7 to rank 1. Feature 0 is negative on rank 0's rows and positive on
    rank 1's, so hidden unit 0 fires only on rank 1. At NAN_STEP, one of rank 1's samples is constant."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.rand(BATCH, 4, generator=g) + 0.5
    x[: BATCH // 2, 0] = -x[: BATCH // 2, 0]
    if step == NAN_STEP:
        x[BATCH - 1] = -5.0  # every hidden unit is negative: all-zero features after the ReLU, std 0
    return x, torch.randn(BATCH, 3, generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, tmp_path, *args) -> list[dict]:
    port = _free_port()
    mp.spawn(_exit_after, args=(fn, port, str(tmp_path), *args), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _exit_after(rank: int, fn, *args) -> None:
    """Runs a worker, then leaves without the interpreter's teardown. After an FSDP2 run, torch's own
    teardown at exit sometimes aborts ("terminate called without an active exception", no Python frame
    left), after the worker has returned: once in CI and in 1 of 40 runs here, then 0 of 80; the same loop
    without gradwatch, 0 of 100. A worker that raises still fails the test."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


def _local(x: torch.Tensor, rank: int) -> torch.Tensor:
    n = BATCH // WORLD
    return x[rank * n: (rank + 1) * n]


def _train(model, opt, gw, rank: int, steps: int) -> list[float]:
    """`steps` SGD steps on this rank's half of each global batch; the rank's losses."""
    losses = []
    for step in range(steps):
        x, y = global_batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(_local(x, rank)), _local(y, rank))
        loss.backward()
        opt.step()
        gw.step(loss)
        losses.append(loss.item())
    return losses


# ---- DDP -------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    _init(rank, port)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        # Rank 1 is given a folder of its own, to show that it never creates it.
        run_dir = f"{tmp}/run" if rank == 0 else f"{tmp}/rank1-run"
        gw = gradwatch.watch(model, optimizer=opt, run_dir=run_dir, dead_window=WINDOW, detail_every=2,
                             detect_every=0)
        losses = _train(model, opt, gw, rank, STEPS)
        gw.close()
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump({"losses": losses}, f)
    finally:
        dist.destroy_process_group()


def _reference(steps: int) -> tuple[dict, dict, dict, dict]:
    """Grad norms, weight norms, update ratios and losses of one process on the global batch."""
    model = make_model()
    layers = {f"module.{k}": v for k, v in naive_layers(model).items()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    grads, weights, ratios = {}, {}, {}
    for step in range(steps):
        x, y = global_batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads[step] = layer_grad_norms(layers)
        before = snapshot(layers)
        opt.step()
        if step % 2 == 0:
            weights[step] = layer_weight_norms(layers)
            ratios[step] = update_ratios(layers, before)
    return grads, weights, ratios


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    ranks = _spawn(_ddp_worker, tmp)
    return gradwatch.load_run(tmp / "run"), ranks, tmp


def test_ddp_only_rank_zero_writes(ddp_run):
    run, _, tmp = ddp_run
    assert not (tmp / "rank1-run").exists()
    assert run.meta["distributed"] == {"world_size": 2, "merged": True, "sharded": False}
    assert run.meta["status"] == "finished"
    assert run.steps["step"].tolist() == list(range(STEPS))


def test_ddp_grad_norms_equal_the_single_process_reference(ddp_run):
    run, _, _ = ddp_run
    grads, weights, ratios = _reference(NAN_STEP)  # from NAN_STEP on, everything is NaN
    got = {s: v for s, v in metric_table(run, "grad_norm").items() if s < NAN_STEP}
    assert_table_close(got, grads, rtol=1e-5, what="grad_norm")
    got = {s: v for s, v in metric_table(run, "weight_norm").items() if s < NAN_STEP}
    assert_table_close(got, weights, rtol=1e-5, what="weight_norm")
    got = {s: v for s, v in metric_table(run, "update_ratio").items() if s < NAN_STEP}
    assert_table_close(got, ratios, rtol=1e-4, what="update_ratio")


def test_ddp_loss_is_the_mean_over_ranks(ddp_run):
    run, ranks, _ = ddp_run
    expected = np.mean([r["losses"] for r in ranks], axis=0)
    np.testing.assert_allclose(run.steps["loss"].to_numpy()[:NAN_STEP], expected[:NAN_STEP], rtol=1e-6)


def test_ddp_nan_on_rank_one_alone_is_reported_with_its_rank(ddp_run):
    run, ranks, _ = ddp_run
    assert np.isfinite(ranks[0]["losses"][NAN_STEP]) and not np.isfinite(ranks[1]["losses"][NAN_STEP])
    first = run.events.iloc[0]
    assert (first["step"], first["phase"], first["module"], first["rank"]) == (NAN_STEP, "forward",
                                                                                "module.2", 1)
    assert "(rank 1)" in first["detail"]
    findings = gradwatch.diagnose(run).findings
    nan = [f for f in findings if f.kind == "nan_inf"]
    assert nan and nan[0].layer == "module.2" and nan[0].step == NAN_STEP


def test_ddp_a_unit_that_fires_on_one_rank_only_is_alive(ddp_run):
    """Unit 0 fires only on rank 1's data, units 4 and 5 nowhere: 2 of 6 dead, not rank 0's 3 of 6."""
    run, _, _ = ddp_run
    dead = metric_table(run, "dead_fraction")
    assert dead[WINDOW - 1]["module.1"] == pytest.approx(2 / 6)


def test_ddp_zero_fraction_pools_the_ranks(ddp_run):
    run, _, _ = ddp_run
    x, _ = global_batch(0)
    model = make_model()
    expected = float((model[1](model[0](x)) <= 0).double().mean())
    assert metric_table(run, "zero_fraction")[0]["module.1"] == pytest.approx(expected, abs=1e-6)


# ---- FSDP2 -----------------------------------------------------------------------------------------
def _fsdp_worker(rank: int, port: int, tmp: str) -> None:
    from torch.distributed.fsdp import fully_shard

    _init(rank, port)
    try:
        model = make_model()
        for i in (0, 3):
            fully_shard(model[i])
        fully_shard(model)
        assert type(model[0].weight).__name__ == "DTensor"
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        gw = gradwatch.watch(model, optimizer=opt, run_dir=f"{tmp}/run", detail_every=2, detect_every=0)
        _train(model, opt, gw, rank, NAN_STEP)
        gw.close()
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump({"shard_rows": model[0].weight.to_local().shape[0]}, f)
    finally:
        dist.destroy_process_group()


def test_fsdp2_norms_combine_shards_and_equal_the_unsharded_reference(tmp_path):
    ranks = _spawn(_fsdp_worker, tmp_path)
    assert [r["shard_rows"] for r in ranks] == [3, 3]  # the 6-row weight really is split
    run = gradwatch.load_run(tmp_path / "run")
    assert run.meta["distributed"]["sharded"] is True
    grads, weights, ratios = _reference(NAN_STEP)
    strip = {step: {k.removeprefix("module."): v for k, v in row.items()} for step, row in grads.items()}
    assert_table_close(metric_table(run, "grad_norm"), strip, rtol=1e-5, what="grad_norm")
    strip = {step: {k.removeprefix("module."): v for k, v in row.items()} for step, row in weights.items()}
    assert_table_close(metric_table(run, "weight_norm"), strip, rtol=1e-5, what="weight_norm")
    strip = {step: {k.removeprefix("module."): v for k, v in row.items()} for step, row in ratios.items()}
    assert_table_close(metric_table(run, "update_ratio"), strip, rtol=1e-4, what="update_ratio")
    totals = [float(np.sqrt(sum(v * v for v in grads[s].values()))) for s in range(NAN_STEP)]
    np.testing.assert_allclose(run.steps["grad_norm"].to_numpy(), totals, rtol=1e-5)


# ---- halt_on: every rank stops at the same step ------------------------------------------------------
def _halt_worker(rank: int, port: int, tmp: str) -> None:
    _init(rank, port)
    stopped_at, message = None, ""
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        try:
            with gradwatch.watch(model, optimizer=opt, run_dir=f"{tmp}/run", halt_on="critical",
                                 detect_every=0.1, flush_every=0.05) as gw:
                for step in range(3000):
                    x, y = global_batch(step % NAN_STEP if step < 100 else NAN_STEP)  # NaN on rank 1 from 100
                    opt.zero_grad()
                    loss = nn.functional.mse_loss(model(_local(x, rank)), _local(y, rank))
                    loss.backward()
                    opt.step()
                    gw.step(loss)
        except gradwatch.GradwatchHalt as e:
            stopped_at, message = gw.global_step, str(e)
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump({"stopped_at": stopped_at, "message": message}, f)
    finally:
        dist.destroy_process_group()


def test_halt_on_stops_every_rank_at_the_same_step(tmp_path):
    """A critical finding reaches rank 0's live detectors only; the next flush tells every rank, and all
    raise GradwatchHalt after the same step, so none is left waiting in a collective."""
    ranks = _spawn(_halt_worker, tmp_path)
    stops = [r["stopped_at"] for r in ranks]
    assert stops[0] is not None and stops[0] == stops[1] and 100 < stops[0] < 3000, stops
    assert "rank 0 found a problem" in ranks[1]["message"]
    run = gradwatch.load_run(tmp_path / "run")
    assert run.meta["status"] == "crashed"
    assert run.events.iloc[0]["rank"] == 1
