"""The `gradwatch` command: argparse entry points that only call into the package."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def _report(args: argparse.Namespace) -> int:
    from .diagnosis import diagnose
    from .report import render

    report = diagnose(args.run_dir)
    fmt = args.format or _format_of(args.output)
    text = render(report, fmt)
    if args.output is None:
        sys.stdout.write(text)
    else:
        path = Path(args.output)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise GradwatchError(f"report: cannot write -o/--output={args.output!r} ({e.strerror or e}); "
                                 "pass a file in a folder you can write to.") from None
        print(path)
        print(report.summary(), file=sys.stderr)
    return 1 if args.fail_on and report.at_least(args.fail_on) else 0


def _format_of(output: str | None) -> str:
    """The format an output file's suffix asks for (.html, .json, .md), Markdown otherwise."""
    suffix = Path(output).suffix.lower().lstrip(".") if output else ""
    return {"htm": "html", "html": "html", "json": "json"}.get(suffix, "md")


def _dashboard(args: argparse.Namespace) -> int:
    from ._launch import launch_dashboard

    return launch_dashboard(args.runs_dir, port=args.port, host=args.host)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.runs_dir, dashboard=not args.no_dashboard, port=args.port, host=args.host)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradwatch", description="Per-layer training diagnostics for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write a run's frames as CSV or Parquet files")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("-o", "--output", default=None, help="output folder (default: RUN_DIR/export)")
    p.set_defaults(func=_export)
    p = sub.add_parser("report", help="diagnose a run and write its findings as Markdown, HTML or JSON",
                       description="Diagnose a run. Exit status: 0 when no finding reaches --fail-on (or it is "
                                   "not given), 1 when one does, 2 on bad input (see docs/report.md).")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["md", "html", "json"], default=None,
                   help="default: from the -o file's suffix (.html, .json), else md")
    p.add_argument("-o", "--output", default=None, help="write to this file (default: standard output)")
    p.add_argument("--fail-on", choices=["warning", "critical"], default=None,
                   help="exit with 1 when a finding is at least this severe (default: never)")
    p.set_defaults(func=_report)
    p = sub.add_parser("dashboard", help="open the live dashboard on the runs under a folder")
    p.add_argument("runs_dir", nargs="?", default="runs")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.set_defaults(func=_dashboard)
    p = sub.add_parser("demo", help="train a few small example runs, print their health, open the dashboard")
    p.add_argument("--runs-dir", default="runs/demo", help="where the demo runs go (default runs/demo)")
    p.add_argument("--no-dashboard", action="store_true", help="train and report only (for CI)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=_demo)
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
