"""Explorer: a local Streamlit app for attention patterns, direct logit attribution, OV/QK circuits,
head ablations and lenses, on any model fxlens can trace (``fxlens explore --model MODEL``).

One module per page (:mod:`.attention`, :mod:`.dla`, :mod:`.circuits`, :mod:`.ablation`,
:mod:`.lens_view`), each with plain computation functions and a ``render(ctx)`` that draws the page;
:mod:`.common` holds what they share; :mod:`.app` is the Streamlit script; :mod:`.launch` the CLI.
Importing this package does not import Streamlit.
"""

from .common import EXAMPLES, Context, load_model, register_model

__all__ = ["EXAMPLES", "Context", "load_model", "register_model"]
