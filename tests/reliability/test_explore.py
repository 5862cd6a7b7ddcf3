"""``fxlens explore``: stopping it (SIGTERM, SIGHUP, SIGKILL) stops the server it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Runs ``fxlens explore`` with a stand-in for the Streamlit server that writes its pid and sleeps.
LAUNCHER = """
import sys
import fxlens.explorer.launch as launch
child = [sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)",
         sys.argv[1]]
launch.streamlit_command = lambda args: child
from fxlens.cli import main
sys.exit(main(["explore", "--model", "unused"]))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _start(tmp_path):
    pidfile = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(pidfile)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        assert parent.poll() is None, parent.communicate()
        time.sleep(0.05)
    return parent, int(pidfile.read_text())


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 128 + signal.SIGTERM),
                                             (signal.SIGHUP, 128 + signal.SIGHUP), (signal.SIGKILL, -signal.SIGKILL)])
def test_stopping_explore_stops_the_server(tmp_path, sig, status):
    parent, child = _start(tmp_path)
    try:
        assert _alive(child)
        parent.send_signal(sig)
        assert parent.wait(30) == status
        assert _gone_within(child, 10), "the server outlived fxlens explore"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
