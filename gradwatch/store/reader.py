"""Read run stores into pandas frames: `load_run()` and `list_runs()`. Never imports torch."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import GradwatchError
from .schema import (
    DB_NAME,
    EVAL_FORWARD,
    FORWARD_NONFINITE,
    GRAD_CARRIED,
    GRAD_NONFINITE,
    LOSS_NONFINITE,
    METRIC_KIND,
    SCHEMA_VERSION,
)

STALE_AFTER_S = 600.0  # a "running" run not updated for this long, on another host, reads as crashed


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    conn.execute("PRAGMA query_only=1")
    return conn


class Run:
    """One run store, read lazily: each frame is loaded on first use and then kept."""

    def __init__(self, run_dir: Path):
        self.path = run_dir
        self.name = run_dir.name
        self._db = run_dir / DB_NAME
        _ = self.meta  # read now so that a bad store fails here, with a clear message

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            conn = _connect(self._db)
            try:
                return conn.execute(sql, args).fetchall()
            finally:
                conn.close()
        except sqlite3.DatabaseError as e:
            raise GradwatchError(
                f"load_run: {str(self.path)!r} holds a gradwatch.db that cannot be read ({e}); "
                "it may be truncated or not a gradwatch store. Check the file, or point at another run."
            ) from None

    @cached_property
    def meta(self) -> dict:
        """Run metadata: status, model summary, optimizer, versions, config, start time."""
        meta = {k: json.loads(v) for k, v in self._query("SELECT key, value FROM meta")}
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise GradwatchError(
                f"load_run: {str(self.path)!r} was written with store schema {version!r}, and this gradwatch "
                f"reads schema {SCHEMA_VERSION}. Read it with the gradwatch version that wrote it "
                f"({meta.get('gradwatch_version', 'unknown')}), or record the run again."
            )
        return meta

    @property
    def status(self) -> str:
        """"running", "finished" or "crashed" (a killed run, whose status was never closed, reads as crashed)."""
        return _live_status(self._query("SELECT key, value FROM meta WHERE key IN "
                                        "('status', 'pid', 'host', 'updated_at')"))

    @cached_property
    def series(self) -> pd.DataFrame:
        rows = self._query("SELECT kind, idx, name, module_type, size FROM series ORDER BY kind, idx")
        return pd.DataFrame(rows, columns=["kind", "idx", "name", "module_type", "size"])

    @cached_property
    def steps(self) -> pd.DataFrame:
        """One row per recorded optimizer step."""
        rows = self._query("SELECT step, time, loss, grad_norm, lrs, skipped, loss_scale, flags "
                           "FROM steps ORDER BY step")
        df = pd.DataFrame(rows, columns=["step", "time", "loss", "grad_norm", "lrs", "skipped",
                                         "loss_scale", "flags"])
        flags = df["flags"].fillna(0).astype(int)
        df["loss"] = df["loss"].astype(float)  # NULL (no loss, or NaN) reads as NaN; Inf is kept
        df["grad_norm"] = df["grad_norm"].astype(float)
        df["loss_scale"] = df["loss_scale"].astype(float)
        df["skipped"] = df["skipped"].astype("boolean")
        df["nonfinite"] = (flags & (LOSS_NONFINITE | GRAD_NONFINITE | FORWARD_NONFINITE)) > 0
        df["eval_mode"] = (flags & EVAL_FORWARD) > 0
        df["grad_carried"] = (flags & GRAD_CARRIED) > 0
        lrs = [json.loads(v) if v else [] for v in df["lrs"]]
        width = max((len(v) for v in lrs), default=0)
        for g in range(max(width, 1)):
            df["lr" if g == 0 else f"lr_{g}"] = [v[g] if g < len(v) and v[g] is not None else np.nan
                                                 for v in lrs]
        cols = ["step", "time", "loss", "lr"] + [f"lr_{g}" for g in range(1, width)]
        return df[cols + ["grad_norm", "skipped", "loss_scale", "nonfinite", "eval_mode", "grad_carried"]]

    @property
    def metric_names(self) -> set[str]:
        """The metrics this run recorded at least once (re-read on each access)."""
        return {m for (m,) in self._query("SELECT DISTINCT metric FROM metric_values")}

    def wide(self, metric: str) -> pd.DataFrame:
        """One metric as a steps x layers frame (index: step; columns: layer names in model order)."""
        if metric not in METRIC_KIND:
            raise GradwatchError(f"wide: metric must be one of {sorted(METRIC_KIND)}, got metric={metric!r}")
        names = self.series.loc[self.series["kind"] == METRIC_KIND[metric], "name"].tolist()
        rows = self._query("SELECT step, data FROM metric_values WHERE metric = ? ORDER BY step", (metric,))
        mat = decode_vectors([blob for _, blob in rows], len(names))
        return pd.DataFrame(mat, index=pd.Index([s for s, _ in rows], name="step"), columns=names)

    @cached_property
    def layers(self) -> pd.DataFrame:
        """Long form: step, layer, metric, value. Unmeasured values (NaN) have no row."""
        frames = []
        present = self.metric_names
        order = self.series["name"].drop_duplicates().tolist()
        for metric in sorted(present, key=list(METRIC_KIND).index):
            w = self.wide(metric)
            vals = w.to_numpy()
            keep = ~np.isnan(vals)
            steps = np.broadcast_to(w.index.to_numpy()[:, None], vals.shape)[keep]
            layer = np.broadcast_to(np.arange(vals.shape[1])[None, :], vals.shape)[keep]
            codes = np.array([order.index(n) for n in w.columns], dtype=np.int64)[layer]
            frames.append(pd.DataFrame({
                "step": steps.astype(np.int64),
                "layer": pd.Categorical.from_codes(codes, categories=order),
                "metric": metric,
                "value": vals[keep].astype(np.float64),
            }))
        if not frames:
            return pd.DataFrame({"step": pd.Series(dtype=np.int64), "layer": pd.Series(dtype=object),
                                 "metric": pd.Series(dtype=object), "value": pd.Series(dtype=float)})
        return pd.concat(frames, ignore_index=True)

    @cached_property
    def events(self) -> pd.DataFrame:
        """Non-finite onsets: step, kind ("nan"/"inf"), phase, module (the producer), rank, value, detail."""
        rows = self._query("SELECT step, kind, phase, module, rank, value, detail FROM events ORDER BY step, id")
        return pd.DataFrame(rows, columns=["step", "kind", "phase", "module", "rank", "value", "detail"])

    @property
    def findings(self) -> pd.DataFrame:
        """The findings the live detectors last wrote while the run trained (re-read on each access).

        `gradwatch.diagnose(run)` computes them afresh from the frames; this is what the run itself saw.
        """
        cols = ["kind", "layer", "step", "severity", "message", "suggestion", "evidence", "first_seen"]
        try:
            rows = self._query(f"SELECT {', '.join(cols)} FROM findings ORDER BY step")
        except GradwatchError:
            if "findings" in self._tables():
                raise
            rows = []  # written before the findings table existed
        df = pd.DataFrame(rows, columns=cols)
        df["evidence"] = [json.loads(v) if v else {} for v in df["evidence"]]
        return df

    def _tables(self) -> set[str]:
        return {name for (name,) in self._query("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r}, steps={len(self.steps)})"


def decode_vectors(blobs: list[bytes], width: int) -> np.ndarray:
    """`metric_values.data` blobs as a (rows, width) float32 matrix.

    Rows whose vector is shorter (activation sites first seen later in the run) are padded with NaN, "not
    measured"; the usual case, every row full width, is one copy with no Python loop.
    """
    if blobs and all(len(b) == 4 * width for b in blobs):
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), width).astype(np.float32)
    mat = np.full((len(blobs), width), np.nan, dtype=np.float32)
    for i, b in enumerate(blobs):
        v = np.frombuffer(b, dtype="<f4")[:width]
        mat[i, : len(v)] = v
    return mat


def load_run(run_dir: str | os.PathLike) -> Run:
    """Open a run written by `gradwatch.watch()`.

    Args:
        run_dir: the folder given to `watch(run_dir=...)`.

    Returns:
        A `Run` with pandas frames `steps`, `layers` (long: step, layer, metric, value), `events`, and
        the dict `meta`. Works while the run is still being written.
    """
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"load_run: run_dir must be a path (str or os.PathLike), got {type(run_dir).__name__}")
    path = Path(run_dir)
    if not path.is_dir():
        raise GradwatchError(f"load_run: run_dir={str(run_dir)!r} is not a folder. Pass the folder that "
                             "gradwatch.watch(run_dir=...) wrote; gradwatch.list_runs('runs') lists runs.")
    if not (path / DB_NAME).is_file():
        raise GradwatchError(f"load_run: run_dir={str(run_dir)!r} holds no gradwatch run (no {DB_NAME}). "
                             "Pass a folder that gradwatch.watch() wrote; gradwatch.list_runs(...) lists them.")
    return Run(path)


def list_runs(runs_dir: str | os.PathLike = "runs") -> pd.DataFrame:
    """Every run under `runs_dir` (the folder itself and its sub-folders, two levels down).

    Returns:
        One row per run: run, path, status, steps, last_step, started, updated, model.
    """
    if not isinstance(runs_dir, (str, os.PathLike)):
        raise TypeError(f"list_runs: runs_dir must be a path (str or os.PathLike), got runs_dir={runs_dir!r} "
                        f"({type(runs_dir).__name__})")
    root = Path(runs_dir)
    if not root.is_dir():
        raise GradwatchError(f"list_runs: runs_dir={str(runs_dir)!r} is not a folder; pass the folder that "
                             "holds your run directories, e.g. 'runs'.")
    dbs = sorted({*root.glob(DB_NAME), *root.glob(f"*/{DB_NAME}"), *root.glob(f"*/*/{DB_NAME}")})
    out = []
    for db in dbs:
        run = db.parent
        try:
            conn = _connect(db)
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                n, last = conn.execute("SELECT COUNT(*), MAX(step) FROM steps").fetchone()
            finally:
                conn.close()
        except sqlite3.DatabaseError as e:
            out.append({"run": run.name, "path": str(run), "status": f"unreadable: {e}"})
            continue
        model = json.loads(meta.get("model", "{}")) or {}
        out.append({"run": str(run.relative_to(root)) if run != root else run.name, "path": str(run),
                    "status": _live_status(meta.items()), "steps": n, "last_step": last,
                    "started": _ts(meta.get("start_time")), "updated": _ts(meta.get("updated_at")),
                    "model": model.get("class")})
    cols = ["run", "path", "status", "steps", "last_step", "started", "updated", "model"]
    return pd.DataFrame(out, columns=cols)


def _ts(value: str | None):
    return pd.to_datetime(json.loads(value), unit="s") if value else pd.NaT


def _live_status(items) -> str:
    meta = {k: json.loads(v) for k, v in items}
    status = meta.get("status", "unknown")
    if status != "running":
        return status
    pid, host = meta.get("pid"), meta.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "crashed"
        except PermissionError:
            pass
        return "running"
    updated = meta.get("updated_at") or meta.get("start_time") or 0
    return "crashed" if time.time() - updated > STALE_AFTER_S else "running"
