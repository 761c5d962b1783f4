"""Pure tensor functions behind every recorded number. No hooks, no I/O, and no host sync.

Callers run these under `torch.no_grad()`: one context switch is cheaper than a `detach()` per tensor.
"""
from __future__ import annotations

import functools
import math

import torch

# Saturation thresholds on the pre-activation x. Both mark the same flatness, a derivative below
# 2.7% of its peak: sigmoid'(5) / sigmoid'(0) = tanh'(2.5) / tanh'(0) = 0.027 (tanh(x) = 2*sigmoid(2x) - 1).
# |x| > 5 for the logistic sigmoid is the "beyond about +-5" of the saturation literature
# (Glorot & Bengio 2010; Rakitianskaia & Engelbrecht 2015).
SIGMOID_SATURATION = 5.0
TANH_SATURATION = 2.5

# Zero and saturation fractions are read from an even sample of at most this many elements, so that their
# cost does not grow with the batch: a binomial standard error of at most 0.4 percentage point.
FRACTION_SAMPLE = 1 << 14
MIN_ROWS = 16  # a row sample spans at least this many samples of the batch, else elements are strided
UNIT_SAMPLE = 1 << 16  # a dead-unit check reads about this many elements of a big activation (see unit_rows)

_INF = float("inf")


def norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor, as one float32 (or float64) vector on the tensors' device. Call under no_grad.

    On CUDA, one `_foreach_norm` call: a fused kernel. On CPU, `_foreach_norm` is a loop of generic norm
    kernels, and a BLAS dot product per tensor beats it in a training loop: in backward on the benchmark
    MLP, 140 us against 280 us for its 6 gradients, which makes the whole step 2-3% faster
    (`benchmarks/compare_revision.py`, 300 rounds). Many small tensors favour the foreach loop: timed
    inside the recorder, the CNN's 11 gradients take 340 us against 226 and the transformer's 30 take 656
    against 557, 0.3% and 0.1% of their steps, which compare_revision cannot tell from noise. The dot is
    also more accurate (MKL's blocked sums: 2e-4 relative error on 2e7 elements, against 1.4e-3). Both
    square in float32, so both read inf past a norm of 1.8e19. bf16 and fp16 norms accumulate in float32:
    an fp16 norm above 65504 stays finite. The host sums the results into per-layer norms in float64 (see
    `_pairs.PairMap`), where a layer whose per-tensor norms fit float32 but whose summed squares do not
    still reads exact.
    """
    if not tensors:
        return torch.zeros(0)
    dense = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    dtypes = {t.dtype for t in dense}
    if dtypes <= {torch.float32, torch.float64}:  # float64 ones stay exact until the row's one conversion
        if dense[0].device.type != "cpu" or not all(t.is_contiguous() for t in dense):
            return torch.stack(torch._foreach_norm(dense, 2))
        flat = [t.view(-1) for t in dense]
        return torch.stack([torch.dot(v, v) for v in flat]).sqrt_()
    if torch.float64 not in dtypes:
        return torch.stack(torch._foreach_norm(dense, 2, dtype=torch.float32))
    return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64 if t.dtype == torch.float64
                                                 else torch.float32) for t in dense])


def maxabs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """max |x| of each tensor (NaN when it holds a NaN), as one float32 vector. Call under no_grad."""
    dense = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    if dense[0].is_cuda:
        return torch.stack(torch._foreach_norm(dense, _INF)).float()
    # The CPU inf-norm kernel is 10x slower than aminmax, which reads each tensor once.
    lows, highs = zip(*(torch.aminmax(t) for t in dense))
    return torch.maximum(torch.stack(highs), torch.stack(lows).neg_()).float()


def finite_probe(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (min, max) over every floating tensor, 0-dim float32 each; None when there is none.

    Both are finite iff every value is; a NaN makes them NaN, and an Inf shows up with its sign. One pass
    per tensor and no arithmetic, so unlike a sum it cannot overflow into a false alarm.
    """
    lo = hi = None
    for t in tensors:
        if t.is_floating_point() and t.numel():
            a, b = torch.aminmax(t)
            lo = a if lo is None else torch.minimum(lo, a)
            hi = b if hi is None else torch.maximum(hi, b)
    if lo is None:
        return None
    return (lo, hi) if lo.dtype == torch.float32 else (lo.float(), hi.float())


def unit_dim(shape: torch.Size, channels_first: bool) -> int:
    """Which dimension indexes units: channels for conv maps, features for dense outputs."""
    if len(shape) <= 1:
        return 0
    if len(shape) == 2:
        return 1
    if len(shape) >= 4 or channels_first:
        return 1
    return len(shape) - 1


def unit_rows(out: torch.Tensor, dim: int, turn: int) -> torch.Tensor:
    """The part of an activation that a dead-unit check reads: every k-th sample of the batch.

    k keeps a read near UNIT_SAMPLE elements, but never below MIN_ROWS samples, and the first sample turns
    with `turn` (the call count), so that over a window every sample position of the batch is read.
    Dense outputs up to UNIT_SAMPLE elements (an MLP's) are read whole; a conv map has thousands of
    positions per sample, so a quarter of the batch still gives each channel ample chances to fire.
    """
    n = out.numel()
    if n <= UNIT_SAMPLE or out.ndim < 2 or dim == 0:
        return out
    k = min(-(-n // UNIT_SAMPLE), out.shape[0] // MIN_ROWS)
    return out if k <= 1 else out[turn % k:: k]


def unit_max(out: torch.Tensor, dim: int) -> torch.Tensor:
    """Largest value of each unit over every sample and position given: a unit is alive iff this is > 0."""
    dims = [d for d in range(out.ndim) if d != dim]
    m = out.amax(dim=dims) if dims else out.clone()  # a clone: the caller accumulates into it in place
    return m if m.dtype == torch.float32 else m.float()


def _sample(x: torch.Tensor) -> torch.Tensor:
    """At most about FRACTION_SAMPLE elements of `x`, spread evenly over it.

    Whole rows (every k-th sample of the batch) when at least MIN_ROWS of them fit in the budget: a row
    slice is read contiguously, several times faster on CPU than a gather. Otherwise a prime stride
    over the flat tensor, which does not alias with the power-of-two sizes dimensions usually have.
    """
    n = x.numel()
    if n <= FRACTION_SAMPLE:
        return x
    rows = x.shape[0] if x.ndim >= 2 else 1
    per_row = n // rows
    if rows > 1 and per_row * MIN_ROWS <= FRACTION_SAMPLE:
        return x[:: rows * per_row // FRACTION_SAMPLE + 1]
    return x.reshape(-1)[:: _prime_stride(n)]


@functools.lru_cache(maxsize=256)
def _prime_stride(n: int) -> int:
    return _next_prime(math.ceil(n / FRACTION_SAMPLE))


def positive_count(out: torch.Tensor, nonnegative: bool) -> tuple[torch.Tensor, int]:
    """How many sampled elements are > 0, and how many were sampled."""
    x = _sample(out)
    s = x.sign()
    if not nonnegative:
        s.clamp_(min=0)
    # float sum: summing a bool mask is 3x slower on CPU.
    return s.sum(dtype=torch.float32), x.numel()


def saturated_count(pre_activation: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """How many sampled pre-activations lie beyond +-threshold, and how many were sampled."""
    x = _sample(pre_activation)
    return x.abs().gt_(threshold).sum(dtype=torch.float32), x.numel()


def _next_prime(n: int) -> int:
    n = max(n, 2)
    while any(n % d == 0 for d in range(2, int(n**0.5) + 1)):
        n += 1
    return n
