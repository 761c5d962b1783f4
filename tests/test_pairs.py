"""PairMap turns per-parameter norms and maxima into per-layer ones: checked against a loop over the pairs."""
import math

import numpy as np

from gradwatch._pairs import PairMap


def _naive(values, pairs, n_layers, how):
    out = np.full((values.shape[0], n_layers), np.nan)
    for layer in range(n_layers):
        mine = [p for p, ly in pairs if ly == layer]
        if mine:
            cols = values[:, mine].astype(np.float64)
            out[:, layer] = np.sqrt((cols ** 2).sum(axis=1)) if how == "norm" else cols.max(axis=1)
    return out


def test_combine_matches_a_loop_over_pairs_with_tied_and_uncovered_layers():
    rng = np.random.default_rng(0)
    # param 1 is tied (layers 0 and 3), layer 2 owns nothing measured, pairs arrive out of layer order
    pairs = [(0, 0), (1, 0), (2, 1), (1, 3), (3, 3), (4, 1)]
    pm = PairMap([p for p, _ in pairs], [ly for _, ly in pairs], n_layers=4)
    values = rng.random((7, 5)).astype(np.float32) * 10
    for how in ("norm", "max"):
        np.testing.assert_allclose(pm.combine(values, how), _naive(values, pairs, 4, how), rtol=1e-12)
    assert pm.absent.tolist() == [False, False, True, False]
    np.testing.assert_allclose(pm.total(values), np.sqrt((values.astype(np.float64) ** 2).sum(axis=1)))


def test_squares_are_summed_in_float64_and_nonfinite_values_propagate():
    pm = PairMap([0, 1, 2], [0, 0, 1], n_layers=2)
    big = np.float32(3e38)  # finite in float32; its square is not
    values = np.array([[big, big, 1.0], [np.nan, 1.0, np.inf]], dtype=np.float32)
    norm = pm.combine(values, "norm")
    assert math.isclose(norm[0, 0], float(big) * math.sqrt(2), rel_tol=1e-7)
    assert math.isnan(norm[1, 0]) and math.isinf(norm[1, 1])
    assert math.isnan(pm.combine(values, "max")[1, 0])
