"""The ``fxlens`` command line.

    fxlens sites MODEL [--filter TEXT] [--block L]   the hook site table of a model
    fxlens lens train|eval|plot --model M --text T --out DIR   tuned / logit lenses
    fxlens explore --model MODEL [--port 8501] [--lens DIR]    local web app (Streamlit) on 127.0.0.1

MODEL is a hub name, a local HF folder, a ``.gguf`` file, or ``offline:smollm2`` /
``offline:minilm`` for the models shipped by the offline packages. Subcommands are
argparse subparsers: add one with a ``_add_<name>`` function and list it in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import os
import sys

#: Exceptions that mean the user asked for something that cannot be done (a missing file, a bad value):
#: printed as one line, exit status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, KeyError)


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


def _load(model: str, dtype: str = "float32", device: str = "cpu", device_map: str | None = None):
    import torch

    import fxlens

    check_device(device)
    model = resolve_model(model)
    kw = {"device_map": device_map} if device_map else {}
    return fxlens.from_pretrained(model, dtype=getattr(torch, dtype), device=device, **kw)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="hub name, local folder, .gguf file, or offline:smollm2 / offline:minilm")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")


# -- sites ----------------------------------------------------------------------------------
def _add_sites(sub) -> None:
    p = sub.add_parser("sites", help="print the hook site table (name, shape, HF module, found by)",
                       description="Trace MODEL and print every hook site with its shape, the HF module "
                                   "it was found in, and how it was found (family rule or discovery).")
    _model_args(p)
    p.add_argument("--filter", default=None, help="only sites whose name contains this text")
    p.add_argument("--block", type=int, default=None, metavar="L",
                   help="only this block's sites (plus the sites outside the blocks)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=_cmd_sites)


def _cmd_sites(args) -> int:
    m = _load(args.model, args.dtype, args.device)
    rows = m.site_table()
    if args.block is not None and not 0 <= args.block < m.cfg.n_layers:
        raise ValueError(f"--block {args.block} is out of range: the model has {m.cfg.n_layers} blocks "
                         f"(give 0 to {m.cfg.n_layers - 1})")
    if args.block is not None:
        prefix = f"blocks.{args.block}."
        rows = [r for r in rows if r["name"].startswith(prefix) or not r["name"].startswith("blocks.")]
    if args.filter:
        rows = [r for r in rows if args.filter in r["name"]]
    cols = ("name", "shape", "module", "found_by")
    heads = ("site", "shape", "HF module", "found by")
    print(repr(m))
    if args.markdown:
        print("| " + " | ".join(heads) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(f"`{r[c]}`" if c != "found_by" else str(r[c]) for c in cols) + " |")
    else:
        w = [max([len(h)] + [len(str(r[c])) for r in rows]) for c, h in zip(cols, heads)]
        print("  ".join(h.ljust(n) for h, n in zip(heads, w)).rstrip())
        for r in rows:
            print("  ".join(str(r[c]).ljust(n) for c, n in zip(cols, w)).rstrip())
    print(f"{len(rows)} of {len(m.all_hook_names)} sites shown")
    return 0


# -- lens -----------------------------------------------------------------------------------
def _add_lens(sub) -> None:
    from .lenses.commands import add_lens

    add_lens(sub)


# -- explore --------------------------------------------------------------------------------
def _add_explore(sub) -> None:
    from .explorer.launch import add_explore

    add_explore(sub)


_COMMANDS = (_add_sites, _add_lens, _add_explore)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxlens", description="TransformerLens-style hooks on HF models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; a user error prints ``fxlens: error: ...`` (no traceback) and returns 2.

    ``FXLENS_DEBUG=1`` shows the traceback of user errors too.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("FXLENS_DEBUG", "0") != "0":
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"fxlens: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
