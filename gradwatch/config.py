"""`WatchConfig`: what gradwatch records, and how often. Checked once, in `watch()`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import GradwatchError


@dataclass(frozen=True)
class WatchConfig:
    """Recording schedule. Every field is also a keyword of `gradwatch.watch()`.

    By default every optimizer step records the loss, learning rates, per-layer gradient norms, dead
    units and NaN tracing, and one recorded step in `detail_every` adds the stats that each cost a full
    extra pass over every parameter (weight norm, gradient max-abs, update ratio) and the activations'
    zero and saturation fractions.
    `detail_every=1` records them on every step too. `WatchConfig.light()` and
    `WatchConfig.grad_norms_only()` are cheaper settings for big models.
    """

    every: int = 1  # record one optimizer step in `every`; on the others the hooks return at once
    grad_norm: bool = True  # per-layer L2 norm of the gradient, after accumulation and before clipping;
    #                         False turns off every gradient statistic (and the gradient hooks)
    detail_every: int = 10  # weight norm, grad max-abs, update ratio, zero/saturation fractions: 1 step in this many
    grad_maxabs: bool = True  # per-layer max |g| on detail steps (one more pass over the gradients)
    weight_norm: bool = True  # per-layer L2 norm of the weights on detail steps (one pass over the weights)
    update_ratio: bool = True  # ||dw||/||w|| on detail steps (a copy of the weights, see update_memory_mb)
    update_memory_mb: float = 256.0  # most memory the ratio's weight copy may take; more rotates layers
    activations: bool = True  # dead-unit, zero and saturation fractions of activation modules
    dead_window: int = 25  # recorded steps per dead-unit window: a unit is dead if never positive in it
    trace_nonfinite: bool = True  # name the module that first produced a NaN/Inf (one reduction per module)
    flush_every: float = 0.5  # seconds between flushes (one host copy and one write transaction)
    detect_every: float = 5.0  # seconds between live detector passes on a background thread; 0 turns them off
    merge_ranks: bool = True  # torch.distributed: every rank calls watch() and rank 0 stores all ranks' merged
    #                           stats; False: rank 0 records its own alone, other ranks record nothing

    def __post_init__(self) -> None:
        for name in ("every", "detail_every", "dead_window"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("grad_norm", "grad_maxabs", "weight_norm", "update_ratio", "activations",
                     "trace_nonfinite", "merge_ranks"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise GradwatchError(f"{name} must be True or False, got {name}={value!r}")
        for name, low in (("flush_every", 0.01), ("update_memory_mb", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise GradwatchError(f"{name} must be a number >= {low}, got {name}={value!r}")
        value = self.detect_every
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value == 0 or value >= 0.1):
            raise GradwatchError(f"detect_every must be 0 (off) or a number of seconds >= 0.1, "
                                 f"got detect_every={value!r}")
        if self.flush_every > 1.0:
            raise GradwatchError(
                f"flush_every must be at most 1 second so that a killed run loses little, "
                f"got flush_every={self.flush_every!r}"
            )

    @classmethod
    def light(cls, every: int = 10) -> WatchConfig:
        """Every stat, on one step in `every`: for big models where a per-step pass is too much."""
        return cls(every=every, detail_every=1)

    @classmethod
    def grad_norms_only(cls) -> WatchConfig:
        """Per-layer gradient norms and the loss, nothing else: the cheapest useful setting."""
        return cls(grad_maxabs=False, weight_norm=False, update_ratio=False, activations=False,
                   trace_nonfinite=False)

    def replace(self, **changes: object) -> WatchConfig:
        """A copy with `changes` applied; unknown names raise a `TypeError` that lists the valid ones."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"watch() got unknown option(s) {', '.join(unknown)}; valid options are: {valid}")
        return dataclasses.replace(self, **changes)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GradwatchError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
