"""The README's set-up commands are the ones CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "pip install" in line and "pytest" in line]


def test_ci_runs_the_readme_test_command():
    readme = _commands((ROOT / "README.md").read_text())
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert len(readme) == 1 and len(ci) == 1
    assert readme[0] == ci[0]


def test_readme_installs_cpu_torch_before_the_project():
    text = (ROOT / "README.md").read_text()
    for line in text.splitlines():
        if re.search(r"pip install .*\.\[", line):
            assert line.index("torch==2.13.0") < line.index(".[")
