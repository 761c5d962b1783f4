"""`gradwatch dashboard` after a plain, non-editable install of the wheel, and the launcher's own checks.

The wheel is built from a copy of the checkout and installed with `--no-deps` into a fresh venv that sees the
dev environment's packages (streamlit, torch, ...) through a .pth line, so the test needs no network. The
app must come from the installed package `gradwatch._dashboard`, never from the checkout.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

from gradwatch import _launch
from gradwatch.cli import main

REPO = Path(__file__).resolve().parent.parent
BIN = "Scripts" if os.name == "nt" else "bin"
HAS_STREAMLIT = importlib.util.find_spec("streamlit") is not None and importlib.util.find_spec("altair") is not None


def _checkout_copy(dst: Path) -> Path:
    """The files git would ship (tracked, and untracked but not ignored), copied: builds leave the tree alone."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files ship")
    tmp = tmp_path_factory.mktemp("wheel")
    src = _checkout_copy(tmp / "src")
    # without build isolation when setuptools is here: no download of the build backend
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp / "dist"),
                    str(src)], check=True, cwd=tmp)
    (whl,) = (tmp / "dist").glob("gradwatch-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel (non-editable), which sees the dev environment's other packages."""
    env = tmp_path_factory.mktemp("venv") / "env"
    venv.create(env, system_site_packages=True, with_pip=False)
    py = env / BIN / ("python.exe" if os.name == "nt" else "python")
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # a plain path line: the dev site-packages' own .pth files (its editable gradwatch) are not run
    dev = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (purelib / "zz_dev_env.pth").write_text("\n".join(dev) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, cwd=env.parent)
    return env


def test_the_wheel_ships_the_app_as_gradwatch_dashboard_and_every_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"gradwatch/_dashboard/app.py", "gradwatch/_dashboard/__init__.py", "gradwatch/_dashboard/_state.py",
            "gradwatch/_dashboard/overview.py", "gradwatch/_dashboard/run_page.py",
            "gradwatch/_dashboard/compare.py"} <= names
    assert not any(n.startswith("dashboard/") for n in names), "a generic top-level `dashboard` package"
    # pyproject lists the packages by hand (packages.find cannot remap dashboard/): none may be forgotten
    for d in (REPO / "gradwatch").rglob("*"):
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")):
            rel = d.relative_to(REPO).as_posix()
            assert any(n.startswith(rel + "/") for n in names), f"{rel} is missing from the wheel: add it to " \
                                                                  "[tool.setuptools] packages in pyproject.toml"


def _run(py: Path, code: str, cwd: Path) -> str:
    out = subprocess.run([str(py), "-c", code], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_installed_package_finds_its_app_outside_the_checkout(installed, tmp_path):
    py = installed / BIN / "python"
    code = ("import importlib.resources as r, gradwatch, gradwatch._launch as l\n"
            "print(gradwatch.__file__)\n"
            "print((r.files('gradwatch._dashboard') / 'app.py').is_file())\n"
            "print(l.app_path())\n"
            "import importlib.util; print(importlib.util.find_spec('dashboard'))")
    pkg, has_app, app, top = _run(py, code, tmp_path).splitlines()
    assert Path(pkg).resolve().is_relative_to(installed.resolve())
    assert has_app == "True"
    assert Path(app).resolve().is_relative_to(installed.resolve()) and Path(app).name == "app.py"
    assert top == "None"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except OSError:
        return None


@pytest.mark.skipif(not HAS_STREAMLIT, reason="streamlit/altair not installed (pip install '.[dashboard]')")
def test_gradwatch_dashboard_serves_the_installed_app(installed, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    port = _free_port()
    exe = installed / BIN / "gradwatch"
    log = open(tmp_path / "server.log", "wb")
    srv = subprocess.Popen([str(exe), "dashboard", str(runs), "--port", str(port)], cwd=tmp_path, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, root, health = time.monotonic() + 40, None, None
        while time.monotonic() < deadline and srv.poll() is None and not (root == health == 200):
            root, health = _get(f"http://127.0.0.1:{port}/"), _get(f"http://127.0.0.1:{port}/_stcore/health")
            time.sleep(0.3)
        log.flush()
        output = (tmp_path / "server.log").read_text(errors="replace")
        assert root == 200 and health == 200, f"GET / -> {root}, /_stcore/health -> {health}\n{output[-2000:]}"
        assert str(REPO) not in output
    finally:
        try:
            os.killpg(srv.pid, signal.SIGTERM)
            srv.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(srv.pid, signal.SIGKILL)
            srv.wait(10)
        log.close()


# ---- the launcher, in-process ---------------------------------------------------------------------------------
def test_without_streamlit_it_prints_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "streamlit", None)  # `import streamlit` now fails, as if not installed
    called = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: called.append(a))
    assert _launch.launch_dashboard(tmp_path) == 2
    err = capsys.readouterr().err
    assert err == 'gradwatch dashboard needs the dashboard extra: pip install "gradwatch[dashboard]"\n'
    assert not called
    assert main(["dashboard", str(tmp_path)]) == 2


def test_a_missing_runs_dir_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path / "nope"), "--port", "8599"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "nope" in err
    (tmp_path / "file").write_text("x")
    assert main(["dashboard", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("port", [0, 70000, -1])
def test_a_bad_port_is_refused(tmp_path, capsys, port):
    assert main(["dashboard", str(tmp_path), "--port", str(port)]) == 2
    assert "--port" in capsys.readouterr().err


def test_the_command_it_runs(tmp_path):
    cmd = _launch.streamlit_command(tmp_path, port=8123, host="0.0.0.0")
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4].endswith("app.py")
    flags = dict(zip(cmd[5:-2:2], cmd[6:-2:2]))
    assert flags["--server.address"] == "0.0.0.0" and flags["--server.port"] == "8123"
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    assert cmd[-2:] == ["--", str(tmp_path.resolve())]


def test_the_app_is_found_in_this_checkout(monkeypatch):
    """Editable installs (and ones made before the mapping) find dashboard/app.py of the checkout."""
    assert _launch.app_path() == REPO / "dashboard" / "app.py"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert _launch.app_path() == REPO / "dashboard" / "app.py"


def test_launch_runs_streamlit_and_returns_its_exit_status(monkeypatch, tmp_path):
    seen = {}

    class FakePopen:
        def __init__(self, cmd):
            seen["cmd"] = cmd

        def wait(self, timeout=None):
            return 3

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr(_launch, "_has_extra", lambda: True)
    assert _launch.launch_dashboard(tmp_path, port=8124) == 3
    assert seen["cmd"][-1] == str(tmp_path.resolve()) and "8124" in seen["cmd"]
