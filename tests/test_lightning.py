"""GradWatchCallback in a real Lightning Trainer, checked against norms taken in Lightning's own hook."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from _models import assert_table_close, layer_grad_norms, metric_table, naive_layers  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.integrations.lightning import GradWatchCallback  # noqa: E402

CLIP = 1e-3  # small enough that Lightning's clipping changes every step's gradients


class Tiny(pl.LightningModule):
    """A 2-layer MLP that keeps, per optimizer step, the naive per-layer norms and the lr Lightning uses."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.fail_at = fail_at
        self.ref: dict[int, dict[str, float]] = {}
        self.lrs: dict[int, float] = {}
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom in training_step")
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def on_before_optimizer_step(self, optimizer):
        # Lightning: after accumulation (and AMP unscaling), before its gradient clipping
        self.ref[self.global_step] = layer_grad_norms(naive_layers(self))
        self.lrs[self.global_step] = optimizer.param_groups[0]["lr"]

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(run_dir, model: Tiny, max_steps: int = 6, **trainer_kw):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[GradWatchCallback(run_dir=run_dir, detect_every=0)], **trainer_kw)
    trainer.fit(model, loader)
    return gradwatch.load_run(run_dir)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_row_per_optimizer_step_with_preclip_accumulated_norms(tmp_path, accumulate):
    torch.manual_seed(0)
    model = Tiny()
    run = _fit(tmp_path / "run", model, accumulate_grad_batches=accumulate, gradient_clip_val=CLIP)
    assert run.steps["step"].tolist() == list(range(6))
    assert sorted(model.ref) == list(range(6))
    assert_table_close(metric_table(run, "grad_norm"), model.ref, rtol=1e-5, what="grad_norm")
    assert run.meta["status"] == "finished"
    # the last micro-batch's raw loss, not Lightning's loss / k
    last_micro = model.losses[accumulate - 1::accumulate]
    np.testing.assert_allclose(run.steps["loss"].to_numpy(), last_micro, rtol=1e-6)


def test_clipping_is_active_so_preclip_differs_from_clipped(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    run = _fit(tmp_path / "run", model, max_steps=2, gradient_clip_val=CLIP)
    total = np.sqrt(sum(v**2 for v in model.ref[0].values()))
    assert total > 10 * CLIP  # Lightning's clip_grad_norm_ rescaled these gradients
    assert run.steps["grad_norm"].iloc[0] == pytest.approx(total, rel=1e-5)


def test_lr_column_matches_the_optimizer(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    run = _fit(tmp_path / "run", model, max_steps=4)
    expected = [model.lrs[s] for s in range(4)]
    assert expected == [0.1, 0.05, 0.025, 0.0125]
    np.testing.assert_allclose(run.steps["lr"].to_numpy(), expected, rtol=1e-12)


def test_exception_in_training_step_closes_the_run_as_crashed(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path / "run", Tiny(fail_at=3))
    run = gradwatch.load_run(tmp_path / "run")
    assert run.meta["status"] == "crashed"
    assert "boom in training_step" in run.meta["error"]
    assert len(run.steps) == 3


def test_options_reach_watch_and_taken_arguments_are_refused(tmp_path):
    run = _fit(tmp_path / "run", Tiny(), max_steps=4)
    assert len(run.steps) == 4
    cb = GradWatchCallback(run_dir=tmp_path / "other", every=2)
    assert cb.options == {"every": 2}
    with pytest.raises(TypeError, match="optimizer= is taken from the Trainer"):
        GradWatchCallback(run_dir=tmp_path / "x", optimizer=None)


def test_core_gradwatch_never_imports_lightning():
    code = "import sys, gradwatch, gradwatch.watcher; print(' '.join(sys.modules))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())
    assert "torch" in loaded  # gradwatch.watcher really was imported
    assert not {m for m in loaded if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")}


def test_missing_lightning_names_the_extra():
    code = ("import sys\nsys.modules['lightning'] = sys.modules['lightning.pytorch'] = None\n"
            "try:\n    import gradwatch.integrations.lightning\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "gradwatch[lightning]"' in out


def test_ddp_on_two_cpu_processes_merges_into_rank_zeros_store(tmp_path):
    """strategy="ddp", 2 processes on gloo: one store, written by rank 0; norms are the all-reduced ones
    Lightning's own hook sees; the loss is the mean of the two ranks' losses."""
    import json
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "lightning_ddp.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    run = gradwatch.load_run(tmp_path / "run")
    assert run.meta["distributed"] == {"world_size": 2, "merged": True, "sharded": False}
    assert run.steps["step"].tolist() == list(range(6))
    ref = {int(step): norms for step, norms in ranks[0]["ref"].items()}
    assert ranks[1]["ref"] == ranks[0]["ref"]  # DDP: the same gradients on both ranks
    assert_table_close(metric_table(run, "grad_norm"), ref, rtol=1e-5, what="grad_norm")
    np.testing.assert_allclose(run.steps["loss"].to_numpy(), np.mean([r["losses"] for r in ranks], axis=0),
                               rtol=1e-6)


class SoftmaxFirst(Tiny):
    """The classic bug: softmax, then a loss that applies log_softmax again."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(torch.softmax(self.net(x), dim=1), y)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_loss_graph_is_read_before_backward_so_softmax_before_loss_is_found(tmp_path, accumulate):
    torch.manual_seed(0)
    run = _fit(tmp_path / "run", SoftmaxFirst(), max_steps=4, accumulate_grad_batches=accumulate)
    chain = run.meta["loss"]["chain"]
    assert chain[:3] == ["NllLossBackward0", "LogSoftmaxBackward0", "SoftmaxBackward0"], chain
    assert run.meta["loss"]["classes"] == 2
    kinds = [f.kind for f in gradwatch.diagnose(tmp_path / "run").findings]
    assert "softmax_before_loss" in kinds


def test_micro_batches_without_a_root_forward_share_activation_sites(tmp_path):
    """Lightning calls training_step, never the LightningModule's own forward: the second micro-batch's
    ReLU call is the same site as the first one's, not a second call site "net.1#2"."""
    torch.manual_seed(0)
    run = _fit(tmp_path / "run", Tiny(), max_steps=4, accumulate_grad_batches=2)
    names = set(run.layers["layer"].astype(str))
    assert "net.1" in names and not any("#" in name for name in names), names
