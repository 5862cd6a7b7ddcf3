"""Shared pieces of the explorer: model specs, tokens, plotly figures, caching and error display.

Computations elsewhere in :mod:`fxlens.explorer` take a :class:`~fxlens.HookedModel` and plain
values and return dataclasses of tensors; only the ``render`` functions import Streamlit. This
module's Streamlit helpers import it lazily, so the computations run (and are tested) without it.
"""

from __future__ import annotations

import functools
import html
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import cli_args

MODEL_ENV, LENS_ENV = "FXLENS_EXPLORE_MODEL", "FXLENS_EXPLORE_LENS"
DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
#: Short, varied texts for the head ablation browser and the "frequent tokens" subset of the circuits page.
EXAMPLES: tuple[str, ...] = (
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "She opened the door slowly. The room was dark, and the door creaked behind her.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "The cat sat on the mat. The dog sat on the rug. The cat looked at the dog.",
    "In 1969, astronauts landed on the Moon for the first time in history.",
    "Water boils at 100 degrees Celsius at sea level, and freezes at 0 degrees.",
    "Alice sent a letter to Bob. Bob read the letter and replied to Alice the next day.",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps again.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.",
    "To make tea, boil the water, add the tea leaves, and wait for three minutes.",
    "The meeting was moved from Tuesday to Thursday because the manager was ill.",
    "Harry Potter and Hermione Granger walked to the library, where Harry found a book.",
    "import numpy as np\nx = np.zeros(10)\nprint(x.shape)",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
)
_REGISTRY: dict[str, Any] = {}
Progress = Callable[[float, str], None]


# -- models ------------------------------------------------------------------------------------
def register_model(model, name: str = "model") -> str:
    """Make an already traced model loadable by the app as ``registered:NAME`` (same process only:
    tests, notebooks running the app in a thread)."""
    _REGISTRY[name] = model
    return f"registered:{name}"


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """A :class:`~fxlens.HookedModel` from a hub name, local folder, ``.gguf`` file, ``offline:NAME`` or
    ``registered:NAME`` (see :func:`register_model`)."""
    spec = spec.strip()
    if not spec:
        raise ValueError(f"no model given: pass --model MODEL (or set {MODEL_ENV})")
    if spec.startswith("registered:"):
        name = spec.split(":", 1)[1]
        if name not in _REGISTRY:
            raise KeyError(f"no model registered as {name!r} in this process (known: {sorted(_REGISTRY)}); "
                           "call fxlens.explorer.register_model(model, name) first")
        return _REGISTRY[name]
    return cli_args.load_model(spec, dtype, device)


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def check_head(model, layer: int, head: int) -> None:
    """Raise ``ValueError`` unless ``(layer, head)`` exists in ``model``."""
    if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
        raise ValueError(f"head L{layer}H{head} does not exist: layers 0..{model.cfg.n_layers - 1}, "
                         f"heads 0..{model.cfg.n_heads - 1}")


# -- tokens ------------------------------------------------------------------------------------
def prompt_tokens(model, prompt: str, max_tokens: int | None = None) -> torch.Tensor:
    """``[1, pos]`` ids of ``prompt`` (the tokenizer's own special tokens), cut to the model's context."""
    if not prompt:
        raise ValueError("empty prompt: type some text")
    ids = model.to_tokens(prompt)
    limits = [x for x in (model.cfg.n_ctx, max_tokens) if x]
    return ids[:, :min(limits)] if limits else ids


def str_tokens(model, ids: torch.Tensor | Sequence[int]) -> list[str]:
    """Each id decoded on its own."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return [model.tokenizer.decode([i]) for i in ids]


_VOCAB: dict[int, tuple[Any, list[str]]] = {}


def vocab_strings(model) -> list[str]:
    """Every token id decoded on its own (memoised per tokenizer)."""
    tok = model.tokenizer
    hit = _VOCAB.get(id(tok))
    if hit is None or hit[0] is not tok:
        hit = _VOCAB[id(tok)] = (tok, tok.batch_decode([[i] for i in range(model.cfg.d_vocab)]))
    return hit[1]


def prompt_str_tokens(model, prompt: str) -> list[str]:
    """The prompt's tokens as text (what :func:`prompt_tokens` gives, decoded one by one)."""
    return str_tokens(model, prompt_tokens(model, prompt)[0])


def show_token(text: str) -> str:
    """A visible, one-line rendering of a token (spaces as ``·``, control characters escaped)."""
    text = text.replace(" ", "·")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "∅"


def single_token(model, text: str) -> int:
    """The id of ``text`` if it is one token (``#123`` gives id 123); raises ``ValueError`` otherwise."""
    if text.startswith("#") and text[1:].isdigit():
        tid = int(text[1:])
        if not 0 <= tid < model.cfg.d_vocab:
            raise ValueError(f"token id {tid} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
        return tid
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [show_token(t) for t in str_tokens(model, ids)]
        raise ValueError(f"{text!r} is {len(ids)} tokens {pieces}, not one: pick a single token "
                         "(often with a leading space, e.g. ' Mary'), or give an id as #123")
    return ids[0]


def parse_token_list(model, text: str, leading_space: bool = True) -> list[int]:
    """Comma-separated words (``"Mary, John, #42"``) as single token ids: each word with a leading space
    when ``leading_space`` and that is one token (the usual form of a word inside text), else the bare
    word; duplicates dropped, order kept. Raises ``ValueError`` for a word that is neither."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if leading_space and not part.startswith("#"):
            try:
                out.append(single_token(model, " " + part))
                continue
            except ValueError:
                pass
        out.append(single_token(model, part))
    return list(dict.fromkeys(out))


@torch.no_grad()
def top_predictions(model, prompt: str, position: int = -1, k: int = 10) -> list[tuple[str, int, float]]:
    """The ``k`` most likely next tokens at ``position``: ``[(text, id, probability)]``."""
    ids = prompt_tokens(model, prompt)
    probs = torch.softmax(model(ids)[0, position].float(), -1)
    p, i = probs.topk(k)
    return [(model.tokenizer.decode([t]), t, float(v)) for t, v in zip(i.tolist(), p.tolist())]


# -- figures -----------------------------------------------------------------------------------
def heatmap(z, x: Sequence[str], y: Sequence[str], *, title: str = "", xlabel: str = "", ylabel: str = "",
            diverging: bool = True, text: list[list[str]] | None = None, hover: str = "%{z:.3f}",
            height: int | None = None, colorscale: str | None = None, pair: str = "{y}, {x}"):
    """A plotly heatmap with categorical axes that keep duplicate labels apart (numeric ticks).

    ``pair`` formats each cell's hover label from its row ``y`` and column ``x`` labels."""
    import plotly.graph_objects as go

    z = z.detach().float().cpu().numpy() if isinstance(z, torch.Tensor) else z
    lim = float(abs(z).max()) if diverging and z.size else None
    kw = dict(zmid=0, zmin=-lim, zmax=lim) if diverging and lim else {}
    trace = go.Heatmap(z=z, x=list(range(len(x))), y=list(range(len(y))), colorscale=colorscale or (
        "RdBu_r" if diverging else "Viridis"), text=text, texttemplate="%{text}" if text else None,
        customdata=[[pair.format(y=yy, x=xx) for xx in x] for yy in y], hovertemplate=f"%{{customdata}}<br>{hover}"
        "<extra></extra>", **kw)
    fig = go.Figure(trace)
    fig.update_layout(title=title, margin=dict(l=10, r=10, t=40 if title else 10, b=10),
                      height=height or max(320, 22 * len(y) + 120))
    fig.update_xaxes(tickvals=list(range(len(x))), ticktext=list(x), title=xlabel, tickangle=-60 if len(x) > 6 else 0)
    fig.update_yaxes(tickvals=list(range(len(y))), ticktext=list(y), title=ylabel, autorange="reversed")
    return fig


def colored_tokens_html(tokens: Sequence[str], values: Sequence[float], vmax: float | None = None,
                        fmt: str = "{:+.3f}") -> str:
    """Tokens as inline spans coloured by value (red positive, blue negative); the value shows on hover."""
    vals = [float(v) for v in values]
    finite = [abs(v) for v in vals if v == v]
    vmax = vmax or max(finite, default=1.0) or 1.0
    spans = []
    for tok, v in zip(tokens, vals):
        a = 0.0 if v != v else min(abs(v) / vmax, 1.0)
        rgb = "220,38,38" if v > 0 else "37,99,235"
        tip = "no prediction" if v != v else fmt.format(v)
        spans.append(f'<span title="{html.escape(tip)}" style="background:rgba({rgb},{a:.2f});padding:1px 0;'
                     f'border-radius:2px">{html.escape(tok).replace(chr(10), "↵<br>")}</span>')
    return ('<div style="font-family:monospace;line-height:1.9;white-space:pre-wrap">' + "".join(spans) + "</div>")


def token_picker(label: str, options: list[tuple[str, int, float]], default: int | None, key: str,
                 optional: bool = False) -> int | str | None:
    """Pick a token among ``options`` (``(text, id, prob)``) or type one; returns an id, a string or ``None``."""
    import streamlit as st

    labels = (["none"] if optional else []) + [f"{show_token(t)}  (p={p:.3f})" for t, _, p in options] + ["other…"]
    start = 0 if default is None else default + optional
    choice = st.selectbox(label, range(len(labels)), index=start, format_func=lambda i: labels[i], key=key)
    if labels[choice] == "other…":
        return st.text_input(f"{label}: a single token (text, or #id)", value="", key=f"{key}_text") or None
    if optional and choice == 0:
        return None
    return options[choice - optional][1]


# -- Streamlit glue -----------------------------------------------------------------------------
@dataclass
class Context:
    """What every page gets: the model, a key identifying it in caches, and the shared selections."""

    model: Any
    key: str
    prompt: str
    layer: int
    head: int
    lens_path: str | None = None

    def run(self, fn: Callable, *args, **kwargs):
        """``fn(model, *args, **kwargs)`` through ``st.cache_data`` keyed by model, function and arguments
        (plain values). ``fn`` must not draw anything: Streamlit replays a cached function's elements."""
        return _cached()(f"{fn.__module__}.{fn.__qualname__}", self.key, args, tuple(sorted(kwargs.items())),
                         _fn=fn, _model=self.model)


def _call(name: str, key: str, args: tuple, kwargs: tuple, _fn: Callable, _model):
    return _fn(_model, *args, **dict(kwargs))


@functools.cache
def _cached() -> Callable:
    import streamlit as st

    return st.cache_data(show_spinner=False, max_entries=256)(_call)


def show_error(err: BaseException, what: str = "") -> None:
    """Show ``err`` in the app: its type and message in ``st.error``, the traceback in an expander."""
    import streamlit as st

    st.error(f"{what + ': ' if what else ''}{type(err).__name__}: {err}")
    with st.expander("traceback"):
        st.code("".join(traceback.format_exception(type(err), err, err.__traceback__)), language="text")


def progress_bar(label: str) -> tuple[Progress, Callable[[], None]]:
    """An ``st.progress`` bar as a ``progress(fraction, text)`` callback, and a function removing it."""
    import streamlit as st

    bar = st.progress(0.0, text=label)
    return (lambda f, text="": bar.progress(min(max(f, 0.0), 1.0), text=f"{label} {text}".strip())), bar.empty


def env_default(name: str, default: str = "") -> str:
    return os.environ.get(name, default)
