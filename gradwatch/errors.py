"""The one exception type, and the one warning type, gradwatch raises."""


class GradwatchError(Exception):
    """Bad input or a run that cannot be read. The message names the argument, the value and the fix."""


class GradwatchWarning(UserWarning):
    """Something went wrong inside gradwatch, but training goes on (for example, the store stopped writing)."""
