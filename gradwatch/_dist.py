"""torch.distributed: which rank writes the store, and the one exchange per flush that merges the ranks.

Every rank that calls `watch()` records its own numbers. Only rank 0 writes. At each flush, every rank
sends rank 0 its flushed rows (one `all_gather` of one flat vector, plus one of its length), and rank 0
combines them field by field (`merge`): a NaN that only rank 1 saw is reported, with rank 1; a unit is
dead only if it never fired on any rank; FSDP shards' squared norms add up to the full tensor's.

Collectives must be called by every rank in the same order, so in a distributed run flushes come after a
number of recorded steps that rank 0 picks and sends along with its rows (`flush_every` seconds' worth),
not after a wall time each rank would measure differently. All ranks must call `watch()`, `step()` and
`close()` alike. A rank that watches alone (say, a script that only watches on rank 0) is found at
`watch()` through the process group's store within JOIN_TIMEOUT_S, and then records alone, without any
collective; `merge_ranks=False` skips that wait.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("gradwatch")
JOIN_TIMEOUT_S = 15.0  # how long watch() waits for the other ranks to call watch() too
_generation = 0  # watch() calls in this process: ranks that watch alike agree on it


@dataclass
class Dist:
    rank: int
    world: int
    merge: bool  # every rank watches: flushes exchange rows; False: this rank records alone


def detect(merge_ranks: bool = True) -> Dist | None:
    """The process group, when torch.distributed runs with more than one rank; None otherwise."""
    try:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        rank, world = dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001 - a broken distributed set-up must not stop training
        return None
    return Dist(rank, world, merge_ranks and _everyone_watches(rank, world))


def _everyone_watches(rank: int, world: int) -> bool:
    """Do all ranks call watch()? Each one checks in at the group's key-value store; rank 0 decides."""
    global _generation
    _generation += 1
    try:
        import datetime

        from torch.distributed import distributed_c10d as c10d
        store = c10d._get_default_store()
        key = f"gradwatch/watch/{_generation}"
        store.add(f"{key}/joined", 1)
        if rank == 0:
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while store.add(f"{key}/joined", 0) < world and time.monotonic() < deadline:
                time.sleep(0.01)
            merge = store.add(f"{key}/joined", 0) >= world
            store.set(f"{key}/merge", "1" if merge else "0")
            if not merge:
                log.warning("gradwatch: only some ranks called watch(); rank 0 records its own numbers alone. "
                            "Call gradwatch.watch() on every rank to merge their statistics, or pass "
                            "merge_ranks=False to skip this %.0f s wait.", JOIN_TIMEOUT_S)
            return merge
        store.wait([f"{key}/merge"], datetime.timedelta(seconds=JOIN_TIMEOUT_S + 30))
        return store.get(f"{key}/merge") == b"1"
    except Exception as e:  # noqa: BLE001 - no store (a custom backend): no merging, never a hang
        log.warning("gradwatch: cannot coordinate ranks (%s: %s); each rank records alone and only rank 0 "
                    "writes.", type(e).__name__, e)
        return False


def gather(flat: torch.Tensor, notes: list[float]) -> tuple[torch.Tensor, list[float], list[int]]:
    """Every rank's `flat` on every rank, as a [world, n] tensor padded with NaN, rank 0's `notes`, and
    each rank's length.

    Two all_gathers: the lengths (and rank 0's note) first, then the padded vectors. With gloo, CUDA
    tensors go through the CPU. Runs once per flush.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    cpu = dist.get_backend() == "gloo"
    dev = torch.device("cpu") if cpu else flat.device
    flat = flat.to(dev)
    head = torch.tensor([flat.numel(), *notes], dtype=torch.float64, device=dev)
    heads = [torch.empty_like(head) for _ in range(world)]
    dist.all_gather(heads, head)
    heads = torch.stack(heads).cpu()  # sync: once per flush, the lengths decide the padding
    n = int(heads[:, 0].max())
    padded = torch.full((n,), math.nan, dtype=flat.dtype, device=dev)
    padded[: flat.numel()] = flat
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.stack(parts), heads[0, 1:].tolist(), [int(v) for v in heads[:, 0]]


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank; any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and _is_dtensor(t) else t


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def shard_weights(params: list[torch.Tensor], world: int) -> list[float] | None:
    """Per parameter, 1 / (how many ranks hold each of its elements); None when no parameter is sharded.

    A Shard placement splits a tensor over its mesh dimension; a Replicate one, and a plain tensor, is
    held whole by every rank of that dimension (of the whole world, for a plain tensor).
    """
    if not any(_is_dtensor(p) and any(pl.is_shard() for pl in p.placements) for p in params):
        return None
    weights = []
    for p in params:
        if _is_dtensor(p):
            mesh = p.device_mesh
            copies = world / mesh.size()  # ranks outside the mesh hold their own copy
            copies *= math.prod(mesh.size(d) for d, pl in enumerate(p.placements) if not pl.is_shard())
            weights.append(1.0 / copies)
        else:
            weights.append(1.0 / world)
    return weights


# ---- merging the ranks' rows on rank 0 ------------------------------------------------------------

_SHARD_NORMS = ("gnorm@", "wnorm@", "udelta@", "uweight@")  # per-parameter norms of the local shards


def merge(block: np.ndarray, layout: list[tuple[str, int]], sharded: bool, ranks: np.ndarray):
    """Combine a [world, steps, width] block of rows, laid out by `layout`, into [steps, width'].

    `ranks` names the ranks of the block's first axis. Returns the merged rows, their layout, and per
    step the rank to report for a non-finite value: the first whose forward probes or loss saw one,
    else the first rank. Sharded runs send each parameter's norm over its local shard, weighted (see
    `Recorder.shard_scale_for`); here they become the full parameters' norms.
    """
    world, steps, _ = block.shape
    out, names, c = [], [], 0
    with np.errstate(invalid="ignore", divide="ignore"):
        probe_rank = loss_rank = np.full(steps, -1)
        for name, n in layout:
            x = block[:, :, c: c + n].astype(np.float64)
            c += n
            if name == "probes":
                bad = ~np.isfinite(x).all(axis=2)  # [world, steps]
                probe_rank = np.where(bad.any(axis=0), bad.argmax(axis=0), -1)
                merged = x[np.maximum(probe_rank, 0), np.arange(steps)]
            elif name == "loss":
                merged = x.mean(axis=0)
                bad = ~np.isfinite(x[:, :, 0])
                loss_rank = np.where(bad.any(axis=0), bad.argmax(axis=0), -1)
            elif name.startswith(("unit_max@", "gmax@", "grad_carry")):
                merged = x.max(axis=0)  # NaN-propagating: a NaN on any rank stays visible
            elif name.startswith(("zero_fraction@", "saturation_fraction@")):
                merged = x.mean(axis=0)  # counts; each rank's batch is the same size under DDP
            elif sharded and name.startswith(_SHARD_NORMS):
                merged = np.sqrt(np.square(x).sum(axis=0))
            else:  # grads after DDP's all-reduce, learning rates, the loss scale: rank 0's
                merged = x[0]
            names.append((name, n))
            out.append(merged)
    first = np.where(probe_rank >= 0, probe_rank, np.maximum(loss_rank, 0))
    return np.concatenate(out, axis=1).astype(np.float32), names, ranks[first]
