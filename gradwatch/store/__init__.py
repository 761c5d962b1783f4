"""The run store: one schema, a background writer, and a pandas reader that never imports torch."""
from .reader import Run, list_runs, load_run

__all__ = ["Run", "list_runs", "load_run"]
