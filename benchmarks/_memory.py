"""Peak memory of each configuration, each measured in a process of its own.

A tool's memory cost (its imports, hooks, buffers, copies of weights) only shows as a peak of a
process that ran nothing else, so each (workload, configuration) trains for a few steps in a
fresh process forked from a server that has already imported torch. Every such process starts
from the same preloaded pages, which cancel in the difference to the baseline process; the
tool's own imports happen after the fork and count.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
import sys
import tempfile
from pathlib import Path

import torch
from _configs import CONFIGS
from _harness import make_session
from _workloads import WORKLOADS

# torch._dynamo is imported lazily by the first optimizer step and takes ~2.5 s; preloading it
# (with torch) saves that in every measuring process.
PRELOAD = ["torch", "torch._dynamo", "_memory"]


def peak_rss_mib() -> float:
    """Peak RSS of this process. VmHWM, because Linux carries ru_maxrss across fork and exec: a
    child of a 400 MiB parent would report at least 400 MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def measure_one(wname: str, cname: str, steps: int, device_name: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    workload = WORKLOADS[wname]().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        session = make_session(workload, CONFIGS[cname], Path(tmp) / cname)
        try:
            session.steps(steps)
            session.config.end_block()
            out = {"rss_mib": peak_rss_mib()}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                out["cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        finally:
            session.config.close()
    return out


def measure_memory(jobs: list[tuple[str, str]], steps: int, device: str,
                   threads: int) -> dict[tuple[str, str], dict]:
    """Peak RSS (and peak CUDA allocation) per (workload, config), absolute MiB, or {'error': ...}."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = {}
    for job in jobs:
        # One at a time: two processes of `threads` torch threads each would oversubscribe the
        # cores, and OpenMP's spinning makes that many times slower. A pool per job keeps a
        # crashing tool from breaking the other cells.
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            try:
                results[job] = pool.submit(measure_one, *job, steps, device, threads).result()
            except Exception as exc:  # one broken tool should cost its cell, not the table
                results[job] = {"error": f"{type(exc).__name__}: {exc}"}
    return results
