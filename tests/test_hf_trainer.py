"""GradWatchCallback against a real `transformers.Trainer` on a tiny Bert built from a config (no downloads).

The reference for the grad norms is independent of gradwatch's hooks: a Trainer subclass reads every
`p.grad` in `_clip_grad_norm`, the one place where HF's grads are accumulated, unscaled and not yet clipped.
"""
from __future__ import annotations

import math
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import gradwatch  # noqa: E402
from gradwatch.integrations.transformers import GradWatchCallback  # noqa: E402

NAN_STEP = 3  # HF global_step (1-based) whose loss is planted NaN


def _config() -> BertConfig:
    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64)


class _NanLossBert(BertForSequenceClassification):
    """Adds NaN to the loss of the NAN_STEP-th optimizer step: the loss is NaN, the grads stay finite."""

    optimizer_step = 0  # set by _StepCounter

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.training and self.optimizer_step == NAN_STEP - 1:
            out.loss = out.loss + float("nan")  # d(loss + c)/dw = dloss/dw: backward is unaffected
        return out


class _StepCounter(TrainerCallback):
    def __init__(self, model):
        self.model = model

    def on_step_begin(self, args, state, control, **kwargs):
        self.model.optimizer_step = state.global_step


class _RefTrainer(Trainer):
    """Keeps, per optimizer step, every layer's L2 grad norm read straight from `p.grad` before clipping."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.ref: list[dict[str, float]] = []

    def _clip_grad_norm(self, model):
        norms = {}
        for name, mod in self.model.named_modules():
            grads = [p.grad for p in mod.parameters(recurse=False) if p.grad is not None]
            if grads:
                norms[name] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        self.ref.append(norms)
        return super()._clip_grad_norm(model)


def _dataset(n: int = 64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, 12), generator=g)
    labels = (ids[:, 0] % 2).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def _hook_counts(model) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] + [
        len(p._post_accumulate_grad_hooks or {}) if hasattr(p, "_post_accumulate_grad_hooks") else 0
        for p in model.parameters()]


def _train(tmp_path, steps=4, accum=1, model_cls=BertForSequenceClassification):
    torch.manual_seed(0)
    model = model_cls(_config())
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=steps, per_device_train_batch_size=8,
                             gradient_accumulation_steps=accum, report_to=[], save_strategy="no",
                             logging_steps=1, use_cpu=True, max_grad_norm=0.01, disable_tqdm=True,
                             remove_unused_columns=False)  # the NaN subclass hides forward's signature
    run_dir = tmp_path / "run"
    cb = GradWatchCallback(run_dir=run_dir, detect_every=0)
    callbacks = [cb] + ([_StepCounter(model)] if model_cls is _NanLossBert else [])
    trainer = _RefTrainer(model=model, args=args, train_dataset=_dataset(), callbacks=callbacks)
    before = _hook_counts(model)
    trainer.train()
    assert _hook_counts(model) == before, "the callback left hooks behind after on_train_end"
    return trainer, gradwatch.load_run(run_dir)


@pytest.mark.parametrize("accum", [1, 2])
def test_one_row_per_optimizer_step_and_pre_clip_norms(tmp_path, accum):
    trainer, run = _train(tmp_path, steps=4, accum=accum)
    assert len(run.steps) == 4 == len(trainer.ref)
    assert run.meta["status"] == "finished"
    gn = run.layers[run.layers.metric == "grad_norm"]
    got = defaultdict(dict)
    for step, layer, value in zip(gn["step"], gn["layer"].astype(str), gn["value"]):
        got[int(step)][layer] = value
    assert sorted(got) == [0, 1, 2, 3]
    for step, ref in enumerate(trainer.ref):
        assert set(got[step]) == set(ref)
        names = sorted(ref)
        np.testing.assert_allclose([got[step][n] for n in names], [ref[n] for n in names], rtol=1e-4,
                                   err_msg=f"step {step}")
    # clipping really was active: the pre-clip total is far above max_grad_norm
    assert (run.steps["grad_norm"] > 0.01 * 10).all()
    assert np.isfinite(run.steps["loss"]).all()


def test_nan_loss_is_recorded_although_hf_logs_filter_it(tmp_path):
    trainer, run = _train(tmp_path, steps=5, model_cls=_NanLossBert)
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert math.isfinite(logged[NAN_STEP])  # HF's logging_nan_inf_filter hid it
    losses = run.steps.set_index("step")["loss"]
    assert math.isnan(losses[NAN_STEP - 1])
    assert np.isfinite(losses.drop(NAN_STEP - 1)).all()
    assert run.meta["status"] == "finished"


def test_callback_rejects_model_and_optimizer_options():
    with pytest.raises(TypeError, match="model="):
        GradWatchCallback(run_dir="x", model=object())


def test_core_gradwatch_never_loads_transformers():
    code = "import gradwatch, gradwatch.watcher, gradwatch.integrations\nimport sys; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "transformers" not in loaded and "accelerate" not in loaded


def test_missing_transformers_names_the_extra():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import gradwatch.integrations.transformers\n"
            "except ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "gradwatch[hf]"' in out.stdout


def test_ddp_on_two_cpu_processes_merges_into_the_main_process_store(tmp_path):
    """torchrun, 2 processes on gloo: one store, written by the main process, with one row per step and
    the all-reduced pre-clip norms that HF's `_clip_grad_norm` sees on each rank."""
    import json
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "hf_ddp.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "run"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world"] == 2
    run = gradwatch.load_run(tmp_path / "run")
    assert run.meta["distributed"] == {"world_size": 2, "merged": True, "sharded": False}
    assert len(run.steps) == 4 == len(ranks[0]["ref"])
    gn = run.layers[run.layers.metric == "grad_norm"]
    for step, ref in enumerate(ranks[0]["ref"]):
        assert ref == pytest.approx(ranks[1]["ref"][step], rel=1e-6)  # DDP: the same gradients everywhere
        got = dict(zip(gn.loc[gn.step == step, "layer"].astype(str), gn.loc[gn.step == step, "value"]))
        assert set(got) == set(ref)
        names = sorted(ref)
        np.testing.assert_allclose([got[n] for n in names], [ref[n] for n in names], rtol=1e-4)
