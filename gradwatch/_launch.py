"""`gradwatch dashboard`: find the Streamlit app that ships in the wheel and run it over a runs folder."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from .errors import GradwatchError

EXTRA_MISSING = 'gradwatch dashboard needs the dashboard extra: pip install "gradwatch[dashboard]"'
APP_PACKAGE = "gradwatch._dashboard"  # dashboard/ in the repo, mapped to this name in the wheel


def app_path() -> Path:
    """The dashboard's entry script, `app.py`, in an installed wheel, an editable install or a checkout.

    Raises:
        GradwatchError: when the app is not there (a broken install).
    """
    candidates = []
    try:
        spec = importlib.util.find_spec(APP_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "app.py" for p in spec.submodule_search_locations]
    # An editable install made before the package-dir mapping existed only maps gradwatch/ itself.
    candidates.append(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
    for path in candidates:
        if path.is_file():
            return path
    raise GradwatchError(f"dashboard: the app is missing from this install (looked for {APP_PACKAGE}/app.py); "
                         'reinstall with pip install --force-reinstall "gradwatch[dashboard]".')


def _has_extra() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("streamlit", "altair"))


def streamlit_command(runs_dir: str | os.PathLike, port: int = 8501, host: str = "127.0.0.1") -> list[str]:
    """The command line `launch_dashboard` runs (checked arguments, absolute RUNS_DIR)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise GradwatchError(f"dashboard: --port must be an int in 1..65535, got port={port!r}")
    if not isinstance(host, str) or not host.strip():
        raise GradwatchError(f"dashboard: --host must be an address such as 127.0.0.1, got host={host!r}")
    root = Path(runs_dir).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise GradwatchError(f"dashboard: RUNS_DIR={str(runs_dir)!r} {what}; pass the folder that holds your "
                             "runs (watch(run_dir='runs/exp1') writes under 'runs'), or try `gradwatch demo`.")
    return [sys.executable, "-m", "streamlit", "run", str(app_path()),
            "--server.address", host, "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false",
            # the installed app never changes, so watching its files would only cost CPU
            "--server.fileWatcherType", "none",
            "--client.toolbarMode", "minimal",  # no "Deploy" button or developer menu in a local tool
            "--", str(root.resolve())]


def launch_dashboard(runs_dir: str | os.PathLike = "runs", port: int = 8501, host: str = "127.0.0.1") -> int:
    """Run the dashboard over `runs_dir` until it is stopped (Ctrl+C).

    Args:
        runs_dir: the folder that holds the run directories (it must exist; it may be empty).
        port: the port to serve on.
        host: the address to bind; the default serves this machine only.

    Returns:
        Streamlit's exit status; 2 when the `dashboard` extra is not installed (after one line on stderr).

    Raises:
        GradwatchError: for a missing RUNS_DIR, a bad port or host, or a broken install.
    """
    if not _has_extra():
        print(EXTRA_MISSING, file=sys.stderr)
        return 2
    cmd = streamlit_command(runs_dir, port=port, host=host)
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl+C reached Streamlit too (same process group); let it shut down
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
