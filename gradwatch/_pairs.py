"""Per-parameter values into per-layer ones, on the host.

The device records one number per measured parameter (its norm, or its max |x|) and nothing more: the
sums per layer would cost a few more small ops on every step, which on a CPU training loop weigh more
than the norms themselves. The flush turns them into layers here, in float64, with numpy.
"""
from __future__ import annotations

import numpy as np


class PairMap:
    """The (parameter, layer) pairs of one list of measured parameters.

    A layer owns parameters directly; a tied parameter belongs to two layers, and a layer none of whose
    parameters was measured (no .grad this step, or owned by another optimizer) reads NaN.
    """

    def __init__(self, pair_param: list[int], pair_layer: list[int], n_layers: int):
        order = np.argsort(np.asarray(pair_layer, dtype=np.int64), kind="stable")
        self.param = np.asarray(pair_param, dtype=np.int64)[order]
        layer = np.asarray(pair_layer, dtype=np.int64)[order]
        self.layers, self.starts = np.unique(layer, return_index=True)
        self.n_layers = n_layers
        self.absent = np.ones(n_layers, dtype=bool)
        self.absent[self.layers] = False

    def combine(self, values: np.ndarray, how: str) -> np.ndarray:
        """[steps, params] -> [steps, layers]: "norm", the root of the summed squares (values are norms),
        or "max". NaN and Inf propagate; layers without a measured parameter are NaN."""
        out = np.full((values.shape[0], self.n_layers), np.nan)
        if self.param.size:
            v = values[:, self.param].astype(np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                if how == "norm":
                    out[:, self.layers] = np.sqrt(np.add.reduceat(np.square(v), self.starts, axis=1))
                else:
                    out[:, self.layers] = np.maximum.reduceat(v, self.starts, axis=1)
        return out

    @staticmethod
    def total(values: np.ndarray) -> np.ndarray:
        """The global norm over every measured parameter, each counted once (tied ones too)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return np.sqrt(np.square(values.astype(np.float64)).sum(axis=1))
