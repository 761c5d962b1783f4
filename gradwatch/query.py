"""The dashboard's query layer: incremental, downsampled reads of run stores. No streamlit, no torch.

A `RunView` holds one run's steps and the metrics asked for so far in numpy arrays. `refresh()` reads only
the rows written since the last read, so a live run costs a few small range scans per rerun, and every
chart reads at most `MAX_BINS` rows per series: min, mean and max over equal-width bins of steps.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from ._bins import Columns, Grow, Rollup, edges, grid
from .detect import SEVERITY_RANK
from .errors import GradwatchError
from .store.reader import _connect, _live_status, decode_vectors
from .store.schema import (
    DB_NAME,
    EVAL_FORWARD,
    FORWARD_NONFINITE,
    GRAD_CARRIED,
    GRAD_NONFINITE,
    LOSS_NONFINITE,
    METRIC_KIND,
    SCHEMA_VERSION,
)

MAX_BINS = 500  # rows per series a chart gets, whatever the run's length
MAX_MARKERS = 50  # per kind: a run that spikes all the time gets its first 50 marked, not a wall of rules
SERIES_COLUMNS = ["step", "step_lo", "step_hi", "min", "mean", "max", "n", "nonfinite"]
METRIC_COLUMNS = ["layer", "order"] + SERIES_COLUMNS
HEATMAP_COLUMNS = ["layer", "order", "step_lo", "step_hi", "value", "inf"]
MARKER_COLUMNS = ["step", "kind", "label"]
EVENT_COLUMNS = ["step", "kind", "phase", "module", "rank", "value", "detail"]
FINDING_COLUMNS = ["kind", "layer", "step", "severity", "message", "suggestion", "evidence", "first_seen"]
_NONFINITE = LOSS_NONFINITE | GRAD_NONFINITE | FORWARD_NONFINITE
_STEP_FIELDS = ("time", "loss", "grad_norm", "loss_scale")


class _Metric:
    """One metric's held history: sorted steps and a series x steps float32 matrix (NaN: not measured)."""

    def __init__(self, width: int):
        self.steps = Grow(np.int64)
        self.values = Columns(width)

    @property
    def last(self) -> int:
        return int(self.steps.view[-1]) if self.steps.n else -1


class RunView:
    """Incremental, downsampled reads of one run store for the dashboard. Cheap to keep across reruns.

    Thread-safe: Streamlit may call one cached view from several sessions at once.
    """

    def __init__(self, run_dir: str | os.PathLike):
        if not isinstance(run_dir, (str, os.PathLike)):
            raise TypeError(f"RunView: run_dir must be a path (str or os.PathLike), got {type(run_dir).__name__}")
        self.path = Path(run_dir)
        self.name = self.path.name
        if not self.path.is_dir():
            raise GradwatchError(f"RunView: run_dir={str(run_dir)!r} is not a folder. Pass a folder that "
                                 "gradwatch.watch(run_dir=...) wrote.")
        if not (self.path / DB_NAME).is_file():
            raise GradwatchError(f"RunView: run_dir={str(run_dir)!r} holds no gradwatch run (no {DB_NAME}). "
                                 "Pass a folder that gradwatch.watch() wrote.")
        self._lock = threading.RLock()
        self._reset()
        self.refresh()

    def _reset(self) -> None:
        self._meta_raw: dict[str, str] = {}
        self._meta: dict = {}
        self._series: dict[str, list[str]] = {"layer": [], "activation": []}
        self._step = Grow(np.int64)
        self._cols = {name: Grow(np.float64) for name in _STEP_FIELDS}
        self._flags = Grow(np.int64, fill=0)
        self._skipped = Grow(np.int8, fill=-1)  # -1: NULL (no optimizer)
        self._lrs = Grow(np.float64, 0)
        self._metrics: dict[str, _Metric] = {}
        self._events: list[tuple] = []
        self._event_id = 0
        self._findings_raw: list[tuple] = []
        self._cache: dict = {}  # query -> frame, until the next change
        self._rollups: dict[tuple, Rollup] = {}  # per-bin reductions, extended as rows arrive

    # ---- reading the store ---------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Read what was written since the last read; True if anything changed.

        Raises:
            GradwatchError: the store was deleted, truncated, corrupted, or written by another schema.
        """
        with self._lock:
            if not (self.path / DB_NAME).is_file():
                raise GradwatchError(f"RunView: {str(self.path)!r} no longer holds {DB_NAME}: the run folder or "
                                     "its database was deleted or moved. Pick another run.")
            try:
                conn = _connect(self.path / DB_NAME)
                try:
                    conn.execute("BEGIN")  # one snapshot for every table, while the writer goes on
                    changed = self._read(conn)
                finally:
                    conn.close()
            except (sqlite3.DatabaseError, ValueError) as e:  # ValueError: a mangled JSON value or blob
                raise self._unreadable(e) from None
            if changed:
                self._cache.clear()
            return changed

    def _unreadable(self, e: Exception) -> GradwatchError:
        return GradwatchError(f"RunView: {str(self.path)!r} holds a {DB_NAME} that cannot be read ({e}); it may be "
                              "truncated, corrupted or not a gradwatch store. Check the file, or pick another run.")

    def _read(self, conn: sqlite3.Connection) -> bool:
        raw = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if self._meta_raw and raw.get("start_time") != self._meta_raw.get("start_time"):
            self._reset()  # the folder was recorded again: start over
        changed = raw != self._meta_raw
        if changed:
            meta = {k: json.loads(v) for k, v in raw.items()}
            version = meta.get("schema_version")
            if version != SCHEMA_VERSION:
                raise GradwatchError(
                    f"RunView: {str(self.path)!r} was written with store schema {version!r}, and this gradwatch "
                    f"reads schema {SCHEMA_VERSION}. Open it with the gradwatch version that wrote it "
                    f"({meta.get('gradwatch_version', 'unknown')}), or record the run again.")
            self._meta_raw, self._meta = raw, meta
        series = {"layer": [], "activation": []}
        for kind, name in conn.execute("SELECT kind, name FROM series ORDER BY kind, idx"):
            series.setdefault(kind, []).append(name)
        if series != self._series:
            self._series, changed = series, True
        changed |= self._read_steps(conn)
        for metric in self._metrics:
            changed |= self._read_metric(conn, metric)
        events = conn.execute("SELECT id, step, kind, phase, module, rank, value, detail FROM events "
                              "WHERE id > ? ORDER BY id", (self._event_id,)).fetchall()
        if events:
            self._events.extend(e[1:] for e in events)
            self._event_id, changed = events[-1][0], True
        tables = {t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        findings = (conn.execute(f"SELECT {', '.join(FINDING_COLUMNS)} FROM findings ORDER BY step, kind, layer")
                    .fetchall() if "findings" in tables else [])  # older stores had no findings table
        if findings != self._findings_raw:
            self._findings_raw, changed = findings, True
        return changed

    def _read_steps(self, conn: sqlite3.Connection) -> bool:
        last = int(self._step.view[-1]) if self._step.n else -1
        rows = conn.execute("SELECT step, time, loss, grad_norm, loss_scale, lrs, coalesce(skipped, -1), "
                            "coalesce(flags, 0) FROM steps WHERE step > ? ORDER BY step", (last,)).fetchall()
        if not rows:
            return False
        cols = list(zip(*rows))
        self._step.append(np.array(cols[0], np.int64))
        for name, col in zip(_STEP_FIELDS, cols[1:5]):
            self._cols[name].append(np.array(col, np.float64))  # None (NULL, or a NaN) -> NaN
        self._lrs.append(_parse_lrs(cols[5]))
        self._skipped.append(np.array(cols[6], np.int8))  # -1: NULL
        self._flags.append(np.array(cols[7], np.int64))
        return True

    def _read_metric(self, conn: sqlite3.Connection, metric: str) -> bool:
        held = self._metrics[metric]
        rows = conn.execute("SELECT step, data FROM metric_values WHERE metric = ? AND step > ? ORDER BY step",
                            (metric, held.last)).fetchall()
        if not rows:
            return False
        held.steps.append(np.fromiter((r[0] for r in rows), np.int64, len(rows)))
        blobs = [r[1] for r in rows]
        held.values.append(decode_vectors(blobs, max(len(b) for b in blobs) // 4))
        return True

    def _metric(self, metric: str) -> _Metric:
        """The held history of `metric`, read in full on first use and kept current by `refresh()`."""
        if metric not in METRIC_KIND:
            raise GradwatchError(f"RunView: metric must be one of {sorted(METRIC_KIND)}, got metric={metric!r}")
        if metric not in self._metrics:
            self._metrics[metric] = _Metric(len(self._series[METRIC_KIND[metric]]))
            try:
                conn = _connect(self.path / DB_NAME)
                try:
                    self._read_metric(conn, metric)
                finally:
                    conn.close()
            except (sqlite3.DatabaseError, ValueError) as e:
                del self._metrics[metric]
                raise self._unreadable(e) from None
        held = self._metrics[metric]
        held.values.widen(len(self._series[METRIC_KIND[metric]]))  # sites found since: NaN until measured
        return held

    # ---- what the run page shows ---------------------------------------------------------------------
    @property
    def status(self) -> str:
        """"running", "finished" or "crashed" (a killed run reads as crashed), as of the last refresh."""
        keys = ("status", "pid", "host", "updated_at")
        return _live_status([(k, v) for k, v in self._meta_raw.items() if k in keys])

    @property
    def meta(self) -> dict:
        return self._meta

    @property
    def n_steps(self) -> int:
        return self._step.n

    @property
    def last_step(self) -> int | None:
        return int(self._step.view[-1]) if self._step.n else None

    @property
    def started(self) -> float | None:
        return self._meta.get("start_time")

    @property
    def updated(self) -> float | None:
        return self._meta.get("updated_at")

    def steps(self) -> pd.DataFrame:
        """Every recorded step, with the same columns as `Run.steps`."""
        with self._lock:
            flags = self._flags.view
            lrs = self._lrs.view
            df = pd.DataFrame({"step": self._step.view.copy(), "time": self._cols["time"].view.copy(),
                               "loss": self._cols["loss"].view.copy()})
            for g in range(max(lrs.shape[1], 1)):
                df["lr" if g == 0 else f"lr_{g}"] = lrs[:, g] if g < lrs.shape[1] else np.nan
            skipped = self._skipped.view
            df["grad_norm"] = self._cols["grad_norm"].view.copy()
            df["skipped"] = pd.array(np.where(skipped < 0, None, skipped == 1), dtype="boolean")
            df["loss_scale"] = self._cols["loss_scale"].view.copy()
            df["nonfinite"] = (flags & _NONFINITE) > 0
            df["eval_mode"] = (flags & EVAL_FORWARD) > 0
            df["grad_carried"] = (flags & GRAD_CARRIED) > 0
            return df

    def series_binned(self, column: str, bins: int = MAX_BINS) -> pd.DataFrame:
        """One steps column ("loss", "grad_norm", "lr", "lr_1", ..., "loss_scale") in at most `bins` rows.

        Columns: step (bin centre), step_lo, step_hi (inclusive), min, mean, max and n over the finite
        values, nonfinite (NaN/Inf count). A run of at most `bins` steps gets one row per step.
        """
        _check_bins(bins)
        with self._lock:
            key = ("series", column, bins)
            if key not in self._cache:
                values, bad = self._column(column)
                g = grid(self._step.view, None, bins)
                if g is None:
                    self._cache[key] = _empty(SERIES_COLUMNS)
                else:
                    st = self._binned(("series", column), g, self._step.view, values[None, :], bad[None, :])
                    self._cache[key] = _long(st, g, np.arange(1), None)[SERIES_COLUMNS]
            return self._cache[key].copy()

    def _column(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        flags = self._flags.view
        if column in ("loss", "grad_norm", "loss_scale"):
            v = self._cols[column].view
        elif (m := re.fullmatch(r"lr(?:_(\d+))?", column)) is not None:
            g = int(m.group(1) or 0)
            lrs = self._lrs.view
            v = lrs[:, g] if g < lrs.shape[1] else np.full(len(lrs), np.nan)
        else:
            raise GradwatchError(f"series_binned: column must be 'loss', 'grad_norm', 'lr', 'lr_<group>' or "
                                 f"'loss_scale', got column={column!r}")
        bad = np.isinf(v)
        flag = {"loss": LOSS_NONFINITE, "grad_norm": GRAD_NONFINITE}.get(column)
        if flag:  # a NaN is stored as NULL; the flag tells it from "not recorded"
            bad |= np.isnan(v) & (flags & flag > 0)
        return v, bad

    def layers(self, metric: str) -> list[str]:
        """The series names of `metric` (layers, or activation sites), in model order."""
        if metric not in METRIC_KIND:
            raise GradwatchError(f"layers: metric must be one of {sorted(METRIC_KIND)}, got metric={metric!r}")
        with self._lock:
            return list(self._series[METRIC_KIND[metric]])

    def metric_binned(self, metric: str, layers: list[str] | None = None, bins: int = MAX_BINS) -> pd.DataFrame:
        """Per-layer min/mean/max of `metric` over step bins, long form, layers in model order.

        Columns: layer, order (model order), step, step_lo, step_hi, min, mean, max, n, nonfinite (Inf
        count). NaN means "not measured" and is skipped; bins with no value are dropped.
        """
        _check_bins(bins)
        with self._lock:
            key = ("metric", metric, tuple(layers) if layers is not None else None, bins)
            if key not in self._cache:
                held = self._metric(metric)
                idx = self._layer_index(metric, layers)
                g = grid(self._step.view, held.steps.view, bins)
                if g is None or not len(idx):
                    self._cache[key] = _empty(METRIC_COLUMNS)
                else:  # every layer is reduced once and kept, so another choice of layers costs nothing
                    st = self._binned(("metric", metric), g, held.steps.view, held.values.view, None)
                    self._cache[key] = _long(st, g, idx, self._names(metric))[METRIC_COLUMNS]
            return self._cache[key].copy()

    def heatmap(self, metric: str = "grad_norm", bins: int = 200) -> pd.DataFrame:
        """Layers x step bins: value is the mean of the finite positive values, `inf` marks a bin with an Inf.

        step_lo..step_hi (inclusive) reach to the next measured bin, so a sparse metric tiles the time axis.
        """
        _check_bins(bins)
        with self._lock:
            key = ("heatmap", metric, bins)
            if key not in self._cache:
                held = self._metric(metric)
                g = grid(self._step.view, held.steps.view, bins)
                names = self._names(metric)
                if g is None or not len(names):
                    self._cache[key] = _empty(HEATMAP_COLUMNS)
                else:
                    st = self._binned(("heat", metric), g, held.steps.view, held.values.view, None)
                    self._cache[key] = _heat(st, g, names)
            return self._cache[key].copy()

    def _binned(self, key: tuple, g: tuple, steps: np.ndarray, v: np.ndarray, bad: np.ndarray | None) -> dict:
        """Reductions of held arrays over the grid `g`, from a rollup kept across refreshes."""
        first, _, width, w0 = g
        rollup = self._rollups.get(key)
        if (rollup is None or rollup.first != first or rollup.rows > len(steps)
                or rollup.base is not None and len(rollup.base["bad"]) != len(v)):  # new series: start over
            rollup = self._rollups[key] = Rollup(first, heat=key[0] == "heat")
        return rollup.binned(steps, v, bad, w0, width)

    def _names(self, metric: str) -> np.ndarray:
        names = self._series[METRIC_KIND[metric]]
        width = len(self._metrics[metric].values.view) if metric in self._metrics else len(names)
        return np.array(names + [f"#{i}" for i in range(len(names), width)], dtype=object)

    def _layer_index(self, metric: str, layers: list[str] | None) -> np.ndarray:
        names = self._series[METRIC_KIND[metric]]
        if layers is None:
            return np.arange(len(names))
        if isinstance(layers, str):
            raise GradwatchError(f"metric_binned: layers must be a list of names, got layers={layers!r}")
        where = {n: i for i, n in enumerate(names)}
        unknown = [n for n in layers if n not in where]
        if unknown:
            raise GradwatchError(f"metric_binned: {metric} has no series {unknown!r}; this run's are "
                                 f"{names[:10]!r}{' ...' if len(names) > 10 else ''}")
        return np.array(sorted(where[n] for n in dict.fromkeys(layers)), np.int64)

    def events(self) -> pd.DataFrame:
        """Non-finite onsets, like `Run.events`: step, kind, phase, module (the producer), rank, value, detail."""
        with self._lock:
            df = pd.DataFrame(self._events, columns=EVENT_COLUMNS)
        return df.sort_values("step", kind="stable").reset_index(drop=True)

    def findings(self) -> pd.DataFrame:
        """The live detectors' last stored findings, like `Run.findings`, worst first."""
        with self._lock:
            df = pd.DataFrame(self._findings_raw, columns=FINDING_COLUMNS)
        df["evidence"] = [json.loads(v) if v else {} for v in df["evidence"]]
        rank = df["severity"].map(SEVERITY_RANK).fillna(-1)
        return df.assign(_r=-rank).sort_values(["_r", "step"], kind="stable").drop(columns="_r").reset_index(drop=True)

    def markers(self) -> pd.DataFrame:
        """Steps to mark on the loss chart: NaN/Inf onsets (events), loss spikes (findings), and
        non-finite streaks that no event explains. Columns: step, kind, label."""
        with self._lock:
            out = [(int(s), "nan_inf", _event_label(k, p, m)) for s, k, p, m, *_ in self._events[:MAX_MARKERS]]
            spikes = [f for f in self._findings_raw if f[0] == "loss_spike"]
            out += [(int(f[2]), "loss_spike", f"loss spike ({f[3]}): {f[4]}") for f in spikes[:MAX_MARKERS]]
            evented = {s for s, *_ in self._events}
            bad = (self._flags.view & _NONFINITE) > 0
            steps = self._step.view
            onsets = np.flatnonzero(bad & ~np.r_[False, bad[:-1]])
            ends = np.flatnonzero(bad & ~np.r_[bad[1:], False])
            kept = [(a, b) for a, b in zip(onsets, ends) if int(steps[a]) not in evented][:MAX_MARKERS]
            out += [(int(steps[a]), "nonfinite", f"non-finite values at steps {steps[a]}-{steps[b]} "
                     f"({b - a + 1} recorded steps)" if b > a else f"non-finite values at step {steps[a]}")
                    for a, b in kept]
        return pd.DataFrame(sorted(out), columns=MARKER_COLUMNS)

    def __repr__(self) -> str:
        return f"RunView({str(self.path)!r}, status={self.status!r}, steps={self.n_steps})"


def _check_bins(bins) -> None:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise GradwatchError(f"bins must be a positive int, got bins={bins!r}")


def _long(st: dict, g: tuple, idx: np.ndarray, names: np.ndarray | None) -> pd.DataFrame:
    """Long frame over the columns `idx` and their bins (one column's bins, then the next's), empty bins out."""
    first, last, width, _ = g
    lo, hi = edges(st["b"], first, last, width)
    n, bad = st["n"][idx], st["bad"][idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, st["sum"][idx] / np.maximum(n, 1), np.nan)
    k, nb = len(idx), len(lo)
    df = pd.DataFrame({
        "order": np.repeat(idx, nb), "step": np.tile((lo + hi) / 2, k), "step_lo": np.tile(lo, k),
        "step_hi": np.tile(hi, k), "min": st["min"][idx].ravel().astype(np.float64), "mean": mean.ravel(),
        "max": st["max"][idx].ravel().astype(np.float64), "n": n.ravel().astype(np.int64),
        "nonfinite": bad.ravel().astype(np.int64),
    })[((n > 0) | (bad > 0)).ravel()]
    if names is not None:
        df.insert(0, "layer", names[df["order"].to_numpy()])
    return df.reset_index(drop=True)


def _heat(st: dict, g: tuple, names: np.ndarray) -> pd.DataFrame:
    first, last, width, _ = g
    lo, hi = edges(st["b"], first, last, width)
    hi = np.r_[lo[1:] - 1, hi[-1:]]  # each cell reaches the next measured bin
    n, inf = st["pos_n"], st["bad"] > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(n > 0, st["pos_sum"] / np.maximum(n, 1), np.nan)
    k, nb = len(n), len(lo)
    order = np.repeat(np.arange(k), nb)
    df = pd.DataFrame({"layer": names[order], "order": order, "step_lo": np.tile(lo, k), "step_hi": np.tile(hi, k),
                       "value": value.ravel(), "inf": inf.ravel()})
    return df[((n > 0) | inf).ravel()].reset_index(drop=True)


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object if c in ("layer", "kind", "label") else float)
                         for c in columns})


def _parse_lrs(col) -> np.ndarray:
    """The JSON lists of learning rates as a steps x groups matrix (NaN where a group has none)."""
    memo: dict = {}  # a constant or stepwise schedule repeats the same strings
    lists = [memo[s] if s in memo else memo.setdefault(s, json.loads(s) if s else []) for s in col]
    width = max((len(v) for v in lists), default=0)
    if all(len(v) == width for v in lists):  # the usual case; None (a group without lr) -> NaN
        try:
            return np.array(lists, np.float64).reshape(len(lists), width)
        except (TypeError, ValueError):
            pass
    out = np.full((len(lists), width), np.nan)
    for i, v in enumerate(lists):
        for g, x in enumerate(v):
            if isinstance(x, (int, float)):  # anything else (a string a scheduler left) reads as NaN
                out[i, g] = x
    return out


def _event_label(kind: str, phase: str, module: str) -> str:
    what = {"nan": "NaN", "inf": "Inf"}.get(kind, kind)
    if phase == "loss" or not module:
        return f"{what} in the loss"
    return f"{what} first produced by {module} ({phase})"


# ---- many runs -----------------------------------------------------------------------------------------
def _root(runs_dir, caller: str) -> Path:
    if not isinstance(runs_dir, (str, os.PathLike)):
        raise TypeError(f"{caller}: runs_dir must be a path (str or os.PathLike), got {type(runs_dir).__name__}")
    root = Path(runs_dir)
    if not root.is_dir():
        raise GradwatchError(f"{caller}: runs_dir={str(runs_dir)!r} is not a folder; pass the folder that "
                             "holds your run directories, e.g. 'runs'.")
    return root


def list_run_dirs(runs_dir: str | os.PathLike) -> list[Path]:
    """Run folders under `runs_dir`: itself, its children and grandchildren, sorted.

    A folder or database reached through a symlink that leads outside `runs_dir` is left out.
    """
    root = _root(runs_dir, "list_run_dirs")
    real = root.resolve()
    dbs = sorted({*root.glob(DB_NAME), *root.glob(f"*/{DB_NAME}"), *root.glob(f"*/*/{DB_NAME}")})
    return [db.parent for db in dbs if _inside(db, real) and _inside(db.parent, real)]


def _inside(path: Path, real_root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(real_root)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _run_name(root: Path, run: Path) -> str:
    return run.relative_to(root).as_posix()  # "." for runs_dir itself


def safe_run_path(runs_dir: str | os.PathLike, name: str) -> Path:
    """The folder of the run called `name` (as `overview()` names it), checked to be a listed run.

    Raises:
        GradwatchError: `name` is absolute, climbs out with "..", or is not a run under `runs_dir`.
    """
    root = _root(runs_dir, "safe_run_path")
    if not isinstance(name, str) or not name or "\x00" in name:
        raise GradwatchError(f"safe_run_path: name must be a run name such as 'exp1/run3', got name={name!r}")
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise GradwatchError(f"safe_run_path: name={name!r} is an absolute path; pass a run name relative to "
                             f"runs_dir={str(runs_dir)!r}")
    if ".." in posix.parts:
        raise GradwatchError(f"safe_run_path: name={name!r} climbs out of runs_dir with '..'; pass a run name "
                             "as overview() lists it")
    runs = {_run_name(root, d): d for d in list_run_dirs(root)}
    if str(posix) not in runs:
        raise GradwatchError(f"safe_run_path: no run named {name!r} under runs_dir={str(runs_dir)!r}; runs there: "
                             f"{sorted(runs)[:10]!r}")
    return runs[str(posix)]


OVERVIEW_COLUMNS = ["run", "path", "status", "steps", "last_step", "started", "updated", "model", "health",
                    "findings", "error"]


def overview(runs_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per run under `runs_dir`, with its health from the stored live findings.

    health: "critical" / "warning" when a stored finding has that severity, "healthy" when the live
    detectors ran and found nothing at warning or above, "unknown" when they never ran or the store is
    unreadable (`error` then says why). findings: how many stored findings are warning or worse.
    """
    root = _root(runs_dir, "overview")
    return pd.DataFrame([_overview_row(root, d) for d in list_run_dirs(root)], columns=OVERVIEW_COLUMNS)


def _overview_row(root: Path, run: Path) -> dict:
    row = {"run": _run_name(root, run), "path": str(run), "status": "unreadable", "steps": None,
           "last_step": None, "started": pd.NaT, "updated": pd.NaT, "model": None, "health": "unknown",
           "findings": 0, "error": ""}
    try:
        conn = _connect(run / DB_NAME)
        try:
            conn.execute("BEGIN")
            raw = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            n, last = conn.execute("SELECT COUNT(*), MAX(step) FROM steps").fetchone()
            tables = {t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            sev = [s for (s,) in conn.execute("SELECT severity FROM findings")] if "findings" in tables else []
        finally:
            conn.close()
        meta = {k: json.loads(v) for k, v in raw.items()}
    except (sqlite3.DatabaseError, ValueError) as e:
        return {**row, "error": f"cannot read {DB_NAME} ({e}); it may be truncated or not a gradwatch store"}
    if meta.get("schema_version") != SCHEMA_VERSION:
        return {**row, "error": f"written with store schema {meta.get('schema_version')!r}; this gradwatch "
                                f"reads schema {SCHEMA_VERSION}"}
    worst = max((SEVERITY_RANK.get(s, -1) for s in sev), default=-1)
    detectors_on = bool((meta.get("config") or {}).get("detect_every", 0))
    if worst >= SEVERITY_RANK["warning"]:
        health = "critical" if worst >= SEVERITY_RANK["critical"] else "warning"
    else:
        health = "healthy" if (sev or detectors_on) and n else "unknown"
    ts = lambda k: pd.to_datetime(meta[k], unit="s") if isinstance(meta.get(k), (int, float)) else pd.NaT
    return {**row, "status": _live_status(raw.items()), "steps": n, "last_step": last, "started": ts("start_time"),
            "updated": ts("updated_at"), "model": (meta.get("model") or {}).get("class"), "health": health,
            "findings": sum(SEVERITY_RANK.get(s, -1) >= SEVERITY_RANK["warning"] for s in sev)}
