"""The store writer: a background thread that commits batches to SQLite, off the training thread.

The training thread only puts items on a queue. An item is a `Rows` or anything with a `rows()` method
that returns one (a flushed chunk turns device tensors into rows there, so the copy's wait, if any, is
paid on this thread). Everything queued by the time the thread wakes goes into one transaction.
"""
from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .schema import DB_NAME, DDL, PRAGMAS_WRITER, SCHEMA_VERSION

MAX_PENDING = 256  # batches kept for retry while the store cannot be written; older ones are dropped


@dataclass
class Rows:
    """Rows for each table; `meta` values are JSON-encoded on write."""

    meta: dict = field(default_factory=dict)
    series: list[tuple] = field(default_factory=list)  # (kind, idx, name, module_type, size)
    steps: list[tuple] = field(default_factory=list)  # (step, time, loss, grad_norm, lrs, skipped, scale, flags)
    values: list[tuple] = field(default_factory=list)  # (metric, step, float32 bytes)
    events: list[tuple] = field(default_factory=list)  # (step, kind, phase, module, rank, value, detail)
    # None: unchanged; a list replaces the whole table: (kind, layer, step, severity, message, suggestion,
    # evidence JSON, first_seen)
    findings: list[tuple] | None = None

    def extend(self, other: Rows) -> None:
        self.meta.update(other.meta)
        for name in ("series", "steps", "values", "events"):
            getattr(self, name).extend(getattr(other, name))
        if other.findings is not None:
            self.findings = other.findings


def create_store(run_dir: Path, meta: dict) -> sqlite3.Connection:
    """Create the database and write its first meta rows, on the caller's thread, so errors surface now."""
    conn = sqlite3.connect(run_dir / DB_NAME, check_same_thread=False, isolation_level=None)
    for pragma in PRAGMAS_WRITER:
        conn.execute(pragma)
    with conn:
        conn.execute("BEGIN")
        for statement in _statements(DDL):
            conn.execute(statement)
        _write(conn, Rows(meta={"schema_version": SCHEMA_VERSION, **meta}))
    return conn


def _statements(ddl: str) -> list[str]:
    return [s.strip() for s in ddl.split(";") if s.strip()]


def _write(conn: sqlite3.Connection, rows: Rows) -> None:
    if rows.meta:
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                         [(k, json.dumps(v, default=str)) for k, v in rows.meta.items()])
    if rows.series:
        conn.executemany("INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?)", rows.series)
    if rows.steps:
        conn.executemany("INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows.steps)
    if rows.values:
        conn.executemany("INSERT OR REPLACE INTO metric_values VALUES (?, ?, ?)", rows.values)
    if rows.events:
        conn.executemany("INSERT INTO events (step, kind, phase, module, rank, value, detail) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", rows.events)
    if rows.findings is not None:
        conn.execute("DELETE FROM findings")
        conn.executemany("INSERT OR REPLACE INTO findings VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows.findings)


class Writer:
    """Owns the connection after `create_store`; `put()` never blocks and never raises."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[Rows] = []
        self.error: BaseException | None = None  # the first failure; the Watcher warns about it once
        self.dropped = 0  # batches lost after MAX_PENDING failed retries
        self._thread = threading.Thread(target=self._run, name="gradwatch-writer", daemon=True)
        self._thread.start()

    def put(self, item) -> None:
        self._queue.put(item)

    def put_findings(self, rows: list[tuple]) -> None:
        """Replace the findings table with `rows` in the next transaction."""
        self._queue.put(Rows(findings=rows))

    def wait(self, timeout: float = 60.0) -> bool:
        """Block until everything put so far is committed (or failed). False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and self._thread.is_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def close(self, final: Rows | None = None, timeout: float = 60.0) -> None:
        if final is not None:
            self.put(final)
        self._queue.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            try:
                self._conn.close()
            except sqlite3.Error:
                pass

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:  # everything already queued joins this transaction
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(it is None for it in items)
            batch = Rows(meta={"updated_at": time.time()})
            for it in items:
                if it is not None:
                    self._collect(batch, it)
            self._commit(batch)
            for _ in items:
                self._queue.task_done()
            if stop:
                return

    def _collect(self, batch: Rows, item) -> None:
        try:
            batch.extend(item if isinstance(item, Rows) else item.rows())
        except Exception as e:  # noqa: BLE001 - a bad chunk must not stop the writer
            self.error = self.error or e

    def _commit(self, batch: Rows) -> None:
        self._pending.append(batch)
        try:
            with self._conn:
                self._conn.execute("BEGIN")
                for rows in self._pending:
                    _write(self._conn, rows)
            self._pending.clear()
        except (sqlite3.Error, OSError) as e:
            self.error = self.error or e
            if len(self._pending) > MAX_PENDING:
                self.dropped += len(self._pending) - MAX_PENDING
                del self._pending[:-MAX_PENDING]


class NullWriter:
    """What a rank other than 0 writes to in a distributed run: nothing. Same surface as `Writer`."""

    error: BaseException | None = None
    dropped = 0

    def put(self, item) -> None:
        pass

    def put_findings(self, rows: list[tuple]) -> None:
        pass

    def wait(self, timeout: float = 60.0) -> bool:
        return True

    def close(self, final: Rows | None = None, timeout: float = 60.0) -> None:
        pass
