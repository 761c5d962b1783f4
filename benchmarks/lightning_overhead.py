"""Per-step time overhead of gradwatch's Lightning `GradWatchCallback` over a plain `Trainer.fit`.

    python benchmarks/lightning_overhead.py            # full run, ~2-3 min on 2 CPU cores
    python benchmarks/lightning_overhead.py --quick    # smoke run, < 1 min
    python benchmarks/lightning_overhead.py --markdown out.md --json out.json

Method: like `overhead.py`, every row trains its own copy of the same model on the same batches,
and short blocks of steps are interleaved in one process, each callback block paired with a
plain-Trainer block next to it (see `_harness`). `Trainer.fit` owns its loop, so each row's fit
runs in a thread of its own, fed by an iterable dataset that blocks on a per-trainer gate every
`block` batches. The main thread opens one trainer's gate, waits until that trainer asks for its
next block, then opens the next one: only one trainer runs at a time, and a block is timed from
the gate opening to the next request. Lightning prefetches one batch, so a block covers steps
j-1 .. j+block-2 rather than j .. j+block-1; every block still holds `block` optimizer steps.

Reported: median paired ratio - 1 with its IQR and a bootstrap 95% CI, and the amortized ratio
(sum of times), which sees the work gradwatch does only every `flush_every` seconds. The
plain-Trainer row is an A/A check (each of its blocks against the previous one): its CI is the
resolution of the run. Only time is measured; `overhead.py` has the memory table.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers sit next to this script

import _report  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _harness import CompetingLoad, run_interleaved, warm_up_and_size_block  # noqa: E402
from _workloads import WORKLOADS, Workload  # noqa: E402

BLOCK_TARGET_S = 0.1  # a baseline block's length when --block is 0; see overhead.py
JOIN_TIMEOUT_S = 60.0
TRAINER_ARGS = dict(accelerator="cpu", devices=1, max_epochs=1, max_steps=10**9, enable_progress_bar=False,
                    logger=False, enable_checkpointing=False, enable_model_summary=False)


def _watch_defaults(run_dir: Path):
    from gradwatch.integrations.lightning import GradWatchCallback

    return GradWatchCallback(run_dir=run_dir)


def _watch_grads(run_dir: Path):
    import gradwatch
    from gradwatch.integrations.lightning import GradWatchCallback

    return GradWatchCallback(run_dir=run_dir, config=gradwatch.WatchConfig.grad_norms_only())


# name -> (note, callback factory); the plain Trainer ("baseline") is always run.
ROWS = {
    # Two trainers are two threads, two models and two loaders: this row measures what that alone costs.
    "plain-2": ("a second plain Trainer.fit: the control for the bias between two trainers", lambda run_dir: None),
    "gradwatch": ("GradWatchCallback() defaults", _watch_defaults),
    "gradwatch-grads": ("GradWatchCallback(config=WatchConfig.grad_norms_only())", _watch_grads),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _report.add_common_args(p, rounds=200, block_target_s=BLOCK_TARGET_S, workloads=["mlp", "transformer"],
                            quick_help="smoke run: 3 rounds of 2-step blocks", per="trainer", baseline="plain-Trainer")
    p.add_argument("--configs", nargs="+", choices=list(ROWS), default=["plain-2", "gradwatch"],
                   help="rows besides the plain Trainer (default: plain-2 gradwatch)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    return _report.parse_checked(p, argv, quick={"rounds": 3, "block": 2, "warmup": 3})


class _Gate:
    """Lets one trainer thread run `n` batches at a time; it waits in its data iterator in between."""

    def __init__(self) -> None:
        self._go, self._asked = threading.Semaphore(0), threading.Semaphore(0)
        self.n, self.error = 0, None

    def next_grant(self) -> int:
        """Trainer side: ask for the next block and wait for it; 0 means stop."""
        self._asked.release()
        self._go.acquire()
        return self.n

    def wait_request(self) -> None:
        """Main side: wait until the trainer asks again (or died, which also signals)."""
        self._asked.acquire()
        if self.error is not None:
            raise RuntimeError(f"the trainer thread failed: {self.error!r}") from self.error

    def grant(self, n: int) -> None:
        """Main side: let the trainer run `n` batches and wait until it asks for more."""
        self.n = n
        self._go.release()
        self.wait_request()

    def died(self, error: BaseException | None) -> None:
        self.error = error
        self._asked.release()  # so the main thread never waits for a thread that is gone


class _GatedBatches(torch.utils.data.IterableDataset):
    """The workload's batches, cyclically, `gate` permitting; ends when the gate grants 0."""

    def __init__(self, batches: list, gate: _Gate) -> None:
        self.batches, self.gate = batches, gate

    def __iter__(self):
        i = 0
        while n := self.gate.next_grant():
            for _ in range(n):
                yield self.batches[i % len(self.batches)]
                i += 1


def _module(workload: Workload):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            # Deepcopy per trainer: identical starting weights, and no callback's hooks leak across rows.
            self.net = copy.deepcopy(workload.model)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return workload.loss_fn(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=workload.lr)

    return Module()


class _Row:
    """What `_harness.warm_up_and_size_block` calls `config`: its `end_block` settles the callback's deferred
    writes inside the timed block, as `_configs.Gradwatch.end_block` does."""

    def __init__(self, callback) -> None:
        self.callback = callback

    def end_block(self) -> None:
        watcher = getattr(self.callback, "watcher", None)
        if watcher is not None:
            watcher._wait_written()  # the trainer thread is parked in its gate, so this is race-free


class TrainerSession:
    """One row's `Trainer.fit`, running in its own thread, `steps(n)` batches at a time."""

    def __init__(self, name: str, workload: Workload, callback, root: Path) -> None:
        import lightning.pytorch as pl

        self.name, self.gate, self.config = name, _Gate(), _Row(callback)
        loader = torch.utils.data.DataLoader(_GatedBatches(workload.batches, self.gate), batch_size=None)
        trainer = pl.Trainer(callbacks=[callback] if callback else [], default_root_dir=root, **TRAINER_ARGS)
        self.thread = threading.Thread(target=self._fit, args=(trainer, _module(workload), loader),
                                       name=f"fit-{name}", daemon=True)
        self.thread.start()
        self.gate.wait_request()  # setup done: the first batch is asked for

    def _fit(self, trainer, module, loader) -> None:
        error = None
        try:
            trainer.fit(module, train_dataloaders=loader)
        except BaseException as e:  # reported by the main thread, which would otherwise wait forever
            error = e
        self.gate.died(error)

    def steps(self, n: int) -> None:
        self.gate.grant(n)

    def close(self) -> str | None:
        """End the epoch (fit then runs on_fit_end, which closes gradwatch's run) and join; what went
        wrong, if anything."""
        self.gate.n = 0
        self.gate._go.release()
        self.thread.join(JOIN_TIMEOUT_S)
        if self.thread.is_alive():
            return f"trainer {self.name} did not stop within {JOIN_TIMEOUT_S:.0f} s"
        if self.gate.error is not None:
            return f"trainer {self.name} failed: {self.gate.error!r}"
        return None


def bench_workload(wname: str, rows: list[str], args: argparse.Namespace, rng: np.random.Generator) -> dict:
    workload = WORKLOADS[wname]()
    sessions: dict[str, TrainerSession] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in ["baseline", *rows]:
                callback = None if name == "baseline" else ROWS[name][1](Path(tmp) / name)
                sessions[name] = TrainerSession(name, workload, callback, Path(tmp) / f"root-{name}")
            block = warm_up_and_size_block(sessions, args.warmup, args.block, BLOCK_TARGET_S, lambda: None)
            load = CompetingLoad()
            timings = run_interleaved(sessions, args.rounds, block, lambda: None, rng, wname)
            others_share = load.share()
        finally:
            failures = [f for s in sessions.values() if (f := s.close())]
        if not failures:  # the callback really recorded: every timed step is in its store
            import gradwatch
            for name in (r for r in rows if r != "plain-2"):
                recorded = len(gradwatch.load_run(Path(tmp) / name).steps)
                print(f"  {wname} {name}: {recorded} steps recorded", file=sys.stderr)
                if recorded < args.rounds * block:
                    failures.append(f"{name} recorded {recorded} steps, fewer than the {args.rounds * block} timed")
    if failures:
        raise RuntimeError("; ".join(failures))
    return _report.workload_result(wname, workload.description, block, args.rounds, others_share, timings, rng)


def caption(info: dict) -> str:
    return (f"Overhead per Lightning `Trainer.fit` step, cpu, torch {info['torch']}, Lightning "
            f"{info['lightning']}, {info['torch_threads']} threads ({info['cpu_count']} CPUs). Median of "
            "paired block ratios vs. a plain `Trainer` [bootstrap 95% CI]; amortized = total time ratio.")


def quiet_lightning() -> None:
    """Lightning's banner lines and its data-loader advice would bury the table."""
    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import: set ours after)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch 2.13, harmless


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import gradwatch.integrations.lightning  # noqa: F401  (fail here, not inside a trainer thread)
    except ImportError as e:
        sys.exit(f"this benchmark needs Lightning and gradwatch: {e}")
    torch.set_num_threads(args.threads)
    quiet_lightning()
    import lightning

    info = _report.machine_info({"lightning": lightning.__version__}, torch_threads=torch.get_num_threads())
    print("gradwatch Lightning overhead benchmark")
    print("  " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print("rows (each its own Trainer, run in its own thread, one at a time):")
    print(f"  {'baseline':<18}plain Trainer.fit, {', '.join(f'{k}={v}' for k, v in TRAINER_ARGS.items())}")
    for name in args.configs:
        print(f"  {name:<18}{ROWS[name][0]}")
    rng = np.random.default_rng(args.seed)
    results = []
    for w in args.workloads:
        t0 = time.perf_counter()
        results.append(bench_workload(w, args.configs, args, rng))
        results[-1]["elapsed_s"] = time.perf_counter() - t0
    for res in results:
        _report.print_time_table(res, label_width=22, baseline_label="plain Trainer (A/A)",
                                 baseline_blocks="plain-Trainer")
    md = _report.markdown(caption(info), results,
                          row_label=lambda name: "plain Trainer" if name == "baseline" else f"Trainer + {name}")
    _report.write_outputs(args, md, {"machine": info, "args": vars(args), "trainer_args": TRAINER_ARGS,
                                     "configs": {n: ROWS[n][0] for n in args.configs}, "results": results})


if __name__ == "__main__":
    main()
