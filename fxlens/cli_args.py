"""What the ``fxlens`` subcommands share: argparse value types and loading ``MODEL``."""

from __future__ import annotations

import argparse
import os


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, not {value}")
    return value


def check_device(device: str) -> None:
    """Raise ``ValueError`` for a ``--device`` that is malformed or absent on this machine."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ValueError(f"--device {device}: this machine has {count} CUDA devices; use --device cpu"
                             + (f" or cuda:0..cuda:{count - 1}" if count else ""))


def resolve_model(model: str) -> str:
    """The path or hub name behind ``MODEL`` (``offline:NAME`` -> its installed path); missing folders raise."""
    import fxlens
    from fxlens.checkpoints import check_path

    if model.startswith("offline:"):
        return fxlens.offline_model_path(model.split(":", 1)[1])
    if model.endswith(".gguf"):
        check_path(os.path.dirname(model) or ".", os.path.basename(model))
    else:
        check_path(model)
    return model


def load_model(model: str, dtype: str = "float32", device: str = "cpu", device_map: str | None = None):
    import torch

    import fxlens

    check_device(device)
    model = resolve_model(model)
    kw = {"device_map": device_map} if device_map else {}
    return fxlens.from_pretrained(model, dtype=getattr(torch, dtype), device=device, **kw)
