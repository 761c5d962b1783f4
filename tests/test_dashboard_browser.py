"""The dashboard in a real browser: `gradwatch dashboard` served to headless Chromium over a run still being written.

Checks what only a browser can: the Vega charts render, no Streamlit exception box shows, a finding is listed,
and steps appended to the run appear on the open page without a reload. Needs Debian's `chromium` and the
`playwright` package (`.ci/run` installs chromium); skipped with the reason when either is missing.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
RUN = "tinymlp"  # the run's folder name, as the overview lists it

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed (pip install playwright); needed to drive chromium"),
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason="chromium is not installed (apt-get install chromium; .ci/run does it)"),
    pytest.mark.skipif(importlib.util.find_spec("streamlit") is None,
                       reason="streamlit is not installed (pip install '.[dashboard]')"),
]


class _Training:
    """A tiny MLP trained with the missing-zero_grad bug, under a Watcher that stays open between calls."""

    def __init__(self, run_dir: Path):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.gw = gradwatch.watch(self.model, optimizer=self.opt, run_dir=run_dir, detect_every=0.2)

    def steps(self, n: int) -> None:
        for _ in range(n):
            x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()  # no opt.zero_grad(): the planted bug, found as missing_zero_grad
            self.opt.step()
            self.gw.step(loss)
        self.gw.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, srv: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.poll() is not None:
            raise AssertionError(f"gradwatch dashboard exited with {srv.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"gradwatch dashboard never listened on port {port} within {timeout:.0f}s")


def _step_count(text: str) -> int:
    """The run page's "Steps" metric (label, then the value on the next line: "Steps\n1,234"); -1 when absent."""
    m = re.search(r"^Steps\s*\n\s*([\d,]+)\s*$", text, flags=re.MULTILINE)
    return int(m.group(1).replace(",", "")) if m else -1


def _idle(pg) -> bool:
    """Streamlit has finished its script run (nothing still running or re-running)."""
    return not pg.locator("[data-test-script-state]:not([data-test-script-state='notRunning'])").count()


def _lists_finding(text: str) -> bool:
    return "zero grad" in text.lower().replace("_", " ")


def _open_run_page(pg, base: str) -> None:
    """From the overview, open the run's page by following its link's href in this tab (the overview's
    st.page_link would stay in the tab too; a markdown link would open a new one)."""
    pg.goto(base, timeout=30000)
    pg.wait_for_selector(f"text={RUN}", timeout=30000)
    link = pg.locator(f"a:has-text('{RUN}')").first
    if link.count():
        pg.goto(link.evaluate("a => a.href"), timeout=30000)  # absolute, whatever the app wrote
    else:
        pg.locator(f"text={RUN}").first.click(timeout=5000)


def _wait_for(pg, ok, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pg.locator("[data-testid='stException']").count():
            return False
        if _idle(pg) and ok():
            return True
        time.sleep(0.5)
    return False


def test_dashboard_renders_a_live_run_and_updates_without_reload(tmp_path):
    from playwright.sync_api import sync_playwright

    runs = tmp_path / "runs"
    training = _Training(runs / RUN)
    log = open(tmp_path / "server.log", "wb")  # a file, not a pipe nobody reads, which could block the server
    srv = None
    try:
        training.steps(40)
        port = _free_port()
        env = dict(os.environ, STREAMLIT_SERVER_HEADLESS="true", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
        srv = subprocess.Popen([sys.executable, "-m", "gradwatch", "dashboard", str(runs), "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_listening(port, srv)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                pg = browser.new_page(viewport={"width": 1400, "height": 1800})
                _open_run_page(pg, f"http://127.0.0.1:{port}/")
                rendered = _wait_for(pg, lambda: pg.locator(".vega-embed").count() >= 2
                                     and _lists_finding(pg.inner_text("body")), timeout=60)
                body = pg.inner_text("body")
                assert not pg.locator("[data-testid='stException']").count(), f"exception box shown:\n{body[:2000]}"
                assert pg.locator(".vega-embed").count() >= 2, f"vega charts: {pg.locator('.vega-embed').count()}"
                assert _lists_finding(body), f"no missing_zero_grad finding on the page:\n{body[:2000]}"
                assert rendered
                before = _step_count(body)
                assert before >= 39, f"the page states no step count of the 40-step run:\n{body[:2000]}"

                pg.evaluate("() => { window.__gwNoReload = 1 }")  # a reload or navigation would drop it
                training.steps(30)
                # all 30 are flushed now; a refresh during training may have shown some of them already
                grew = _wait_for(pg, lambda: _step_count(pg.inner_text("body")) >= before + 30, timeout=30)
                after = _step_count(pg.inner_text("body"))
                assert grew, f"the page's step count went {before} -> {after}, not +30, after 30 more steps"
                assert pg.evaluate("() => window.__gwNoReload") == 1, "the page reloaded to show the new steps"
                assert not pg.locator("[data-testid='stException']").count()
                _screenshot(pg, tmp_path / "dashboard.png")
            finally:
                browser.close()
    except AssertionError as e:
        log.flush()
        tail = (tmp_path / "server.log").read_text(errors="replace").splitlines()[-20:]
        raise AssertionError(f"{e}\n--- dashboard server output, last lines:\n" + "\n".join(tail)) from None
    finally:
        if srv is not None:
            _stop(srv)
        log.close()
        training.gw.close()


def _screenshot(pg, path: Path) -> None:
    pg.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("GRADWATCH_SCREENSHOT")
    if extra:
        Path(extra).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, extra)


def _stop(srv: subprocess.Popen) -> None:
    """End the server's whole process group (streamlit may fork), gently first."""
    try:
        os.killpg(srv.pid, signal.SIGTERM)
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(srv.pid, signal.SIGKILL)  # also whatever of the group outlived the CLI process
    except ProcessLookupError:
        pass
    srv.wait(10)
