"""gradwatch: per-layer training diagnostics for PyTorch.

`load_run` and `list_runs` never import torch; `watch` imports it on first use.
"""
__version__ = "0.1.0"

from .errors import GradwatchError, GradwatchWarning
from .store.reader import Run, list_runs, load_run

__all__ = ["GradwatchError", "GradwatchWarning", "Run", "WatchConfig", "Watcher", "list_runs", "load_run",
           "watch"]


def __getattr__(name):
    if name in ("watch", "Watcher"):
        from . import watcher

        return getattr(watcher, name)
    if name == "WatchConfig":
        from .config import WatchConfig

        return WatchConfig
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
