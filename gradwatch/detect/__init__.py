"""Detectors: pure functions from a run's frames to findings. No torch, no disk, no clock.

Each kind of problem has its own module here with one function `detect(frames) -> list[Finding]`,
registered with `@detector`. Thresholds live in the module's docstring with where they come from.
`run_detectors()` runs them all; a detector that fails on frames it did not expect is skipped with a
warning rather than sinking the whole diagnosis.
"""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pandas as pd

from ..errors import GradwatchWarning

SEVERITIES = ("info", "warning", "critical")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}

# Every detector module, in report order. Adding one means adding its name here.
MODULES = (
    "nan_inf", "amp_overflow", "exploding", "vanishing", "dead_relu", "saturation", "loss_spike",
    "loss_plateau", "missing_zero_grad", "no_gradient", "eval_mode", "softmax_loss", "adam_weight_decay",
    "init_loss",
)


@dataclass(frozen=True)
class Finding:
    """One problem seen in a run, with the fix.

    kind: what it is ("nan_inf", "exploding_gradients", ...).
    layer: the module's qualified name, or "" for run-wide findings.
    step: the first step with evidence (not the step at which a rule happened to run).
    severity: "info", "warning" or "critical".
    message: what was seen, with numbers.
    suggestion: what to change, with numbers taken from this run.
    evidence: the numbers behind the message, JSON-safe (floats, ints, strings, lists of them).
    """

    kind: str
    layer: str
    step: int
    severity: str
    message: str
    suggestion: str
    evidence: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_RANK:
            raise ValueError(f"Finding.severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def key(self) -> tuple[str, str, int]:
        """Identity across re-runs of the detectors on a growing run: same kind, layer and onset."""
        return (self.kind, self.layer, self.step)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for logs: severity, kind, where, when, and the fix."""
        where = f" in {self.layer}" if self.layer else ""
        return f"[{self.severity}] {self.kind}{where} at step {self.step}: {self.message} Fix: {self.suggestion}"


@dataclass
class Frames:
    """What the detectors read: the reader's frames, already loaded.

    steps: `Run.steps` (step, time, loss, lr, lr_1.., grad_norm, skipped, loss_scale, nonfinite, eval_mode,
        and `grad_carried` when recorded).
    metrics: metric name -> wide frame (index step, one column per layer or activation site, model order).
    events: `Run.events` (non-finite onsets with the producing module).
    meta: `Run.meta` (model summary, optimizer, config, loss description).
    """

    steps: pd.DataFrame
    metrics: dict[str, pd.DataFrame] = field(default_factory=dict)
    events: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)

    def metric(self, name: str) -> pd.DataFrame:
        """The wide frame of `name`; an empty one when the run did not record it."""
        df = self.metrics.get(name)
        return df if df is not None else pd.DataFrame(index=pd.Index([], name="step"))

    @classmethod
    def from_run(cls, run) -> Frames:
        """Load every frame the detectors use from a `gradwatch.Run`."""
        from ..store.schema import METRIC_KIND

        present = run.metric_names
        metrics = {m: run.wide(m) for m in METRIC_KIND if m in present}
        return cls(steps=run.steps, metrics=metrics, events=run.events, meta=run.meta)


Detector = Callable[[Frames], list[Finding]]
DETECTORS: dict[str, Detector] = {}


def detector(fn: Detector) -> Detector:
    """Register `fn` under its module's short name."""
    DETECTORS[fn.__module__.rsplit(".", 1)[-1]] = fn
    return fn


_loaded = False


def _load() -> None:
    """Import every detector module once; one that fails to import is reported and left out."""
    global _loaded
    _loaded = True
    for name in MODULES:
        try:
            importlib.import_module(f".{name}", __name__)
        except Exception as e:  # noqa: BLE001 - the other detectors still run
            warnings.warn(f"gradwatch: the {name} detector cannot be loaded ({type(e).__name__}: {e}); its "
                          "findings are missing. Please report this.", GradwatchWarning, stacklevel=3)


def run_detectors(frames: Frames, only: list[str] | None = None) -> list[Finding]:
    """Every registered detector over `frames`, findings sorted worst first, then by step."""
    if not _loaded:
        _load()
    findings: list[Finding] = []
    for name, fn in DETECTORS.items():
        if only is not None and name not in only:
            continue
        try:
            findings.extend(fn(frames))
        except Exception as e:  # noqa: BLE001 - one broken rule must not hide every other finding
            warnings.warn(f"gradwatch: the {name} detector failed on this run ({type(e).__name__}: {e}); "
                          "its findings are missing. Please report this.", GradwatchWarning, stacklevel=2)
    from ._causes import fold_symptoms

    return sort_findings(fold_symptoms(findings, frames))


def sort_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (-SEVERITY_RANK[f.severity], f.step, f.kind, f.layer))
