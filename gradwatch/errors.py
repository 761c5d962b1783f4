"""The exceptions and the warning type gradwatch raises."""


class GradwatchError(Exception):
    """Bad input or a run that cannot be read. The message names the argument, the value and the fix."""


class GradwatchWarning(UserWarning):
    """Something went wrong inside gradwatch, but training goes on (for example, the store stopped writing)."""


class GradwatchHalt(GradwatchError):
    """Raised by `Watcher.step()` under `watch(..., halt_on=...)` when a finding reaches that severity."""

    def __init__(self, finding):
        self.finding = finding
        super().__init__(f"gradwatch stopped the run (halt_on={finding.severity!r} or lower): {finding.line()}")
