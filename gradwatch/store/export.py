"""Export a run's frames to CSV or Parquet, for people who want their data elsewhere."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import GradwatchError
from .reader import load_run

FORMATS = ("csv", "parquet")


def export_run(run_dir: str | Path, fmt: str = "csv", out_dir: str | Path | None = None) -> list[Path]:
    """Write steps, layers and events as `fmt` files, and meta as JSON, into `out_dir`.

    Returns:
        The paths written.
    """
    if fmt not in FORMATS:
        raise GradwatchError(f"export: format must be one of {', '.join(FORMATS)}, got format={fmt!r}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise GradwatchError("export: --format parquet needs pyarrow; run pip install 'gradwatch[parquet]'"
                                 ) from None
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path / "export"
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("steps", "layers", "events"):
            frame = getattr(run, name)
            path = out / f"{name}.{fmt}"
            if fmt == "csv":
                frame.to_csv(path, index=False)
            else:
                frame.to_parquet(path, index=False)
            written.append(path)
        meta = out / "meta.json"
        meta.write_text(json.dumps(run.meta, indent=2, default=str))
    except OSError as e:
        raise GradwatchError(f"export: cannot write to the output folder {str(out)!r} ({e.strerror or e}); "
                             "pass a folder you can write to with -o.") from None
    return written + [meta]
