"""``fxlens explore --model MODEL``: start the explorer's Streamlit server on 127.0.0.1."""

from __future__ import annotations

import argparse
import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

from ..cli_args import check_device, port_number, resolve_model

APP = Path(__file__).with_name("app.py")


def add_explore(sub) -> None:
    """Register ``fxlens explore``."""
    p = sub.add_parser("explore", help="local web app: attention, DLA, OV/QK circuits, head ablation, lenses",
                       description="Start the fxlens explorer (Streamlit) on 127.0.0.1 and print its URL. Pages: "
                                   "attention patterns, direct logit attribution, OV/QK circuits, head ablation "
                                   "browser, logit / tuned lens (also just before a chosen head).")
    p.add_argument("--model", required=True,
                   help="hub name, local folder, .gguf file, or offline:smollm2 (the shipped SmolLM2-135M)")
    p.add_argument("--lens", default=None, help="tuned lens folder for the lens page (default: logit lens)")
    p.add_argument("--port", type=port_number, default=8501, help="port on 127.0.0.1 (default: 8501)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--open-browser", action="store_true", help="open a browser tab (default: just print the URL)")
    p.set_defaults(func=cmd_explore)


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The ``python -m streamlit run`` command line for ``args``."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", "127.0.0.1",
           "--server.port", str(args.port), "--server.headless", "false" if args.open_browser else "true",
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
           "--", "--model", args.model, "--dtype", args.dtype,
           "--device", args.device]
    return cmd + (["--lens", args.lens] if args.lens else [])


def cmd_explore(args: argparse.Namespace) -> int:
    for pkg in ("streamlit", "plotly", "pandas"):
        if importlib.util.find_spec(pkg) is None:
            raise SystemExit(f"fxlens explore needs {pkg}: pip install 'fxlens[explore]' (streamlit, plotly)")
    # Refuse what the app would only report in the browser after the server started.
    check_device(args.device)
    resolve_model(args.model)
    if args.lens and not (Path(args.lens) / "config.json").is_file():
        raise FileNotFoundError(f"{args.lens} is not a lens folder: no config.json "
                                "(train one with `fxlens lens train`)")
    print(f"fxlens explorer for {args.model}: http://127.0.0.1:{args.port} (Ctrl+C stops it)", flush=True)
    return run_child(streamlit_command(args))


def _die_with_parent() -> None:  # Linux: the child gets SIGTERM if this process dies, even by SIGKILL
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_child(cmd: list[str], grace_s: float = 10.0) -> int:
    """Run ``cmd`` until it ends; SIGTERM / SIGHUP / Ctrl+C of this process stop the child too.

    Returns the child's exit status (``128 + signal`` when a signal ended it, as a shell reports it).
    """
    child = subprocess.Popen(cmd, preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def forward(signum, frame):
        child.send_signal(signum)

    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, forward) for s in signals}
    try:
        rc = child.wait()
    except KeyboardInterrupt:  # Ctrl+C reached the child too (same process group): let it shut down
        rc = 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return 128 - rc if rc < 0 else rc
