"""Drive the explorer in a real browser: start ``fxlens explore`` on loopback, screenshot every page.

Used by the end-to-end test (tiny model) and by ``make explorer-shots`` (SmolLM2, README screenshots):

    python -m tests.explorer.browser --model offline:smollm2 --out docs/explorer

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``)
and the ``selenium`` package.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: A rendered plotly figure (its SVG layer), and the marks of a failed page.
CHART_CSS = '[data-testid="stPlotlyChart"]'
PLOT_CSS = f"{CHART_CSS} .main-svg"
ERROR_CSS = '[data-testid="stException"], [data-testid="stAlertContentError"]'
# The Chromium flags this closed-network machine needs (background fetches otherwise fail many at a time).
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1500,1100")


def browser_available() -> str | None:
    """``None`` if Chromium, ChromeDriver and selenium are all present, else what is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    return ", ".join(missing) or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def explorer_server(model: str, port: int | None = None, timeout: float = 180.0,
                    log: Path | None = None) -> Iterator[str]:
    """``fxlens explore --model MODEL`` in a subprocess on 127.0.0.1; yields its URL once it answers."""
    port = port or free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "fxlens.cli", "explore", "--model", model, "--port", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"fxlens explore exited with {proc.returncode} before serving {url}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"fxlens explore did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log:
            out.close()


@dataclass
class Shot:
    """One page as the browser rendered it."""

    page: str
    png: Path
    plots: int  # plotly charts drawn (with their SVG)
    header: str


def screenshot_pages(url: str, pages: list[str], out: Path, timeout: float = 240.0) -> list[Shot]:
    """Open ``url/?page=P`` for each page in headless Chromium, wait for a rendered plot, save a PNG.

    Raises if a page shows an error or no plot appears within ``timeout`` seconds.
    """
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    out.mkdir(parents=True, exist_ok=True)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    shots = []
    try:
        for page in pages:
            driver.get(f"{url}/?page={page}")
            found = lambda d: d.find_elements(By.CSS_SELECTOR, ERROR_CSS) or d.find_elements(By.CSS_SELECTOR, PLOT_CSS)  # noqa: E731
            try:
                WebDriverWait(driver, timeout, poll_frequency=0.5).until(found)
            except TimeoutException:
                driver.save_screenshot(str(out / f"{page}-timeout.png"))
                raise TimeoutError(f"page {page!r}: no plot rendered within {timeout:.0f} s") from None
            errors = driver.find_elements(By.CSS_SELECTOR, ERROR_CSS)
            if errors:
                raise RuntimeError(f"page {page!r} shows an error: {errors[0].text[:500]}")
            # Let the rest of the page (later charts, tables) finish: wait until the app is idle.
            WebDriverWait(driver, timeout, poll_frequency=0.5).until(
                lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'))
            time.sleep(1.0)
            png = out / f"{page}.png"
            driver.save_screenshot(str(png))
            headers = driver.find_elements(By.CSS_SELECTOR, "h2")
            charts = [c for c in driver.find_elements(By.CSS_SELECTOR, CHART_CSS)
                      if c.find_elements(By.CSS_SELECTOR, ".main-svg")]
            shots.append(Shot(page, png, len(charts), headers[0].text if headers else ""))
    finally:
        driver.quit()
    return shots


def main() -> None:
    from fxlens.explorer.app import PAGES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pages", nargs="*", default=list(PAGES))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.gettempdir()) / "fxlens-explorer-server.log"
    print(f"server log: {log}")
    with explorer_server(a.model, log=log) as url:
        for s in screenshot_pages(url, a.pages, a.out):
            print(f"{s.page}: {s.plots} plot(s), header {s.header!r} -> {s.png}")


if __name__ == "__main__":
    main()
