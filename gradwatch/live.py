"""Live diagnosis: run the detectors on the flushed data while training goes on.

A `Monitor` thread wakes every `detect_every` seconds, reads the run store through the ordinary reader
(its own read-only connection, so it never blocks the writer), runs every detector, and hands the result
to the writer as a snapshot of the `findings` table. Findings seen for the first time are queued for the
training thread, which logs them, passes them to `on_finding` and applies `halt_on` in `Watcher.step()`:
user code never runs on this thread.

Cost: a pass reads the whole run, so it grows with the run. The thread sleeps at least COST_RATIO times as
long as its last pass took, which keeps it under 1/COST_RATIO of one core (and of the GIL). A pass over a
small run takes about 0.1 s, so at the default `detect_every=5` it costs 2% of one core.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

from .detect import SEVERITY_RANK, Finding

log = logging.getLogger("gradwatch")
COST_RATIO = 20


class Monitor:
    def __init__(self, run_dir: Path, writer, every: float):
        self.run_dir, self._writer, self.every = run_dir, writer, every
        self.new: queue.Queue[Finding] = queue.Queue()  # first occurrences, for the training thread
        self.error: BaseException | None = None
        self._first_seen: dict[tuple, float] = {}
        self._announced: set[tuple] = set()
        self._lock = threading.Lock()  # one pass at a time: the thread's, or the final one in close()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradwatch-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait = self.every
        while not self._stop.wait(wait):
            start = time.monotonic()
            self.check()
            wait = max(self.every, COST_RATIO * (time.monotonic() - start))

    def check(self) -> list[Finding]:
        """One pass: diagnose the store as flushed so far, store the snapshot, queue what is new."""
        from .diagnosis import diagnose

        with self._lock:
            try:
                findings = diagnose(self.run_dir).findings
            except Exception as e:  # noqa: BLE001 - a failed pass must not stop training; the next may work
                self.error = self.error or e
                return []
            now = time.time()
            rows = []
            for f in findings:
                first = self._first_seen.setdefault(f.key, now)
                rows.append((f.kind, f.layer, f.step, f.severity, f.message, f.suggestion,
                             json.dumps(f.evidence, default=str), first))
                if _identity(f) not in self._announced:
                    self._announced.add(_identity(f))
                    self.new.put(f)
            self._writer.put_findings(rows)
            return findings

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _identity(f: Finding) -> tuple:
    """What makes a finding new: spikes and NaN onsets at other steps are new events; for the other kinds,
    the onset step is refined as data arrives, and the same kind in the same layer is the same problem."""
    return (f.kind, f.layer, f.step) if f.kind in ("loss_spike", "nan_inf") else (f.kind, f.layer)


def announce(f: Finding) -> None:
    """The one line a finding gets in the training log at its first occurrence."""
    level = logging.INFO if SEVERITY_RANK[f.severity] < SEVERITY_RANK["warning"] else logging.WARNING
    log.log(level, "gradwatch: %s", f.line())
