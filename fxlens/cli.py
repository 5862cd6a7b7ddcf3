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

from .cli_args import check_device, load_model, port_number, positive_int, resolve_model

__all__ = ["build_parser", "check_device", "load_model", "main", "port_number", "positive_int", "resolve_model"]

#: Exceptions that mean the user asked for something that cannot be done (a missing file, a bad value):
#: printed as one line, exit status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, KeyError)


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
    m = load_model(args.model, args.dtype, args.device)
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
