"""Training-mode bookkeeping: eval() forwards are flagged, checkpoint recomputation is not counted twice."""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradwatch


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))


def test_eval_mode_forwards_are_flagged_per_step(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "r") as gw:
        for step in range(6):
            model.train(step < 3)  # steps 3-5 train with the model left in eval()
            loss = model(torch.randn(8, 6)).pow(2).mean()
            with torch.no_grad():  # a validation pass in eval() mode is not a training forward
                model.eval()
                model(torch.randn(8, 6))
                model.train(step < 3)
            opt.zero_grad()
            loss.backward()
            opt.step()
            gw.step(loss)
    assert gradwatch.load_run(tmp_path / "r").steps["eval_mode"].tolist() == [False] * 3 + [True] * 3


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _mlp()

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=False)


def test_checkpoint_recomputation_is_not_counted(tmp_path):
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xs = [torch.randn(32, 6) for _ in range(4)]
    expected = []
    with gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "r") as gw:
        for x in xs:
            with torch.no_grad():
                h = model.inner[1](model.inner[0](x))
            expected.append((h <= 0).float().mean().item())
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            gw.step(loss)
    run = gradwatch.load_run(tmp_path / "r")
    # Recomputation in backward would have shown up as a second call site, "inner.1#2".
    assert run.series.query("kind == 'activation'")["name"].tolist() == ["inner.1"]
    zero = run.wide("zero_fraction")["inner.1"].tolist()
    for got, want in zip(zero, expected):
        assert abs(got - want) < 1e-6
    assert run.events.empty
