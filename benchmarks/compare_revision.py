"""Is this checkout's gradwatch faster than an earlier revision's? Both in one process, interleaved.

    python benchmarks/compare_revision.py 693aa48                 # default and grad_norms_only, every workload
    python benchmarks/compare_revision.py HEAD~3 --workloads mlp --rounds 60

The revision's `gradwatch/` is extracted with `git archive` into a temporary folder as the package
`gradwatch_rev` (gradwatch imports itself relatively), so the two versions hook two copies of the same
model side by side. Each round times a block of the revision (the "baseline" of `_harness`) next to a
block of this checkout, in random order; the table gives this checkout's median paired ratio against the
revision with its bootstrap 95% CI. Negative is faster. A gain smaller than the A/A row's CI is noise.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _configs import Config, Gradwatch  # noqa: E402
from _harness import make_session, run_interleaved, summarize, summarize_baseline, warm_up_and_size_block  # noqa: E402
from _workloads import WORKLOADS  # noqa: E402


def extract_revision(rev: str, into: Path) -> None:
    """`rev`'s gradwatch/ as the importable package `gradwatch_rev` under `into`."""
    tar = subprocess.run(["git", "-C", str(HERE.parent), "archive", rev, "gradwatch"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    (into / "gradwatch").rename(into / "gradwatch_rev")
    sys.path.insert(0, str(into))


def watched(module_name: str, grads_only: bool) -> type[Config]:
    """The `gradwatch` row of `_configs`, watching with the package `module_name` instead."""

    class Watched(Gradwatch):
        name = module_name

        def attach(self, model, optimizer, run_dir):
            Config.attach(self, model, optimizer, run_dir)
            gw_mod = __import__(module_name)
            cfg = gw_mod.WatchConfig.grad_norms_only() if grads_only else gw_mod.WatchConfig()
            self.gw = gw_mod.watch(model, optimizer=optimizer, run_dir=run_dir, config=cfg, detect_every=0)

    return Watched


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the git revision to compare with")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--block", type=int, default=0, help="steps per block (default: about 0.08 s)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        extract_revision(args.rev, Path(tmp) / "src")
        print(f"this checkout vs {args.rev}: median paired ratio - 1 [bootstrap 95% CI]; negative is faster")
        for wname in args.workloads:
            workload = WORKLOADS[wname]()
            for grads_only in (False, True):
                setting = "grad_norms_only" if grads_only else "default"
                classes = {"baseline": watched("gradwatch_rev", grads_only), "new": watched("gradwatch", grads_only)}
                sessions = {k: make_session(workload, c, Path(tmp) / f"{wname}-{setting}-{k}")
                            for k, c in classes.items()}
                try:
                    block = warm_up_and_size_block(sessions, 10, args.block, 0.08, lambda: None)
                    t = run_interleaved(sessions, args.rounds, block, lambda: None, rng, f"{wname} {setting}")
                finally:
                    for s in sessions.values():
                        s.config.close()
                aa = summarize_baseline(t.base_blocks, block, rng)
                new = summarize(t.blocks["new"], t.paired_base["new"], block, rng)
                print(f"  {wname:12s} {setting:16s} {new.median_pct:+6.1f}% [{new.ci_pct[0]:+.1f}, "
                      f"{new.ci_pct[1]:+.1f}]   (A/A CI [{aa.ci_pct[0]:+.1f}, {aa.ci_pct[1]:+.1f}], "
                      f"{new.ms_per_step:.2f} ms/step)")


if __name__ == "__main__":
    main()
