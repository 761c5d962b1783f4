"""A small training loop under gradwatch, run as a subprocess by tests/test_reliability.py.

    python tests/scripts/train.py RUN_DIR [--seconds S] [--max-steps N] [--sleep S] [--print-steps]
                                  [--fail-after K] [--fail-for S] [--no-close] [--raise-at K]

Prints "started" once `watch()` has returned, "step I TIME" after each completed step with
--print-steps (TIME: unix seconds, taken after `gw.step()` returned), then "warning: MESSAGE" for every
warning caught, "warnings N" (how many were GradwatchWarnings) and "trained N steps". stdout is flushed
after every line.

--fail-after K: after K steps, cap the size of any file this process writes (RLIMIT_FSIZE) at the run
store's current size, with SIGXFSZ ignored, so that the store's writes fail with EFBIG while training
goes on. --fail-for S lifts the cap again after S seconds (0, the default, keeps it to the end).
--no-close: never call close(); the watcher is left to gradwatch's atexit handler.
--raise-at K: raise RuntimeError after K steps (uncaught, so the interpreter exits with an error).
"""
import argparse
import os
import resource
import signal
import sys
import time
import warnings

import torch
from torch import nn

import gradwatch


def say(*parts) -> None:
    print(*parts, flush=True)


def store_size(run_dir: str) -> int:
    sizes = [os.path.getsize(os.path.join(run_dir, f)) for f in os.listdir(run_dir)
             if f.startswith("gradwatch.db")]
    return max(sizes)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--print-steps", action="store_true")
    ap.add_argument("--fail-after", type=int, default=-1)
    ap.add_argument("--fail-for", type=float, default=0.0)
    ap.add_argument("--no-close", action="store_true")
    ap.add_argument("--raise-at", type=int, default=-1)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gw = gradwatch.watch(model, optimizer=opt, run_dir=args.run_dir, detail_every=1)
        say("started")
        t0 = time.monotonic()
        fail_start = None
        step = 0
        while step < args.max_steps and time.monotonic() - t0 < args.seconds:
            if step == args.raise_at:
                raise RuntimeError(f"boom at step {step}")
            if step == args.fail_after:
                gw.flush()  # the store is now as large as it gets before the cap
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                cap = store_size(args.run_dir)
                resource.setrlimit(resource.RLIMIT_FSIZE, (cap, resource.RLIM_INFINITY))
                say(f"capped at {cap}")
                fail_start = time.monotonic()
            if (fail_start is not None and args.fail_for > 0
                    and time.monotonic() - fail_start >= args.fail_for):
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                say("uncapped")
                fail_start = None
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            gw.step(loss)
            if args.print_steps:
                say(f"step {step} {time.time():.6f}")
            step += 1
            if args.sleep:
                time.sleep(args.sleep)
        if not args.no_close:
            gw.close()
    for w in caught:
        say(f"warning: {w.category.__name__}: {str(w.message)!r}")
    say(f"warnings {sum(issubclass(w.category, gradwatch.GradwatchWarning) for w in caught)}")
    say(f"trained {step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
