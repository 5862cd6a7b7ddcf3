"""The explorer's Streamlit script: ``streamlit run fxlens/explorer/app.py -- --model MODEL [--lens DIR]``.

``fxlens explore --model MODEL`` starts it bound to 127.0.0.1. The model spec can also come from
``$FXLENS_EXPLORE_MODEL`` (and a tuned lens folder from ``$FXLENS_EXPLORE_LENS``); ``registered:NAME``
takes a model traced in this process (:func:`fxlens.explorer.register_model`). The page is chosen in
the sidebar and kept in the URL (``?page=dla``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fxlens.explorer import ablation, attention, circuits, dla, lens_view
from fxlens.explorer.common import DEFAULT_PROMPT, LENS_ENV, MODEL_ENV, Context, env_default, load_model, show_error

APP_PATH = Path(__file__)

#: URL name -> (title, render function)
PAGES = {
    "attention": ("Attention patterns", attention.render),
    "dla": ("Direct logit attribution", dla.render),
    "circuits": ("OV / QK circuits", circuits.render),
    "ablation": ("Head ablation browser", ablation.render),
    "lens": ("Lens view", lens_view.render),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The script's own arguments (after ``--`` on the ``streamlit run`` line)."""
    p = argparse.ArgumentParser(prog="fxlens-explorer")
    p.add_argument("--model", default=env_default(MODEL_ENV))
    p.add_argument("--lens", default=env_default(LENS_ENV))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def _model(spec: str, dtype: str, device: str):
    import streamlit as st

    @st.cache_resource(show_spinner=False, max_entries=2)
    def load(spec: str, dtype: str, device: str):
        return load_model(spec, dtype, device)

    with st.spinner(f"loading and tracing {spec} (once per model)"):
        return load(spec, dtype, device)


def main(argv: list[str] | None = None) -> None:
    """Build the app: sidebar (model, page, prompt, head), then the chosen page."""
    import streamlit as st

    if argv is None:  # `streamlit run app.py -- ARGS` sets sys.argv to [app.py, ARGS]; others (AppTest) do not
        argv = sys.argv[1:] if Path(sys.argv[0]).resolve() == APP_PATH.resolve() else []
    args = parse_args(argv)
    st.set_page_config(page_title="fxlens explorer", layout="wide")
    side = st.sidebar
    side.title("fxlens explorer")
    spec = side.text_input("model", value=args.model, key="model_spec",
                           help="hub name, local folder, .gguf file, offline:smollm2")
    try:
        model = _model(spec, args.dtype, args.device)
    except Exception as e:  # shown, then the run stops: nothing below can work without a model
        show_error(e, f"could not load {spec!r}")
        st.stop()
    side.caption(repr(model))

    names = list(PAGES)
    current = st.query_params.get("page", names[0])
    page = side.radio("page", names, index=names.index(current) if current in names else 0,
                      format_func=lambda k: PAGES[k][0], key="page")
    if st.query_params.get("page") != page:
        st.query_params["page"] = page
    prompt = side.text_area("prompt", value=DEFAULT_PROMPT, key="prompt", height=110)
    cfg = model.cfg
    c1, c2 = side.columns(2)
    layer = int(c1.number_input("layer", 0, cfg.n_layers - 1, min(cfg.n_layers - 1, cfg.n_layers // 2),
                                key="layer"))
    head = int(c2.number_input("head", 0, cfg.n_heads - 1, 0, key="head"))

    ctx = Context(model, f"{spec}|{args.dtype}|{args.device}|{id(model)}", prompt, layer, head, args.lens or None)
    try:
        PAGES[page][1](ctx)
    except Exception as e:  # every error reaches the user with its message
        show_error(e, PAGES[page][0])


if __name__ == "__main__":
    main()
