"""A failure inside gradwatch never reaches the user's training: it warns once and training goes on."""
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import stats


def _train(model, gw, steps=6):
    opt = gw._optimizers[0]
    losses = []
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        gw.step(loss)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("broken", ["unit_max", "norms", "finite_probe"])
def test_internal_error_warns_once_and_training_goes_on(tmp_path, monkeypatch, broken):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    reference = [p.detach().clone() for p in model.parameters()]

    def boom(*args, **kwargs):
        raise RuntimeError(f"{broken} exploded")

    monkeypatch.setattr(stats, broken, boom)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run")
        _train(model, gw)
        gw.close()
    ours = [w for w in caught if issubclass(w.category, gradwatch.GradwatchWarning)]
    assert len(ours) == 1
    assert f"{broken} exploded" in str(ours[0].message)
    assert any(not torch.equal(a, b) for a, b in zip(reference, model.parameters()))  # it trained
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_broken_step_keeps_counting_steps(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    gw = gradwatch.watch(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "r")
    calls = {"n": 0}
    real = gw._rec.finish_step

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("flaky")
        return real(*args, **kwargs)

    monkeypatch.setattr(gw._rec, "finish_step", flaky)
    with pytest.warns(gradwatch.GradwatchWarning, match="flaky"):
        _train(model, gw, steps=5)
    gw.close()
    assert gradwatch.load_run(tmp_path / "r").steps["step"].tolist() == [0, 1, 3, 4]


def test_an_internal_error_does_not_hide_a_store_failure(tmp_path, monkeypatch):
    """Each kind of failure warns once: an early internal error must not silence a later disk-full."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    monkeypatch.setattr(stats, "unit_max", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("unit_max broke")))
    gw = gradwatch.watch(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "r")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, gw, steps=3)
        gw._writer.error = OSError(28, "No space left on device")  # what the writer thread records
        _train(model, gw, steps=3)
        gw.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, gradwatch.GradwatchWarning)]
    assert len(messages) == 2
    assert "unit_max broke" in messages[0] and "No space left on device" in messages[1]
