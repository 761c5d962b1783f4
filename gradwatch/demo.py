"""`gradwatch demo`: train five small runs, one healthy and four with a planted bug, and show what gradwatch says.

Each run is a labelled scenario from `gradwatch.scenarios` (about half a second each on one CPU thread), written
under `runs_dir` with a name a newcomer can read. The demo prints every run's health summary and its worst
finding with the fix, then opens the dashboard on the same folder.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

# run folder -> scenario; the folder named "healthy" must come out clean, every other one flagged
DEMO_RUNS: dict[str, str] = {
    "healthy": "healthy_mlp",
    "exploding": "exploding_gradients",
    "vanishing": "vanishing_gradients",
    "dead_relu": "dead_relu",
    "nan": "nan_inf",
}
_WIDTH = 100  # wrap long finding messages for an ordinary terminal


def run_demo(runs_dir: str | os.PathLike = "runs/demo", dashboard: bool = True, port: int = 8501,
             host: str = "127.0.0.1") -> int:
    """Train the demo runs into `runs_dir`, print what gradwatch found in each, and open the dashboard.

    Re-running replaces the demo's own runs (`overwrite=True` on those five folders) and leaves anything
    else in `runs_dir` alone.

    Args:
        runs_dir: folder for the runs, one sub-folder per run.
        dashboard: open the dashboard on `runs_dir` when the runs are done; False for CI.
        port: the dashboard's port.
        host: the address the dashboard binds to.

    Returns:
        The exit status: 0 when every run came out as labelled (and the dashboard, if opened, exited
        cleanly), 1 when one did not.
    """
    from .diagnosis import diagnose
    from .scenarios import SCENARIOS, run_scenario

    root = Path(runs_dir)
    print(f"gradwatch demo: training {len(DEMO_RUNS)} small runs into {root}/ "
          f"(one healthy, {len(DEMO_RUNS) - 1} with a planted bug)", flush=True)
    progress = _Progress(len(DEMO_RUNS))
    with _quiet_live_log():
        for i, (run, scenario) in enumerate(DEMO_RUNS.items()):
            progress.show(i, f"training {run}")
            run_scenario(scenario, root / run, overwrite=True)
        progress.show(len(DEMO_RUNS), "done")
    progress.close()
    print()
    surprises = []
    for run, scenario in DEMO_RUNS.items():
        report = diagnose(root / run)
        _print_run(report, SCENARIOS[scenario].description)
        expected = {e.kind for e in SCENARIOS[scenario].expect}
        found = {f.kind for f in report.at_least("warning")}
        if (not expected and found) or not expected <= found:
            surprises.append(f"{run}: expected {sorted(expected) or 'no finding'}, found {sorted(found) or 'none'}")
    for s in surprises:
        print(f"gradwatch demo: unexpected result, please report it: {s}", file=sys.stderr)
    print(f"Full report of a run:  gradwatch report {root / 'exploding'} -o exploding.html")
    print(f"The dashboard later:   gradwatch dashboard {root}")
    status = 1 if surprises else 0
    if not dashboard:
        return status
    print(f"Opening the dashboard on http://{host}:{port} (Ctrl+C to stop)", flush=True)
    from ._launch import launch_dashboard  # the app's launcher needs the [dashboard] extra; only now

    return launch_dashboard(str(root), port=port, host=host) or status


def _print_run(report, planted: str) -> None:
    """The run's one-line summary, what was planted, and its worst finding with the fix."""
    print(report.summary())
    _field("planted", planted.removeprefix("healthy: ") if report.healthy else planted)
    if report.healthy:
        _field("found", "no warning or critical finding: this is what a healthy run looks like")
    else:
        top = report.findings[0]  # worst first
        where = f" in {top.layer}" if top.layer else ""
        _field("found", f"[{top.severity}] {top.kind}{where} at step {top.step}: {top.message}")
        _field("fix", top.suggestion)
    print()


def _field(label: str, text: str) -> None:
    print(textwrap.fill(text, _WIDTH, initial_indent=f"  {label + ':':<9}", subsequent_indent=" " * 11))


@contextlib.contextmanager
def _quiet_live_log():
    """Hush the live monitor's one log line per finding while the demo trains: the summaries say it all.
    Errors still get through."""
    logger = logging.getLogger("gradwatch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Progress:
    """A one-line progress bar on stderr, redrawn in place on a terminal, one line per update otherwise."""

    def __init__(self, total: int, width: int = 20):
        self.total, self.width, self.start = total, width, time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last = 0

    def show(self, done: int, label: str) -> None:
        filled = self.width * done // self.total
        line = (f"  [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {label:<20}"
                f" {time.monotonic() - self.start:5.1f} s")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self._last))
            self._last = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
