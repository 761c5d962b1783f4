"""The exceptions and the warning type gradwatch raises."""


class GradwatchError(Exception):
    """Bad input or a run that cannot be read. The message names the argument, the value and the fix."""


class GradwatchWarning(UserWarning):
    """Something went wrong inside gradwatch, but training goes on (for example, the store stopped writing)."""


class GradwatchHalt(GradwatchError):
    """Raised by `Watcher.step()` under `watch(..., halt_on=...)` when a finding reaches that severity."""

    def __init__(self, finding):
        self.finding = finding  # None on a rank other than 0 of a distributed run: rank 0 found it
        if finding is None:
            super().__init__("gradwatch stopped the run on every rank: rank 0 found a problem under halt_on "
                             "(see rank 0's log, or gradwatch.diagnose() on the run)")
        else:
            super().__init__(f"gradwatch stopped the run (halt_on={finding.severity!r} or lower): "
                             f"{finding.line()}")
