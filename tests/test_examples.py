"""Every script in examples/ runs to the end and leaves a readable run behind."""
import subprocess
import sys
from pathlib import Path

import pytest

import gradwatch

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
TORCHRUN = {"ddp_example": 2}  # launched as its docstring says: torchrun --nproc_per_node N


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    run_dir = tmp_path / script.stem
    launch = [sys.executable]
    if script.stem in TORCHRUN:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(TORCHRUN[script.stem]),
                   "--standalone"]
    proc = subprocess.run([*launch, str(script), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = gradwatch.load_run(run_dir)
    assert len(run.steps) > 0
    assert run.meta["status"] == "finished"
    assert str(run_dir) in proc.stdout
