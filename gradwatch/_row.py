"""The assembly of a step row's device values (see `RowParts`), for `Recorder.finish_step`."""
from __future__ import annotations

import torch


class RowParts:
    """One step's device values, gathered into one flat vector by one or two ops.

    Most of a row is 0-dim tensors (the loss, NaN probes, counts), stacked in one op instead of being
    reshaped, combined and concatenated piece by piece, since on a CPU loop every small op costs as much as
    reading a large gradient; per-parameter norms come as one vector each.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._scalars: list[torch.Tensor] = []
        self._scalar_layout: list[tuple[str, int]] = []
        self._vectors: list[torch.Tensor] = []
        self._vector_layout: list[tuple[str, int]] = []

    def _here(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device, non_blocking=True)

    def scalars(self, name: str, values: list[torch.Tensor]) -> None:
        self._scalar_layout.append((name, len(values)))
        self._scalars.extend(self._here(v if v.dim() == 0 else v.reshape(())) for v in values)

    def vector(self, name: str, t: torch.Tensor) -> None:
        t = t.reshape(-1)
        self._vector_layout.append((name, t.numel()))
        self._vectors.append(self._here(t))

    def per_param(self, name: str, norms: torch.Tensor, shard_scale: torch.Tensor | None) -> None:
        self.vector(name, norms if shard_scale is None else norms * shard_scale)

    def build(self) -> tuple[list[tuple[str, int]], torch.Tensor | None]:
        parts = ([torch.stack(self._scalars)] if self._scalars else []) + self._vectors
        if not parts:
            return [], None
        # cat copies, and so does stack: the row aliases nothing that changes later (a lone vector would).
        flat = torch.cat(parts) if len(parts) > 1 or not self._scalars else parts[0]
        if flat.dtype != torch.float32:  # mixed dtypes promote in stack/cat; one conversion here
            flat = flat.float()
        return self._scalar_layout + self._vector_layout, flat
