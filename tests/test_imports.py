"""The import rules of DESIGN.md, checked in a fresh interpreter: reading and diagnosing never load torch."""
from __future__ import annotations

import subprocess
import sys


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_gradwatch_loads_neither_torch_nor_pandas():
    loaded = _loaded_after("import gradwatch")
    assert "torch" not in loaded and "pandas" not in loaded


def test_reader_diagnosis_and_report_never_load_torch():
    loaded = _loaded_after("import gradwatch, gradwatch.report, gradwatch.cli\n"
                           "gradwatch.load_run, gradwatch.diagnose, gradwatch.Report, gradwatch.Finding\n"
                           "import gradwatch.detect as d; d._load()")
    assert "torch" not in loaded
    assert "gradwatch.detect.nan_inf" in loaded and "pandas" in loaded
