"""`watch()` and `Watcher`: the one object that owns every hook handle, the device state and the writer."""
from __future__ import annotations

import atexit
import logging
import numbers
import os
import platform
import socket
import sqlite3
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import __version__, _dist, hooks
from ._describe import describe_loss, describe_optimizer
from ._model import map_model
from .chunk import Chunk, RunLayout
from .config import WatchConfig
from .detect import SEVERITY_RANK
from .errors import GradwatchError, GradwatchHalt, GradwatchWarning
from .live import Monitor, announce
from .recorder import RatioSpec, Recorder
from .store.writer import NullWriter, Rows, Writer, create_store

log = logging.getLogger("gradwatch")
MAX_ROWS_PER_FLUSH = 1000  # bounds the device memory held between flushes on very fast loops
DIST_FIRST_FLUSH = 10  # distributed: recorded steps before the first flush (later ones: rank 0's pick)


class Watcher:
    """Records one model's training into one run store. Create it with `gradwatch.watch()`."""

    def __init__(self, model: nn.Module, optimizers: list, run_dir: Path, config: WatchConfig, scaler,
                 include: list[str] | None, exclude: list[str] | None, on_finding=None, halt_on: str | None = None,
                 dist: _dist.Dist | None = None):
        self.model, self.config, self.run_dir = model, config, run_dir
        self._dist = dist
        # Rank 0 writes; other ranks record only to send their rows to it, or nothing when they cannot.
        self._writes = dist is None or dist.rank == 0
        self._passive = dist is not None and dist.rank != 0 and not dist.merge
        self._on_finding, self._halt_on = on_finding, halt_on
        self._optimizers, self._scaler = optimizers, scaler
        self._mm = mm = map_model(model, include, exclude)
        if not (mm.layers or mm.activations or mm.traced):
            names = [n for n, _ in model.named_modules() if n][:8]
            raise GradwatchError(f"watch: include={include!r}, exclude={exclude!r} leave no module to watch; "
                                 f"module names look like {names}. Use glob patterns such as 'encoder.*'.")
        if config.activations and mm.layers and not mm.activations:
            log.info("gradwatch: %s has no activation modules; activations called as functions (F.relu) "
                     "cannot be hooked, so no dead-unit or saturation stats. Use nn.ReLU/nn.Tanh modules "
                     "to get them.", type(model).__name__)
        device = next((p.device for p in mm.params), torch.device("cpu"))
        self._rec = Recorder(mm, config, device, scaler, world=dist.world if dist and dist.merge else 1)
        if self._rec.sharded and not (dist and dist.merge):
            log.warning("gradwatch: the model's parameters are sharded, but the ranks' numbers are not merged: "
                        "norms cover this rank's shards only. Call gradwatch.watch() on every rank.")
        traced_ids = {id(m): i for i, (_, m) in enumerate(mm.traced)}
        self._layout = RunLayout(
            layer_names=[ly.name for ly in mm.layers],
            traced=[(n, type(m).__name__) for n, m in mm.traced],
            layer_of_traced={traced_ids[id(ly.module)]: i for i, ly in enumerate(mm.layers)
                             if id(ly.module) in traced_ids},
            rank=None if dist is None else dist.rank,
            maps=self._rec.maps,
        )
        self._flush_steps = DIST_FIRST_FLUSH  # distributed: recorded steps per flush, set by rank 0
        self._halt = None  # distributed: a finding under halt_on, waiting for the next flush to stop every rank
        self._halt_everywhere = False
        self._warned_ranks = False
        self._ratio_groups = self._plan_ratio_groups()
        self._ratio_specs: dict[tuple[int, int], RatioSpec | None] = {}
        self._step = self._recorded = 0
        self._rows: list = []
        self._closed = False
        self._warned: set[str] = set()  # kinds of failure already warned about
        self._loss_described = False
        if self._writes:
            try:
                conn = create_store(run_dir, self._meta(include, exclude))
            except (OSError, sqlite3.Error) as e:
                raise GradwatchError(f"watch: cannot create the run store in run_dir={str(run_dir)!r} ({e}); "
                                     "pass a folder you can write to.") from None
            self._writer = Writer(conn)
        else:
            self._writer = NullWriter()
        self._writer.put(Rows(series=[("layer", i, ly.name, type(ly.module).__name__, ly.n_params)
                                      for i, ly in enumerate(mm.layers)]))
        self._safe = hooks.SafeProbes(self._rec, mm) if config.trace_nonfinite and not self._passive else None
        try:
            self._handles = [] if self._passive else hooks.install(model, mm, self._rec, config, optimizers, self)
        except BaseException:
            self._writer.close(Rows(meta={"status": "crashed", "end_time": time.time()}))
            raise
        self._rec.detail = self._detail_due()
        self._want_safe_probes()
        if not optimizers and self._ratio_due():
            self._rec.snapshot(0, self._spec(None))  # so that step 0 has an update ratio too
        self._last_flush = time.monotonic()
        self._monitor = None
        if config.detect_every and self._writes:
            self._monitor = Monitor(run_dir, self._writer, config.detect_every)
        atexit.register(self._at_exit)

    # ---- the public surface ----------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        """How many times `step()` has been called."""
        return self._step

    def step(self, loss=None) -> None:
        """Close one optimizer step. Call it once per `optimizer.step()`, after it.

        Args:
            loss: the step's loss, a 0-dim tensor (kept on its device; gradwatch never calls `.item()`)
                or a float. Optional.
        """
        if self._closed:
            raise GradwatchError("step() was called after close(); create a new watcher with "
                                 "gradwatch.watch(...) to keep recording.")
        _check_loss(loss)
        if self._passive:
            self._step += 1
            return
        rec = self._rec
        try:
            if rec.recording:
                self._record_step(loss)
            else:
                rec.skip_step()
        except Exception as e:  # noqa: BLE001 - gradwatch must not crash the user's training
            rec.internal_error(e)
            rec.skip_step()
        self._step += 1
        rec.recording = self._step % self.config.every == 0
        rec.detail = rec.recording and self._detail_due()
        try:
            self._want_safe_probes()
            if not self._optimizers and rec.recording and self._ratio_due():
                rec.snapshot(0, self._spec(None))  # no optimizer hook to wrap the update: copy now
            if self._merging:  # every rank flushes at the same step: the flush is a collective
                due = len(self._rows) >= self._flush_steps
            else:
                due = time.monotonic() - self._last_flush >= self.config.flush_every
            if due or len(self._rows) >= MAX_ROWS_PER_FLUSH:
                self._flush()
        except Exception as e:  # noqa: BLE001
            rec.internal_error(e)
        self._warn_once_if_failed()
        if self._monitor is not None and not self._monitor.new.empty():
            self._deliver(halt=True)
        if self._halt_everywhere:
            raise GradwatchHalt(self._halt)

    def _record_step(self, loss) -> None:
        rec = self._rec
        if not self._optimizers and self._ratio_due():
            rec.measure_update(0, self._spec(None))
        skipped = (not rec.stepped) if self._optimizers else None
        if self._optimizers and not rec.stepped:
            rec.lrs = [g.get("lr") for opt in self._optimizers for g in opt.param_groups]
        if not self._loss_described and isinstance(loss, torch.Tensor) and loss.grad_fn is not None:
            self.note_loss_graph(describe_loss(loss))
        window_end = (self._recorded + 1) % self.config.dead_window == 0
        row = rec.finish_step(self._step, loss, window_end, self.config.weight_norm and rec.detail)
        row.skipped = skipped
        self._rows.append(row)
        self._recorded += 1
        self._send_new_sites()

    def note_loss_graph(self, description: dict) -> None:
        """Record the loss's autograd chain (`describe_loss`) once. For integrations whose `step()` only
        sees a detached loss: they describe the live one where the framework shows it."""
        if not self._loss_described:
            self._loss_described = True
            self._writer.put(Rows(meta={"loss": description}))

    def flush(self) -> None:
        """Write every recorded step now and wait until it is committed (a host sync on GPU)."""
        self._flush()
        self._writer.wait()

    def close(self, status: str = "finished") -> None:
        """Flush, mark the run `status`, and remove every hook. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        if status != "finished" and self._dist is not None:
            # After an error the other ranks may be stuck in a collective of their own: a last exchange
            # could hang. Rank 0 writes what it has; the others drop theirs.
            self._dist.merge = False
        try:
            if self._safe is not None:
                self._safe.close()
            hooks.remove(self._handles)
        finally:
            try:
                self._flush()
                self._final_diagnosis()
            finally:
                self._writer.close(Rows(meta={"status": status, "end_time": time.time(),
                                              "steps": self._step}))
                self._warn_once_if_failed()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._writer.put(Rows(meta={"error": f"{exc_type.__name__}: {exc}"}))
        self.close("crashed" if exc_type is not None else "finished")
        return False

    def __repr__(self) -> str:
        return f"Watcher(run_dir={str(self.run_dir)!r}, step={self._step}, closed={self._closed})"

    # ---- internals -------------------------------------------------------------------------------
    def _deliver(self, halt: bool) -> None:
        """Log each new finding once, pass it to on_finding, and stop the run if it reaches halt_on."""
        stop = None
        while not self._monitor.new.empty():
            f = self._monitor.new.get_nowait()
            announce(f)
            if self._on_finding is not None:
                self._on_finding(f)
            if halt and self._halt_on and stop is None and SEVERITY_RANK[f.severity] >= SEVERITY_RANK[self._halt_on]:
                stop = f
        if stop is not None:
            if not self._merging:
                raise GradwatchHalt(stop)
            # Distributed: every rank must stop at the same step, or the others would wait forever in their
            # next collective. The next flush tells them; then all raise together.
            self._halt = self._halt or stop

    def _final_diagnosis(self) -> None:
        """At close: one last pass over everything flushed, so the store and the log end complete."""
        if self._monitor is None:
            return
        self._monitor.stop()
        if self._writer.wait():
            self._monitor.check()
            self._deliver(halt=False)

    @property
    def _merging(self) -> bool:
        return self._dist is not None and self._dist.merge

    def _flush(self) -> None:
        now, last = time.monotonic(), self._last_flush
        self._last_flush = now
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        if self._merging and self._flush_merged(rows, (now - last) / len(rows)):
            return
        if self._writes:
            self._writer.put(Chunk(rows, self._layout, sharded=self._rec.sharded))

    def _flush_merged(self, rows: list, per_step: float) -> bool:
        """The distributed flush, a collective: every rank's rows to rank 0, merged there. False if it
        failed, and then this rank records alone from now on."""
        flats = [r.flat for r in rows if r.flat is not None]
        flat = torch.cat(flats) if flats else torch.zeros(0, device=self._rec.device)
        # Rank 0 picks how many recorded steps make `flush_every` seconds; every rank uses its pick.
        pick = min(MAX_ROWS_PER_FLUSH, max(1, round(self.config.flush_every / max(per_step, 1e-6))))
        try:
            world, (pick, halt), lengths = _dist.gather(flat, [pick, float(self._halt is not None)])
        except Exception as e:  # noqa: BLE001 - a broken process group
            self._dist.merge = False
            log.warning("gradwatch: merging the ranks' statistics failed (%s: %s); from now on rank 0 records "
                        "its own numbers only.", type(e).__name__, e)
            return False
        self._flush_steps = int(pick)
        self._halt_everywhere = bool(halt)
        if not self._writes:
            return True
        same = [r for r, n in enumerate(lengths) if n == lengths[0]]
        if len(same) < len(lengths) and not self._warned_ranks:
            self._warned_ranks = True
            log.warning("gradwatch: ranks %s recorded differently shaped steps (a different module call "
                        "sequence); their activation and NaN statistics are left out.",
                        [r for r in range(len(lengths)) if r not in same])
        self._writer.put(Chunk(rows, self._layout, world=world[same, : lengths[0]], ranks=same,
                               sharded=self._rec.sharded))
        return True

    def _wait_written(self) -> None:
        """Block until everything already flushed is committed (used by the benchmarks)."""
        self._writer.wait()

    def _send_new_sites(self) -> None:
        sites = self._rec.new_sites
        if sites:
            self._writer.put(Rows(series=[("activation", s.index, s.name, s.module_type, None) for s in sites]))
            self._layout.n_sites = len(self._rec.sites)
            sites.clear()

    def _warn_once_if_failed(self) -> None:
        """One warning per kind of failure: an internal error must not hide a store that stopped writing."""
        store, internal = self._writer.error, self._rec.first_error
        if store is not None and "store" not in self._warned:
            self._warned.add("store")
            warnings.warn(GradwatchWarning(
                f"gradwatch could not write its store in {str(self.run_dir)!r} ({type(store).__name__}: {store}); "
                "training goes on, and gradwatch keeps retrying, but steps may be lost. Free disk space or check "
                "the folder's permissions."), stacklevel=3)
        if internal is not None and "internal" not in self._warned:
            self._warned.add("internal")
            warnings.warn(GradwatchWarning(
                f"gradwatch hit an internal error and skips what it could not measure; training goes on "
                f"({type(internal).__name__}: {internal}). Please report it with your model's structure."),
                stacklevel=3)

    def _want_safe_probes(self) -> None:
        if self._safe is not None:
            rec = self._rec
            self._safe.want(rec.recording and (rec.detail or rec.half_seen))

    def _detail_due(self) -> bool:
        """This recorded step also takes the weight norm, grad max-abs and update ratio."""
        return self._recorded % self.config.detail_every == 0

    def _ratio_due(self) -> bool:
        return self.config.update_ratio and self._detail_due()

    def ratio_spec_for(self, optimizer) -> RatioSpec | None:
        """What the update ratio measures at this optimizer step, or None when it is not due."""
        if not (self._rec.recording and self._ratio_due()):
            return None
        return self._spec(optimizer)

    def _spec(self, optimizer) -> RatioSpec | None:
        group = (self._recorded // self.config.detail_every) % len(self._ratio_groups)
        key = (group, id(optimizer))
        if key not in self._ratio_specs:
            self._ratio_specs[key] = self._build_spec(self._ratio_groups[group], optimizer)
        return self._ratio_specs[key]

    def _plan_ratio_groups(self) -> list[list[int]]:
        """Split layers, in model order, into groups whose weights fit in update_memory_mb."""
        budget = self.config.update_memory_mb * 2**20
        groups: list[list[int]] = [[]]
        used = 0.0
        for i, ly in enumerate(self._mm.layers):
            size = sum(p.numel() * p.element_size() for p in ly.params)
            if groups[-1] and used + size > budget:
                groups.append([])
                used = 0.0
            groups[-1].append(i)
            used += size
        return groups

    def _build_spec(self, layers: list[int], optimizer) -> RatioSpec | None:
        mm = self._mm
        owned = None if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
        wanted = set(layers)
        params, where, pairs, order = [], {}, [], []
        for p_idx, l_idx in zip(mm.param_of_pair, mm.layer_of_pair):
            p = mm.params[p_idx]
            if l_idx in wanted and (owned is None or id(p) in owned):
                if p_idx not in where:
                    where[p_idx] = len(params)
                    params.append(p)
                    order.append(p_idx)
                pairs.append((where[p_idx], l_idx))
        if not params:
            return None
        rec = self._rec
        return RatioSpec(params, rec.add_map([p for p, _ in pairs], [ly for _, ly in pairs]),
                         rec.shard_scale_for(order))

    def _meta(self, include, exclude) -> dict:
        return {
            "name": self.run_dir.name, "status": "running", "start_time": time.time(),
            "pid": os.getpid(), "host": socket.gethostname(),
            "gradwatch_version": __version__, "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "model": self._mm.summary(self.model),
            "optimizer": [describe_optimizer(o) for o in self._optimizers],
            "scaler": None if self._scaler is None else {"class": type(self._scaler).__name__,
                                                         "enabled": bool(self._scaler.is_enabled())},
            "config": asdict(self.config), "include": include, "exclude": exclude,
            "device": str(self._rec.device),
            "distributed": None if self._dist is None else {
                "world_size": self._dist.world, "merged": self._dist.merge, "sharded": self._rec.sharded},
        }

    def _at_exit(self) -> None:
        crashed = getattr(sys, "last_type", None) is not None
        if self._dist is not None:  # the other ranks may be gone: no collective at interpreter exit
            self._dist.merge = False
        try:
            self.close("crashed" if crashed else "finished")
        except Exception:  # noqa: BLE001 - never fail interpreter shutdown
            pass


def _check_loss(loss) -> None:
    if loss is None:
        return
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise GradwatchError(f"step: loss must be a scalar (a 0-dim tensor or a float), got a tensor of "
                                 f"shape {tuple(loss.shape)}; pass the reduced loss, e.g. loss.mean().")
        return
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"step: loss must be a 0-dim tensor or a float, got loss={loss!r} "
                        f"({type(loss).__name__})")


def watch(model: nn.Module, optimizer=None, run_dir: str | os.PathLike | None = None, *, scaler=None,
          include: str | list[str] | None = None, exclude: str | list[str] | None = None,
          name: str | None = None, config: WatchConfig | None = None, overwrite: bool = False,
          on_finding=None, halt_on: str | None = None, **options) -> Watcher:
    """Start recording a model's training. See the README for the full walk-through.

    Args:
        model: the `nn.Module` being trained (hooks go on it and its submodules).
        optimizer: the optimizer, a list of them, or None (weights updated by hand).
        run_dir: folder for the run store; default `runs/<name or timestamp>`.
        scaler: a `torch.amp.GradScaler`, so that recorded gradients are unscaled.
        include: glob patterns of module names to watch (default: all), e.g. "encoder.*".
        exclude: glob patterns of module names to leave alone.
        name: run name used for the default `run_dir`.
        config: a `WatchConfig`; keyword `options` (every=, activations=, ...) override its fields.
        overwrite: replace a run already in `run_dir` instead of raising.
        on_finding: called with each `Finding` at its first occurrence, on the training thread inside
            `step()` (and `close()`); the live detectors run every `detect_every` seconds.
        halt_on: "warning" or "critical": `step()` raises `GradwatchHalt` at the first finding of that
            severity or worse, so that a doomed run stops early.

    Returns:
        A `Watcher`: call `step(loss)` once per optimizer step and `close()` at the end, or use it in a
        `with` block.
    """
    from ._validate import check_watch_args, prepare_run_dir

    optimizers, include, exclude = check_watch_args(model, optimizer, scaler, include, exclude)
    if config is not None and not isinstance(config, WatchConfig):
        raise TypeError(f"watch: config must be a gradwatch.WatchConfig, got {type(config).__name__}")
    cfg = (config or WatchConfig()).replace(**options)
    if on_finding is not None and not callable(on_finding):
        raise TypeError(f"watch: on_finding must be a function taking a Finding, got {type(on_finding).__name__}")
    if halt_on not in (None, "warning", "critical"):
        raise GradwatchError(f"watch: halt_on must be None, 'warning' or 'critical', got halt_on={halt_on!r}")
    if halt_on and not cfg.detect_every:
        raise GradwatchError("watch: halt_on needs the live detectors, but detect_every=0 turns them off; "
                             "set detect_every to a number of seconds (default 5).")
    dist = _dist.detect(cfg.merge_ranks)
    if dist is not None and dist.rank != 0:  # only rank 0 touches the disk
        run_path = Path(run_dir) if run_dir is not None else Path("runs")
    else:
        run_path = prepare_run_dir(run_dir, name, overwrite)
    return Watcher(model, optimizers, run_path, cfg, scaler, include, exclude, on_finding, halt_on, dist)
