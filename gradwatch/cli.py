"""The `gradwatch` command: argparse entry points that only call into the package."""
from __future__ import annotations

import argparse
import sys

from .errors import GradwatchError


def _export(args: argparse.Namespace) -> int:
    from .store.export import export_run

    for path in export_run(args.run_dir, args.format, args.output):
        print(path)
    return 0


def _runs(args: argparse.Namespace) -> int:
    from .store.reader import list_runs

    runs = list_runs(args.runs_dir)
    if runs.empty:
        print(f"no runs under {args.runs_dir}")
    else:
        print(runs.drop(columns=["path"]).to_string(index=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradwatch", description="Per-layer training diagnostics for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write a run's frames as CSV or Parquet files")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("-o", "--output", default=None, help="output folder (default: RUN_DIR/export)")
    p.set_defaults(func=_export)
    p = sub.add_parser("runs", help="list the runs under a folder")
    p.add_argument("runs_dir", nargs="?", default="runs")
    p.set_defaults(func=_runs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GradwatchError as e:
        print(f"gradwatch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
