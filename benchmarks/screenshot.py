"""Screenshots of the dashboard on the demo runs, for the README: docs/img/overview.png and docs/img/dashboard.png.

Runs `gradwatch demo --no-dashboard`, starts `gradwatch dashboard` on a free port, and drives headless Debian
chromium through playwright: the runs overview, then the run page of one sick run, 1400 px wide.

    python benchmarks/screenshot.py [--runs-dir runs/demo] [--run exploding] [--out docs/img]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
WIDTH = 1400


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", default="runs/demo", help="where the demo writes its runs (default runs/demo)")
    ap.add_argument("--run", default="exploding", help="the run whose page is shot (default exploding)")
    ap.add_argument("--out", default="docs/img", help="folder for overview.png and dashboard.png")
    ap.add_argument("--max-height", type=int, default=2600, help="crop the run page to this many px (0: whole)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    gw = [sys.executable, "-m", "gradwatch"]
    subprocess.run(gw + ["demo", "--no-dashboard", "--runs-dir", args.runs_dir], check=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = tempfile.TemporaryFile()  # a file, not an unread pipe that could block a chatty server
    srv = subprocess.Popen(gw + ["dashboard", args.runs_dir, "--port", str(port)], stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_listening(port, srv)
        base = f"http://127.0.0.1:{port}/"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            pg = browser.new_page(viewport={"width": WIDTH, "height": 1000})
            pg.goto(base, timeout=30000)
            pg.wait_for_selector(f"text={args.run}", timeout=30000)
            _settle(pg, charts=0)
            _shoot(pg, out / "overview.png", 0)
            link = pg.locator(f"a:has-text('{args.run}')").first
            if link.count():  # Streamlit opens markdown links in a new tab: follow the href in this one
                pg.goto(link.evaluate("a => a.href"), timeout=30000)
            else:
                pg.locator(f"text={args.run}").first.click(timeout=5000)
            _settle(pg, charts=2)
            _shoot(pg, out / "dashboard.png", args.max_height)
            browser.close()
    except BaseException:
        log.seek(0)
        print("dashboard server output:", log.read().decode(errors="replace")[-3000:], sep="\n", file=sys.stderr)
        raise
    finally:
        _stop(srv)
    for name in ("overview.png", "dashboard.png"):
        print(out / name)
    return 0


def _settle(pg, charts: int, timeout: float = 60) -> None:
    """Wait until Streamlit's script run is over, at least `charts` Vega charts show, and their count holds."""
    deadline, last, stable = time.monotonic() + timeout, -1, 0
    while time.monotonic() < deadline:
        if pg.locator("[data-testid='stException']").count():
            raise RuntimeError("the dashboard shows an exception:\n" + pg.inner_text("body")[:2000])
        busy = pg.locator("[data-test-script-state]:not([data-test-script-state='notRunning'])").count()
        n = pg.locator(".vega-embed").count()
        stable = stable + 1 if (n == last and not busy and n >= charts) else 0
        if stable >= 4:  # two seconds without change
            pg.wait_for_timeout(500)  # let the last chart finish drawing
            return
        last = n
        time.sleep(0.5)
    raise RuntimeError(f"the page did not settle within {timeout:.0f}s ({last} charts)")


def _shoot(pg, path: Path, max_height: int) -> None:
    """Streamlit scrolls its main block, not the document, so a full-page shot would stop at the viewport:
    grow the viewport to the content's height (at most `max_height`) and shoot that."""
    height = pg.evaluate("""() => Math.max(document.documentElement.scrollHeight, ...Array.from(
        document.querySelectorAll("[data-testid='stMain'], [data-testid='stAppViewContainer'], section"),
        e => e.scrollHeight))""")
    if max_height:
        height = min(height, max_height)
    pg.set_viewport_size({"width": WIDTH, "height": max(int(height), 600)})
    pg.wait_for_timeout(1500)  # Vega redraws charts at the new size
    pg.screenshot(path=str(path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, srv: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.poll() is not None:
            raise RuntimeError(f"gradwatch dashboard exited with {srv.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"gradwatch dashboard never listened on port {port}")


def _stop(srv: subprocess.Popen) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
