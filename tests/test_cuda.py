"""CUDA-only checks: the step path between flushes never syncs the host, and the numbers stay right.

Skipped without a GPU. Run on a GPU machine with `python -m pytest -q tests/test_cuda.py`.
"""
import pytest
import torch
from torch import nn

import gradwatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)).cuda()


def _step(model, opt, gw, x, y, scaler=None):
    with torch.autocast("cuda", dtype=torch.float16, enabled=scaler is not None):
        loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=False)
    if scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    gw.step(loss)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "fp16-scaler"])
def test_steps_between_flushes_never_sync(tmp_path, amp):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    x = torch.randn(256, 64, device="cuda")
    y = torch.randint(0, 10, (256,), device="cuda")
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", scaler=scaler, flush_every=1.0,
                         detail_every=5)
    for _ in range(5):  # warm-up: index tensors and caches are built here
        _step(model, opt, gw, x, y, scaler)
    gw.flush()
    torch.cuda.synchronize()
    gw._last_flush = float("inf")  # no time-based flush inside the checked window
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            _step(model, opt, gw, x, y, scaler)
        gw._flush()  # the flush itself copies asynchronously too
    finally:
        torch.cuda.set_sync_debug_mode(0)
    gw.close()
    run = gradwatch.load_run(tmp_path / "run")
    assert len(run.steps) == 25
    assert run.layers.query("metric == 'grad_norm'").groupby("layer", observed=True).size().min() == 25


def test_grad_norms_match_reference_on_cuda(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(128, 64, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    ref = []
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run") as gw:
        for _ in range(8):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            ref.append({name: torch.linalg.vector_norm(
                torch.cat([p.grad.flatten() for p in m.parameters(recurse=False)])).item()
                for name, m in model.named_modules() if list(m.parameters(recurse=False))})
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            opt.step()
            gw.step(loss)
    wide = gradwatch.load_run(tmp_path / "run").wide("grad_norm")
    for step, expected in enumerate(ref):
        for name, value in expected.items():
            assert wide.loc[step, name] == pytest.approx(value, rel=1e-4)
