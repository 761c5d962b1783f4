"""The update ratio's memory: one copy of the weights it measures, never more than `update_memory_mb`.

The reference is the allocator itself: torch.profiler's memory events during `optimizer.step()`, summed in
time order into the peak of bytes held beyond those held when the step began. Plain SGD without momentum
allocates nothing in its step, so everything above zero is gradwatch's.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import gradwatch


def _peak_bytes_in(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def _train_step(model: nn.Module, opt) -> tuple[torch.Tensor, int]:
    loss = model(torch.randn(8, model[0].in_features)).square().mean()
    opt.zero_grad()
    loss.backward()
    return loss, _peak_bytes_in(opt.step)


def _weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_the_ratio_holds_one_copy_of_the_weights(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, plain = _train_step(model, opt)
    assert plain == 0  # the reference: this optimizer step allocates nothing of its own
    with gradwatch.watch(model, opt, run_dir=tmp_path / "r", detect_every=0, detail_every=1) as gw:
        loss, peak = _train_step(model, opt)
        gw.step(loss)
    weights = _weight_bytes(model)
    # The copy, and not also the difference next to it (a second weight-sized allocation).
    assert weights <= peak <= weights + 64 * 1024, (peak, weights)
    ratios = gradwatch.load_run(tmp_path / "r").layers.query("metric == 'update_ratio'")
    assert set(ratios.layer) == {"0", "2"}


def test_a_model_past_update_memory_mb_is_measured_in_turns_within_the_budget(tmp_path):
    torch.manual_seed(0)
    layers = [nn.Linear(384, 384) for _ in range(6)]  # 578 KiB each: one layer per 1 MiB group
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    budget = 1 << 20
    peaks = []
    with gradwatch.watch(model, opt, run_dir=tmp_path / "r", detect_every=0, detail_every=1,
                         update_memory_mb=1) as gw:
        for _ in range(2 * len(layers)):
            loss, peak = _train_step(model, opt)
            peaks.append(peak)
            gw.step(loss)
    assert _weight_bytes(model) > 3 * budget
    assert 0 < max(peaks) <= budget, peaks
    ratios = gradwatch.load_run(tmp_path / "r").layers.query("metric == 'update_ratio'")
    assert set(ratios.layer) == {str(i) for i in range(len(layers))}  # every layer has its turn
    assert ratios.groupby("layer").size().min() >= 2
