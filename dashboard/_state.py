"""What every page shares: the runs folder, run names checked into paths, cached live views, the error guard,
and the badges and number formats that make a sick run obvious at a glance."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import streamlit as st

from gradwatch.errors import GradwatchError
from gradwatch.query import RunView, safe_run_path
from gradwatch.store.schema import DB_NAME

RUNS_ENV = "GRADWATCH_RUNS_DIR"  # where the app looks when it was not started as `streamlit run app.py -- DIR`
APP = Path(__file__).resolve().parent / "app.py"
LIVE_EVERY = 2.0  # seconds between refreshes of an open page over a running run
OVERVIEW_EVERY = 5.0  # seconds between refreshes of the runs overview (new runs, statuses, steps)

_log = logging.getLogger("gradwatch.dashboard")


def runs_dir() -> Path:
    """RUNS_DIR: `streamlit run app.py -- RUNS_DIR` leaves sys.argv == [app.py, RUNS_DIR]; else $GRADWATCH_RUNS_DIR."""
    argv = sys.argv
    if len(argv) > 1 and argv[0] and Path(argv[0]).resolve() == APP:
        return Path(argv[1])
    return Path(os.environ.get(RUNS_ENV, "runs"))


def check_runs_dir(root: Path) -> bool:
    """Say on the page what is wrong with RUNS_DIR (missing, or a file); True when it can be listed."""
    if not root.exists():
        st.error(f"The runs folder `{root}` does not exist (any more). Start the dashboard on the folder that "
                 "holds your runs: `gradwatch dashboard runs`.", icon=":material/folder_off:")
        return False
    if not root.is_dir():
        st.error(f"`{root}` is a file, not a folder of runs. Start the dashboard on the folder that holds your "
                 "runs: `gradwatch dashboard runs`.", icon=":material/folder_off:")
        return False
    return True


NO_RUNS_HELP = ("No runs yet under `{root}`. Record one with\n\n"
                "```python\ngw = gradwatch.watch(model, optimizer=opt, run_dir=\"{root}/exp1\")\n```\n\n"
                "and call `gw.step(loss)` after each optimizer step (or run `gradwatch demo`). "
                "This page picks new runs up by itself.")


def one_line(e: BaseException) -> str:
    """An exception as one line for the page: its message's first line, without a traceback."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= 400 else text[:397] + "..."
    return text if isinstance(e, GradwatchError) else f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def guard(what: str) -> Iterator[None]:
    """Turn any error in the body into one `st.error` line (Streamlit's own rerun/stop signals pass through)."""
    try:
        yield
    except GradwatchError as e:
        st.error(one_line(e), icon=":material/error:")
    except Exception as e:
        _log.exception("dashboard: %s failed", what)  # the traceback goes to the server log, not the page
        st.error(f"{what} failed: {one_line(e)}", icon=":material/error:")


def run_path(name: str | None) -> Path:
    """A run name from the URL or a widget, checked to be a run inside RUNS_DIR (GradwatchError otherwise)."""
    if not name or not isinstance(name, str):
        raise GradwatchError("no run selected: pick one on the Runs page.")
    return safe_run_path(runs_dir(), name)


class _Cached:
    """A RunView shared by every session (st.cache_resource), locked while one page draws from it, so that a
    refresh by another session cannot change the data between two of its charts."""

    def __init__(self, path: str):
        self.view = RunView(path)
        self.lock = threading.Lock()


# A view holds its run's steps and every metric read so far (about 40 MB per metric for 100k steps x 100
# layers), so only the runs opened last stay in memory.
@st.cache_resource(max_entries=12, show_spinner=False)
def _cached(path: str, identity: tuple[int, int]) -> _Cached:
    return _Cached(path)


def _identity(path: Path) -> tuple[int, int]:
    """Which database file the run folder holds now: a run recorded again over the same folder is a new file."""
    if not path.is_dir():
        raise GradwatchError(f"run {path.name!r} is gone: its folder was deleted or moved. "
                             "Pick another run on the Runs page.")
    try:
        st_ = (path / DB_NAME).stat()
    except FileNotFoundError:
        raise GradwatchError(f"run {path.name!r} holds no {DB_NAME} (yet, or any more): it was never "
                             "recorded or is being deleted. Pick another run on the Runs page.") from None
    return st_.st_dev, st_.st_ino


@contextlib.contextmanager
def open_view(path: Path, refresh: bool = True) -> Iterator[RunView]:
    """The run's cached view, brought up to date (only new rows are read) and held locked while in use."""
    cached = _cached(str(path), _identity(path))
    with cached.lock:
        if refresh:
            try:
                cached.view.refresh()
            except GradwatchError:
                raise
            except Exception as e:  # e.g. an OSError of a file deleted under us
                _identity(path)  # a deleted run says so in its own words
                raise GradwatchError(f"run {path.name!r} could not be read: {one_line(e)}") from None
        yield cached.view


# ---- badges and formats -------------------------------------------------------------------------------------
STATUS_COLOR = {"running": "blue", "finished": "green", "crashed": "red"}
STATUS_ICON = {"running": ":material/autorenew:", "finished": ":material/check_circle:",
               "crashed": ":material/dangerous:"}
HEALTH_COLOR = {"critical": "red", "warning": "orange", "healthy": "green", "info": "green"}
SEVERITY_ICON = {"critical": ":material/error:", "warning": ":material/warning:", "info": ":material/info:"}


def health_of(value) -> str:
    """One of critical / warning / healthy / unknown (what `query.overview()` calls a run's health)."""
    text = str(value or "").lower()
    return text if text in ("critical", "warning", "healthy") else "unknown"


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+\-.!|~:$])")


def md_escape(text: str) -> str:
    """`text` (a run or layer name) shown literally inside Streamlit Markdown."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def badge(label: str, color: str, icon: str | None = None) -> str:
    """Inline Markdown badge (several fit on one line, unlike st.badge)."""
    label = label.replace("[", "(").replace("]", ")")
    return f":{color}-badge[{icon + ' ' if icon else ''}{label}]"


def status_badge(status) -> str:
    status = str(status or "unknown")
    if status.startswith("unreadable"):
        return badge("unreadable", "red", ":material/broken_image:")
    return badge(status, STATUS_COLOR.get(status, "gray"), STATUS_ICON.get(status))


def health_badge(health, label: str | None = None) -> str:
    h = health_of(health)
    return badge(label or h, HEALTH_COLOR.get(h, "gray"), SEVERITY_ICON.get(h, ":material/favorite:")
                 if h != "unknown" else ":material/help:")


def fmt_num(v) -> str:
    """A number short enough for a header: 3 significant digits, scientific when tiny or huge."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, (int,)) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return f"{int(v):,}"
    return f"{v:.3g}"


def fmt_time(t) -> str:
    """A start or update time as 'YYYY-MM-DD HH:MM:SS' (UTC), or '–'."""
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "–"
    try:
        ts = pd.to_datetime(t, unit="s") if isinstance(t, (int, float)) else pd.Timestamp(t)
    except (ValueError, TypeError):
        return str(t)
    return "–" if pd.isna(ts) else ts.strftime("%Y-%m-%d %H:%M:%S")


def fmt_ago(t) -> str:
    """How long ago a time was, in words ('12 s ago', '3 min ago', '2 h ago')."""
    try:
        ts = pd.to_datetime(t, unit="s") if isinstance(t, (int, float)) else pd.Timestamp(t)
        secs = time.time() - ts.timestamp()
    except (ValueError, TypeError, AttributeError):
        return ""
    if math.isnan(secs):
        return ""
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= n:
            return f"{secs / n:.0f} {unit} ago"
    return f"{max(secs, 0):.0f} s ago"
