"""A flush: the recorded steps since the last one, copied to the host once and turned into store rows.

`Chunk(...)` runs on the training thread and only starts the copy; `Chunk.rows()` runs on the writer
thread, waits for the copy there, and does all the host-side work, including naming NaN producers.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import _dist
from ._pairs import PairMap
from .recorder import StepRow
from .store.schema import EVAL_FORWARD, FORWARD_NONFINITE, GRAD_CARRIED, GRAD_NONFINITE, LOSS_NONFINITE, ROOT_NAME
from .store.writer import Rows


@dataclass
class RunLayout:
    """Names the chunk needs to turn positions into modules; shared by every chunk of a run."""

    layer_names: list[str]
    traced: list[tuple[str, str]]  # (name, type) of each traced module, by trace index
    layer_of_traced: dict[int, int]  # traced index -> layer index, for modules that are both
    n_sites: int = 0  # activation sites known so far; each chunk keeps the count it was created with
    rank: int | None = None
    last_event: tuple | None = None  # (phase, module) of the previous step's event; None after a clean step
    maps: list[PairMap] = field(default_factory=list)  # the Recorder's: per-parameter values -> layers


class Chunk:
    def __init__(self, rows: list[StepRow], layout: RunLayout, world: torch.Tensor | None = None,
                 ranks: list[int] | None = None, sharded: bool = False):
        """`world`: in a distributed run, the ranks' flushed rows ([ranks, n], see `_dist.gather`), named
        by `ranks`, merged here; `rows` are rank 0's, whose layout every rank shares."""
        self.steps, self.layout = rows, layout
        self.n_sites = layout.n_sites
        self._ranks, self._sharded = np.array(ranks or [0]), sharded
        flats = [world] if world is not None else [r.flat for r in rows if r.flat is not None]
        self._copied = None  # CUDA event recorded after the async copy
        if not flats or flats[0].numel() == 0:
            self._host = None
        elif flats[0].is_cuda:
            flat = torch.cat(flats)
            # sync: none here; the copy runs async into pinned memory and the writer thread waits on it.
            self._host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self._host.copy_(flat, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = torch.cat(flats)

    def rows(self) -> Rows:
        if self._copied is not None:
            # sync: once per flush, on the writer thread. Polling never blocks the device or trips
            # torch.cuda.set_sync_debug_mode, which a blocking event wait could.
            while not self._copied.query():
                time.sleep(0.0005)
        host = self._host.numpy() if self._host is not None else np.zeros(0, np.float32)
        host = host.reshape(len(self._ranks), -1)  # one line per rank; a single one outside distributed runs
        out = Rows()
        # Steps share a few layouts: a detail step (one in detail_every) has more fields than the others.
        # The rows of each layout, wherever they lie in the chunk, make one [steps x width] block, and every
        # field is a column slice of it, so the Python work here grows with the layouts, not the steps.
        groups: dict[tuple, list[int]] = {}
        starts, pos = [], 0
        for i, r in enumerate(self.steps):
            groups.setdefault(tuple(r.layout), []).append(i)
            starts.append(pos)
            pos += sum(n for _, n in r.layout)
        per_step: list = [None] * len(self.steps)
        for layout, members in groups.items():
            width = sum(n for _, n in layout)
            at = np.array([starts[i] for i in members])[:, None] + np.arange(width)
            block = host[:, at]  # [ranks, steps, width]
            ranks = None
            if len(self._ranks) > 1 or self._sharded:
                merged, layout, ranks = _dist.merge(block, list(layout), self._sharded, self._ranks)
            else:
                merged = block[0]
            cols, c = {}, 0
            for name, n in layout:
                cols[name] = merged[:, c: c + n]
                c += n
                if name.startswith("unit_max@"):  # a unit is dead if it never fired in the window
                    cols[name.replace("unit_max@", "dead_fraction@")] = (cols[name] <= 0).mean(axis=1, keepdims=True)
            run = [self.steps[i] for i in members]
            for i, done in zip(members, self._run_rows(run, cols, out, ranks)):
                per_step[i] = done
        for step_row, nonfinite, event in per_step:  # in step order, which the streaks below need
            out.steps.append(step_row)
            if not nonfinite:
                self.layout.last_event = None
                continue
            # A streak of non-finite steps is reported once, at its onset: after it, NaN weights make
            # every later step "produce" NaN again, which names a victim rather than the cause.
            if event and self.layout.last_event is None:
                out.events.append(event)
            self.layout.last_event = event[2:4] if event else None
        return out

    def _run_rows(self, run: list[StepRow], cols: dict[str, np.ndarray], out: Rows, ranks) -> list[tuple]:
        """Puts the metric values of `run` (steps that share a layout) into `out`; returns, per step, its
        steps-table row, whether it saw a non-finite value, and the event naming the producer (or None)."""
        steps = [r.step for r in run]
        n_layers = len(self.layout.layer_names)
        if "loss" in cols:
            loss = cols["loss"][:, 0].astype(np.float64)
        else:
            loss = np.array([np.nan if r.loss is None else r.loss for r in run], dtype=np.float64)
        has_loss = np.array(["loss" in cols or r.loss is not None for r in run])
        flags = np.zeros(len(run), dtype=np.int64)
        layer_bad = np.zeros((len(run), n_layers), dtype=bool)
        grad_probe = total = None
        scale = cols["loss_scale"][:, 0] if "loss_scale" in cols else None
        # Recorded gradient norms are of the scaled gradients; the flush unscales them.
        unscale = np.ones((len(run), 1)) if scale is None else scale[:, None].astype(np.float64)
        grad = self._field(cols, "gnorm@")
        if grad is not None:
            values, pm = grad
            norm = pm.combine(values, "norm") / unscale
            total = pm.total(values) / unscale[:, 0]
            absent = np.broadcast_to(pm.absent, norm.shape)
            maxabs = self._field(cols, "gmax@")
            if maxabs is not None:
                maxabs = maxabs[1].combine(maxabs[0], "max") / unscale
                self._put(out, "grad_maxabs", steps, maxabs)
            # NaN/Inf as measured. Without max |g| (not a detail step), a per-tensor norm past 1.8e19 (its
            # square overflows float32) also reads inf: an explosion so far gone that it is reported with the
            # non-finite ones.
            grad_probe = maxabs if maxabs is not None else norm.copy()
            layer_bad = ~np.isfinite(grad_probe) & ~absent
            norm[layer_bad] = np.inf  # a NaN norm would read as "not measured"
            self._put(out, "grad_norm", steps, norm)
            self._put(out, "nonfinite", steps, np.where(absent, np.nan, layer_bad))
            flags |= GRAD_NONFINITE * layer_bad.any(axis=1)
        weight = self._field(cols, "wnorm@")
        if weight is not None:
            self._put(out, "weight_norm", steps, weight[1].combine(weight[0], "norm"))
        ratio = None
        for m, delta, pm in self._fields(cols, "udelta@"):  # one per optimizer
            with np.errstate(invalid="ignore", divide="ignore"):
                r = pm.combine(delta, "norm") / pm.combine(cols[f"uweight@{m}"], "norm")
            # Two optimizers cover different layers; fmin keeps each one's numbers and ignores the NaNs.
            ratio = r if ratio is None else np.fmin(ratio, r)
        if ratio is not None:
            self._put(out, "update_ratio", steps, ratio)
        self._site_rows(run, cols, steps, out)
        minmax = cols["probes"].reshape(len(run), -1, 2) if "probes" in cols else np.zeros((len(run), 0, 2))
        flags |= FORWARD_NONFINITE * ~np.isfinite(minmax).all(axis=(1, 2))
        flags |= LOSS_NONFINITE * (has_loss & ~np.isfinite(loss))
        nonfinite = flags.copy()
        flags |= EVAL_FORWARD * np.array([r.eval_forward for r in run])
        if "grad_carry" in cols:
            flags |= GRAD_CARRIED * (cols["grad_carry"][:, 0] > 0)
        done = []
        for i, r in enumerate(run):
            lrs = [float(cols[f"lr@{g}"][i, 0]) if lr is None else lr for g, lr in enumerate(r.lrs)]
            li = float(loss[i])
            step_row = (
                r.step, r.time, None if math.isnan(li) else li,
                None if total is None else (float(total[i]) if math.isfinite(total[i]) else math.inf),
                json.dumps(lrs) if lrs else None, None if r.skipped is None else int(r.skipped),
                None if scale is None else float(scale[i]), int(flags[i]),
            )
            event = None
            if nonfinite[i]:
                event = self._nonfinite_event(r, li if has_loss[i] else None, _probe_kinds(minmax[i]), layer_bad[i],
                                              None if grad_probe is None else grad_probe[i],
                                              self.layout.rank if ranks is None else int(ranks[i]))
            done.append((step_row, bool(nonfinite[i]), event))
        return done

    def _site_rows(self, run: list[StepRow], cols: dict[str, np.ndarray], steps: list[int], out: Rows) -> None:
        for metric, entries in run[0].sites.items():  # one layout, so every step has the same sites
            sites = [site for site, _ in entries]
            raw = np.stack([cols[f"{metric}@{site}"][:, 0] for site in sites], axis=1).astype(np.float64)
            numel = np.array([[n for _, n in r.sites[metric]] for r in run], dtype=np.float64)
            if metric == "zero_fraction":
                raw = 1.0 - raw / numel
            elif metric == "saturation_fraction":
                raw = raw / numel
            mat = np.full((len(run), self.n_sites), np.nan, dtype=np.float32)
            mat[:, sites] = raw
            self._put(out, metric, steps, mat)

    def _fields(self, cols: dict[str, np.ndarray], prefix: str):
        """The per-parameter fields `prefix<map>` of these rows: (map index, values, its PairMap) each."""
        for name, values in list(cols.items()):
            if name.startswith(prefix):
                m = int(name[len(prefix):])
                yield m, values, self.layout.maps[m]

    def _field(self, cols: dict[str, np.ndarray], prefix: str) -> tuple[np.ndarray, PairMap] | None:
        """The one field `prefix<map>` of a row layout that has at most one: (values, its PairMap), or None."""
        hit = next(self._fields(cols, prefix), None)
        return None if hit is None else hit[1:]

    @staticmethod
    def _put(out: Rows, metric: str, steps: list[int], values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype="<f4")
        out.values.extend((metric, step, data[i].tobytes()) for i, step in enumerate(steps))

    def _nonfinite_event(self, row: StepRow, loss: float | None, probes: np.ndarray, layer_bad: np.ndarray,
                         grad_probe: np.ndarray | None, rank: int | None) -> tuple | None:
        """The producer: the first module, in execution order, whose inputs are finite and output is not.

        `probes` holds 0.0 (finite), NaN or Inf per probe.
        """
        bad = ~np.isfinite(probes)
        traced = self.layout.traced
        for m, ins, out_probe in row.trace:
            if out_probe >= 0 and bad[out_probe] and not any(i >= 0 and bad[i] for i in ins):
                name, kind = traced[m]
                return self._event(row, rank, _nan_or_inf(probes[out_probe]), "forward", name,
                                   f"{name} ({kind}) returned {_nan_or_inf(probes[out_probe])} from finite "
                                   f"inputs in the forward pass of step {row.step}")
        for m, ins, _ in row.trace:
            if any(i >= 0 and bad[i] for i in ins):
                name = traced[m][0]
                whose = "the model's input (the batch itself)" if name == ROOT_NAME else f"the input of {name}"
                return self._event(row, rank, _nan_or_inf(probes[[i for i in ins if i >= 0 and bad[i]][0]]),
                                   "input", name,
                                   f"{whose} already held NaN/Inf at step {row.step} and no watched module "
                                   "produced it: the data, or code outside any module")
        if loss is not None and not math.isfinite(loss):
            return self._event(row, rank, _nan_or_inf(loss), "loss", "",
                               f"the loss is {loss} at step {row.step} while every module output was finite: "
                               "the loss computation produced it (log(0), division by zero, bad targets)")
        if layer_bad.any():
            order = self._forward_order(row)
            bad_layers = [i for i in np.flatnonzero(layer_bad)]
            last = max(bad_layers, key=lambda i: order.get(i, -1) if order else i)
            name = self.layout.layer_names[last]
            return self._event(row, rank, _nan_or_inf(grad_probe[last]), "backward", name,
                               f"the gradient of {name}'s parameters holds NaN/Inf at step {row.step} while the "
                               "forward pass and the loss were finite: its backward produced it")
        return None

    def _forward_order(self, row: StepRow) -> dict[int, int]:
        """Layer index -> position of its first forward call in this step (backward runs in reverse)."""
        order: dict[int, int] = {}
        for pos, (m, _, _) in enumerate(row.trace):
            layer = self.layout.layer_of_traced.get(m)
            if layer is not None and layer not in order:
                order[layer] = pos
        return order

    @staticmethod
    def _event(row: StepRow, rank: int | None, kind: str, phase: str, module: str, detail: str) -> tuple:
        if rank is not None:
            detail += f" (rank {rank})"
        return (row.step, kind, phase, module, rank, None, detail)


def _probe_kinds(minmax: np.ndarray) -> np.ndarray:
    """(min, max) pairs -> 0.0 when both are finite, NaN when either is NaN, else Inf."""
    finite = np.where(np.isfinite(minmax).all(axis=1), 0.0, np.inf)
    return np.where(np.isnan(minmax).any(axis=1), np.nan, finite)


def _nan_or_inf(x: float) -> str:
    return "nan" if math.isnan(x) else "inf"
