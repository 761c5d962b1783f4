"""Mixed precision on CPU through the Lightning and Hugging Face callbacks and a plain GradScaler loop.

Every reference is taken outside gradwatch: Lightning's own `on_before_optimizer_step` (after accumulation
and unscaling, before clipping), HF's `_clip_grad_norm` (the same state), and in the plain loop the scaled
`.grad` divided by the scaler's scale. A step is skipped when the GradScaler lowered its scale.

Found on this stack (Lightning 2.6, transformers 5.24 with accelerate, torch 2.13):
  - `Trainer(precision="16-mixed", accelerator="cpu")` warns and runs bf16-mixed, without a GradScaler. The
    fp16 path runs on CPU only with an explicit `plugins=[MixedPrecision("16-mixed", "cpu")]`.
  - HF `TrainingArguments(fp16=True, use_cpu=True)`: accelerate turns neither autocast nor a GradScaler on
    for fp16 on CPU, so the run is float32 and gradwatch records no loss scale.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from _models import assert_table_close, layer_grad_norms, metric_table, naive_layers
from torch import nn

import gradwatch
from gradwatch.detect.amp_overflow import SEARCH

HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "accelerate"))
needs_lightning = pytest.mark.skipif(not HAS_LIGHTNING, reason='needs Lightning: pip install "gradwatch[lightning]"')
needs_hf = pytest.mark.skipif(not HAS_HF, reason='needs transformers and accelerate: pip install "gradwatch[hf]"')
CLIP = 1e-3  # far below every gradient norm here, so a post-clip reading could not pass


def _inf_as_recorded(table: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """The README's convention: a layer whose gradient holds NaN or Inf has grad_norm inf."""
    return {s: {k: v if math.isfinite(v) else math.inf for k, v in row.items()} for s, row in table.items()}


# ---- Lightning ------------------------------------------------------------------------------------
if HAS_LIGHTNING:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import MixedPrecision

    from gradwatch.integrations.lightning import GradWatchCallback as LightningCallback

    class AmpTiny(pl.LightningModule):
        """Keeps, per optimizer step, the naive norms and the loss scale seen in `on_before_optimizer_step`,
        the scale after the step, and the dtype autocast gave the first layer's output."""

        def __init__(self, inf_at: tuple[int, ...] = ()):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
            self.inf_at = set(inf_at)
            self.ref: dict[int, dict[str, float]] = {}
            self.scale_before: list[float | None] = []
            self.scale_after: list[float | None] = []
            self.dtypes: set[torch.dtype] = set()
            self.net[0].weight.register_hook(self._plant_inf)

        def _plant_inf(self, grad):
            return grad + float("inf") if self.global_step in self.inf_at else grad

        def _scale(self) -> float | None:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            return None if scaler is None else scaler.get_scale()

        def training_step(self, batch, batch_idx):
            x, y = batch
            hidden = self.net[0](x)
            self.dtypes.add(hidden.dtype)
            return nn.functional.cross_entropy(self.net[2](self.net[1](hidden)), y)

        def on_before_optimizer_step(self, optimizer):
            self.ref[self.global_step] = layer_grad_norms(naive_layers(self))
            self.scale_before.append(self._scale())

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if len(self.scale_after) < len(self.scale_before):  # the last micro-batch of an optimizer step
                self.scale_after.append(self._scale())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(run_dir, model: AmpTiny, max_steps: int = 6, **trainer_kw):
    torch.manual_seed(0)
    x, y = torch.randn(96, 8), torch.randint(0, 2, (96,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LightningCallback(run_dir=run_dir, detect_every=0)], **trainer_kw)
    trainer.fit(model, loader)
    return trainer, gradwatch.load_run(run_dir)


@needs_lightning
def test_lightning_bf16_mixed_preclip_accumulated_norms(tmp_path):
    torch.manual_seed(0)
    model = AmpTiny()
    trainer, run = _fit(tmp_path / "run", model, precision="bf16-mixed", accumulate_grad_batches=2,
                        gradient_clip_val=CLIP)
    assert model.dtypes == {torch.bfloat16}  # autocast really ran
    assert trainer.precision_plugin.scaler is None
    assert run.steps["step"].tolist() == list(range(6)) == sorted(model.ref)
    assert_table_close(metric_table(run, "grad_norm"), model.ref, rtol=1e-5, what="grad_norm")
    assert min(run.steps["grad_norm"]) > 10 * CLIP
    assert not run.steps["skipped"].any()
    assert run.steps["loss_scale"].isna().all()
    assert run.meta["scaler"] is None


@needs_lightning
def test_lightning_16_mixed_flag_on_cpu_runs_bf16_without_scaler(tmp_path):
    torch.manual_seed(0)
    model = AmpTiny()
    with pytest.warns(Warning, match="AMP with fp16 is not supported on CPU. Using `precision='bf16-mixed'`"):
        trainer, run = _fit(tmp_path / "run", model, max_steps=2, precision="16-mixed")
    assert trainer.precision_plugin.precision == "bf16-mixed"
    assert trainer.precision_plugin.scaler is None
    assert model.dtypes == {torch.bfloat16}
    assert run.meta["scaler"] is None
    assert run.steps["loss_scale"].isna().all()
    assert_table_close(metric_table(run, "grad_norm"), model.ref, rtol=1e-5, what="grad_norm")


@needs_lightning
def test_lightning_fp16_plugin_unscaled_norms_and_skipped_steps(tmp_path):
    """fp16 autocast with a real GradScaler on CPU, through an explicit MixedPrecision plugin."""
    torch.manual_seed(0)
    bad = (2, 3)
    model = AmpTiny(inf_at=bad)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    trainer, run = _fit(tmp_path / "run", model, plugins=[plugin])
    assert model.dtypes == {torch.float16}
    assert trainer.precision_plugin.scaler is plugin.scaler
    assert run.meta["scaler"] == {"class": "GradScaler", "enabled": True}

    skipped = [after < before for before, after in zip(model.scale_before, model.scale_after)]
    assert skipped == [s in bad for s in range(6)]  # the scaler skipped exactly the planted steps
    assert run.steps["step"].tolist() == list(range(6))  # one row per optimizer step, skipped ones too
    assert run.steps["skipped"].tolist() == skipped
    np.testing.assert_allclose(run.steps["loss_scale"].to_numpy(), model.scale_before, rtol=0)
    assert model.scale_before[0] == 2.0**10 and min(model.scale_before) == 2.0**8
    # The reference is read after Lightning's unscale_, so equal numbers mean gradwatch's are unscaled.
    ref = _inf_as_recorded(model.ref)
    assert all(ref[s]["net.0"] == math.inf for s in bad)
    assert_table_close(metric_table(run, "grad_norm"), ref, rtol=1e-5, what="grad_norm")
    assert max(row["net.2"] for row in model.ref.values()) < 10  # scaled by 2**10 it would be about 300


# ---- Hugging Face Trainer -------------------------------------------------------------------------
if HAS_HF:
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from gradwatch.integrations.transformers import GradWatchCallback as HFCallback

    class _PreClipTrainer(Trainer):
        """Keeps, per optimizer step, the naive layer norms read from `p.grad` before HF clips them."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.ref: dict[int, dict[str, float]] = {}

        def _clip_grad_norm(self, model):
            self.ref[len(self.ref)] = layer_grad_norms(naive_layers(self.model))
            return super()._clip_grad_norm(model)


def _hf_train(tmp_path, **precision):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    dtypes: set[torch.dtype] = set()
    model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (64, 12), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids[i, 0] % 2}
            for i in range(64)]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                             max_grad_norm=CLIP, disable_tqdm=True, **precision)
    trainer = _PreClipTrainer(model=model, args=args, train_dataset=data,
                              callbacks=[HFCallback(run_dir=tmp_path / "run", detect_every=0)])
    trainer.train()
    return trainer, gradwatch.load_run(tmp_path / "run"), dtypes


@needs_hf
def test_hf_bf16_on_cpu_preclip_norms_one_row_per_step(tmp_path):
    trainer, run, dtypes = _hf_train(tmp_path, bf16=True)
    assert dtypes == {torch.bfloat16}  # accelerate's autocast really ran
    assert run.steps["step"].tolist() == list(range(4)) == sorted(trainer.ref)
    assert_table_close(metric_table(run, "grad_norm"), trainer.ref, rtol=1e-5, what="grad_norm")
    assert min(run.steps["grad_norm"]) > 10 * CLIP  # HF's clip bound, and the norms are from before it
    assert run.meta["scaler"] is None
    assert run.steps["loss_scale"].isna().all()
    assert np.isfinite(run.steps["loss"]).all()
    assert run.meta["status"] == "finished"


@needs_hf
def test_hf_fp16_on_cpu_is_float32_without_scaler(tmp_path):
    trainer, run, dtypes = _hf_train(tmp_path, fp16=True)
    assert trainer.accelerator.mixed_precision == "fp16"
    assert trainer.accelerator.scaler is None and dtypes == {torch.float32}
    assert run.meta["scaler"] is None
    assert run.steps["loss_scale"].isna().all()
    assert_table_close(metric_table(run, "grad_norm"), trainer.ref, rtol=1e-5, what="grad_norm")


# ---- plain loop: the scaler's search, then a streak of overflows ----------------------------------
STREAK = range(30, 40)  # steps whose first-layer gradient is made Inf: ten skips in a row


def test_grad_scaler_search_is_quiet_and_a_skip_streak_is_amp_overflow(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    layers = naive_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # 2**24 overflows fp16 in backward: the scaler halves it, skipping steps, until the gradients fit.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)
    run_dir = tmp_path / "run"
    gw = gradwatch.watch(model, optimizer=opt, run_dir=run_dir, scaler=scaler, detect_every=0)
    x = torch.randn(512, 16)
    y = x[:, :4].argmax(1)
    scales, skipped, ref = [], [], {}
    model[0].weight.register_hook(lambda g: g + float("inf") if len(scales) in STREAK else g)
    for step in range(50):
        idx = torch.randint(0, 512, (32,))
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        scaler.scale(loss).backward()
        ref[step] = layer_grad_norms(layers, scaler.get_scale())
        scales.append(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < scales[-1])
        gw.step(loss)
        if step == STREAK[0] - 1:
            gw.flush()
            early = gradwatch.diagnose(run_dir)
    gw.close()

    search = skipped.index(False)
    assert 1 <= search < SEARCH and all(skipped[:search])  # the scaler's search, within the detector's allowance
    assert [s for s in range(50) if skipped[s]][search:] == list(STREAK)
    run = gradwatch.load_run(run_dir)
    assert run.steps["skipped"].tolist() == skipped
    np.testing.assert_allclose(run.steps["loss_scale"].to_numpy(), scales, rtol=0)
    assert_table_close(metric_table(run, "grad_norm"), _inf_as_recorded(ref), rtol=1e-5, what="grad_norm")
    assert np.isfinite(run.steps["loss"]).all()
    # gradwatch saw the overflows (events in the backward pass) and judged them the scaler's business
    assert {0, STREAK[0]} <= set(run.events["step"]) and set(run.events["phase"]) == {"backward"}

    assert not [f for f in early.findings if f.kind in ("nan_inf", "exploding_gradients", "amp_overflow")]
    report = gradwatch.diagnose(run_dir)
    assert not [f for f in report.findings if f.kind in ("nan_inf", "exploding_gradients")]
    (amp,) = [f for f in report.findings if f.kind == "amp_overflow"]
    late = 50 - SEARCH
    assert (amp.layer, amp.step, amp.severity) == ("", STREAK[0], "warning")
    assert amp.evidence == {"skipped_share": pytest.approx(len(STREAK) / late), "longest_run": len(STREAK),
                            "min_loss_scale": min(scales)}
    assert f"up to {len(STREAK)} in a row, starting at step {STREAK[0]}" in amp.message
    assert f"skipped {round(100 * len(STREAK) / late)}%" in amp.message


def test_disabled_grad_scaler_is_no_scaler_to_the_detectors(tmp_path):
    """`GradScaler(enabled=use_fp16)` is the usual idiom; with it disabled, a loop that skips the update when
    the gradient norm is not finite must read as a loop without a scaler."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gw = gradwatch.watch(model, optimizer=opt, run_dir=tmp_path / "run", scaler=scaler, detect_every=0)
    steps: list[int] = []
    model[0].weight.register_hook(lambda g: g + float("inf") if len(steps) in STREAK else g)
    x = torch.randn(512, 16)
    y = x[:, :4].argmax(1)
    for step in range(50):
        idx = torch.randint(0, 512, (32,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        scaler.scale(loss).backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)):
            opt.step()  # the loop's own guard, not the scaler's
        steps.append(step)
        gw.step(loss)
    gw.close()
    assert gradwatch.load_run(tmp_path / "run").steps["skipped"].tolist() == [s in STREAK for s in range(50)]
    kinds = [(f.kind, f.layer, f.step) for f in gradwatch.diagnose(tmp_path / "run").findings]
    assert kinds == [("nan_inf", "0", STREAK[0])]  # as with scaler=None
