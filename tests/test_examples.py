"""Every script in examples/ runs to the end and leaves a readable run behind."""
import subprocess
import sys
from pathlib import Path

import pytest

import gradwatch

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    run_dir = tmp_path / script.stem
    proc = subprocess.run([sys.executable, str(script), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = gradwatch.load_run(run_dir)
    assert len(run.steps) > 0
    assert run.meta["status"] == "finished"
    assert str(run_dir) in proc.stdout
