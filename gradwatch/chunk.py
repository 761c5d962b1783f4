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

from .recorder import ABSENT, StepRow
from .store.schema import EVAL_FORWARD, FORWARD_NONFINITE, GRAD_NONFINITE, LOSS_NONFINITE
from .store.writer import Rows


@dataclass
class RunLayout:
    """Names the chunk needs to turn positions into modules; shared by every chunk of a run."""

    layer_names: list[str]
    traced: list[tuple[str, str]]  # (name, type) of each traced module, by trace index
    layer_of_traced: dict[int, int]  # traced index -> layer index, for modules that are both
    n_sites: list[int] = field(default_factory=lambda: [0])  # activation sites known so far (mutable)
    rank: int | None = None
    last_event: tuple | None = None  # (phase, module) of the previous step's event; None after a clean step


class Chunk:
    def __init__(self, rows: list[StepRow], layout: RunLayout):
        self.steps, self.layout = rows, layout
        self.n_sites = layout.n_sites[0]
        flats = [r.flat for r in rows if r.flat is not None]
        self._copied = None  # CUDA event recorded after the async copy
        if not flats:
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
        out, pos = Rows(), 0
        for row in self.steps:
            fields: dict[str, np.ndarray] = {}
            for name, n in row.layout:
                fields[name] = host[pos: pos + n]
                pos += n
            self._step_rows(row, fields, out)
        return out

    def _step_rows(self, row: StepRow, f: dict[str, np.ndarray], out: Rows) -> None:
        loss = float(f["loss"][0]) if "loss" in f else row.loss
        flags = 0
        layer_bad = np.zeros(len(self.layout.layer_names), dtype=bool)
        if "grad_norm" in f:
            norm = f["grad_norm"].copy()
            absent = norm == ABSENT
            probe = f.get("grad_maxabs", norm)
            layer_bad = ~np.isfinite(probe) & ~absent
            norm[absent] = np.nan
            norm[layer_bad] = np.inf  # a NaN norm would read as "not measured"
            self._put(out, "grad_norm", row.step, norm)
            self._put(out, "nonfinite", row.step, np.where(absent, np.nan, layer_bad.astype(np.float32)))
            if "grad_maxabs" in f:
                self._put(out, "grad_maxabs", row.step, np.where(absent, np.nan, f["grad_maxabs"]))
            if layer_bad.any():
                flags |= GRAD_NONFINITE
        for metric in ("weight_norm", "update_ratio"):
            if metric in f:
                self._put(out, metric, row.step, f[metric])
        self._site_rows(row, f, out)
        minmax = f.get("probes", np.zeros(0, np.float32)).reshape(-1, 2)  # (min, max) per probe
        probes = np.where(np.isnan(minmax).any(1), np.nan, np.where(np.isfinite(minmax).all(1), 0.0, np.inf))
        if not np.isfinite(probes).all():
            flags |= FORWARD_NONFINITE
        if loss is not None and not math.isfinite(loss):
            flags |= LOSS_NONFINITE
        total = math.sqrt(f["grad_total_sq"][0]) if "grad_total_sq" in f else None
        nonfinite_flags = flags
        if row.eval_forward:
            flags |= EVAL_FORWARD
        lrs = [float(f[f"lr@{i}"][0]) if lr is None else lr for i, lr in enumerate(row.lrs)]
        out.steps.append((
            row.step, row.time, None if loss is None or math.isnan(loss) else loss,
            None if total is None else (total if math.isfinite(total) else math.inf),
            json.dumps(lrs) if lrs else None, None if row.skipped is None else int(row.skipped),
            float(f["loss_scale"][0]) if "loss_scale" in f else None, flags,
        ))
        grad_probe = f.get("grad_maxabs", f.get("grad_norm"))
        event = self._nonfinite_event(row, loss, probes, layer_bad, grad_probe) if nonfinite_flags else None
        # A streak of non-finite steps is reported once, at its onset: after it, NaN weights make every
        # later step "produce" NaN again, which names a victim rather than the cause.
        if event and self.layout.last_event is None:
            out.events.append(event)
        self.layout.last_event = event[2:4] if event else None

    def _site_rows(self, row: StepRow, f: dict[str, np.ndarray], out: Rows) -> None:
        for metric, entries in row.sites.items():
            vec = np.full(self.n_sites, np.nan, dtype=np.float32)
            for site, numel in entries:
                v = float(f[f"{metric}@{site}"][0])
                vec[site] = 1.0 - v / numel if metric == "zero_fraction" else (
                    v if metric == "dead_fraction" else v / numel)
            self._put(out, metric, row.step, vec)

    @staticmethod
    def _put(out: Rows, metric: str, step: int, values: np.ndarray) -> None:
        out.values.append((metric, step, np.ascontiguousarray(values, dtype="<f4").tobytes()))

    def _nonfinite_event(self, row: StepRow, loss, probes: np.ndarray, layer_bad: np.ndarray,
                         grad_probe: np.ndarray) -> tuple | None:
        """The producer: the first module, in execution order, whose inputs are finite and output is not."""
        bad = ~np.isfinite(probes)
        traced = self.layout.traced
        for m, ins, out_probe in row.trace:
            if out_probe >= 0 and bad[out_probe] and not any(i >= 0 and bad[i] for i in ins):
                name, kind = traced[m]
                return self._event(row, _nan_or_inf(probes[out_probe]), "forward", name,
                                   f"{name} ({kind}) returned {_nan_or_inf(probes[out_probe])} from finite "
                                   f"inputs in the forward pass of step {row.step}")
        for m, ins, _ in row.trace:
            if any(i >= 0 and bad[i] for i in ins):
                name = traced[m][0]
                return self._event(row, _nan_or_inf(probes[[i for i in ins if i >= 0 and bad[i]][0]]),
                                   "input", name,
                                   f"the input of {name} already held NaN/Inf at step {row.step} and no watched "
                                   "module produced it: the batch itself, or code outside any module")
        if loss is not None and not math.isfinite(loss):
            return self._event(row, _nan_or_inf(loss), "loss", "",
                               f"the loss is {loss} at step {row.step} while every module output was finite: "
                               "the loss computation produced it (log(0), division by zero, bad targets)")
        if layer_bad.any():
            order = self._forward_order(row)
            bad_layers = [i for i in np.flatnonzero(layer_bad)]
            last = max(bad_layers, key=lambda i: order.get(i, -1) if order else i)
            name = self.layout.layer_names[last]
            return self._event(row, _nan_or_inf(grad_probe[last]), "backward", name,
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

    def _event(self, row: StepRow, kind: str, phase: str, module: str, detail: str) -> tuple:
        return (row.step, kind, phase, module, self.layout.rank, None, detail)


def _nan_or_inf(x: float) -> str:
    return "nan" if math.isnan(x) else "inf"
