"""gradwatch: per-layer training diagnostics for PyTorch.

Everything but the errors is imported on first use: `watch` brings in torch, and `load_run`/`list_runs`
bring in pandas but never torch, so neither pays for the other.
"""
__version__ = "0.1.0"

from .errors import GradwatchError, GradwatchHalt, GradwatchWarning

__all__ = ["Finding", "GradwatchError", "GradwatchHalt", "GradwatchWarning", "Report", "Run", "WatchConfig", "Watcher",
           "diagnose", "list_runs", "load_run", "watch"]

_LAZY = {"watch": "watcher", "Watcher": "watcher", "WatchConfig": "config",
         "load_run": "store.reader", "list_runs": "store.reader", "Run": "store.reader",
         "diagnose": "diagnosis", "Report": "diagnosis", "Finding": "detect"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


def __dir__():
    return sorted(__all__ + ["__version__"])
