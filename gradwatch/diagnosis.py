"""`diagnose(run_dir) -> Report`: run every detector over a run store. Never imports torch.

The module is `diagnosis`, not `diagnose`, so that importing it cannot shadow `gradwatch.diagnose()`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .detect import SEVERITY_RANK, Finding, Frames, run_detectors

REPORT_SCHEMA = "gradwatch.report/1"  # the JSON report's format; see docs/report.md


@dataclass
class Report:
    """The findings of one run, worst first, and what the renderers need to show them.

    `frames` holds the data the findings came from (the HTML report draws its charts from it).
    """

    run_dir: str
    name: str
    status: str
    n_steps: int
    last_step: int | None
    findings: list[Finding]
    meta: dict = field(default_factory=dict, repr=False)
    frames: Frames | None = field(default=None, repr=False)

    @property
    def worst(self) -> str | None:
        """The highest severity among the findings, or None when there is none."""
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=SEVERITY_RANK.__getitem__)

    @property
    def healthy(self) -> bool:
        """No warning or critical finding (info notes are allowed)."""
        return not self.at_least("warning")

    def at_least(self, severity: str) -> list[Finding]:
        """The findings of `severity` or worse ("info" < "warning" < "critical")."""
        if severity not in SEVERITY_RANK:
            raise ValueError(f"severity must be one of {list(SEVERITY_RANK)}, got {severity!r}")
        return [f for f in self.findings if SEVERITY_RANK[f.severity] >= SEVERITY_RANK[severity]]

    def counts(self) -> dict[str, int]:
        """How many findings of each severity, every severity present as a key."""
        out = dict.fromkeys(SEVERITY_RANK, 0)
        for f in self.findings:
            out[f.severity] += 1
        return out

    def summary(self) -> str:
        """One line: the run, its status and steps, and its findings by severity."""
        c = self.counts()
        if self.healthy:
            verdict = "healthy" + (f" ({c['info']} note{'s' * (c['info'] != 1)})" if c["info"] else "")
        else:
            verdict = ", ".join(f"{c[s]} {s}" for s in ("critical", "warning", "info") if c[s])
        return f"{self.name}: {self.status}, {self.n_steps} steps, {verdict}"


def diagnose(run_dir: str | os.PathLike) -> Report:
    """Run every detector over a run, finished or still being written.

    Args:
        run_dir: a folder written by `gradwatch.watch()` (or a `gradwatch.Run`).

    Returns:
        A `Report`; `report.findings` lists `Finding`s (kind, layer, step, severity, message, suggestion),
        worst first.
    """
    from .store.reader import Run, load_run

    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir)
    frames = Frames.from_run(run)
    return report_from_frames(frames, run_dir=str(run.path), name=run.name, status=run.status)


def report_from_frames(frames: Frames, run_dir: str = "", name: str = "", status: str = "") -> Report:
    steps = frames.steps
    last = int(steps["step"].iloc[-1]) if len(steps) else None
    return Report(run_dir=run_dir, name=name or frames.meta.get("name", ""), status=status or
                  frames.meta.get("status", "unknown"), n_steps=len(steps), last_step=last,
                  findings=run_detectors(frames), meta=frames.meta, frames=frames)
