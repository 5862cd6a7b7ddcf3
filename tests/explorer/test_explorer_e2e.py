"""End to end: ``fxlens explore`` serves a saved tiny model on loopback; headless Chromium renders every page.

Slow (a server start and a browser). Needs Debian's chromium + chromium-driver and selenium; ``.ci/run``
installs them and sets ``FXLENS_REQUIRE_BROWSER=1``, which turns a missing browser into a failure.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("streamlit")

from fxlens.explorer.app import PAGES  # noqa: E402
from tests.explorer.browser import browser_available, explorer_server, screenshot_pages  # noqa: E402
from tests.explorer.tiny import tiny_model  # noqa: E402

pytestmark = pytest.mark.slow

TITLES = {"attention": "Attention patterns", "dla": "Direct logit attribution", "circuits": "OV and QK circuits",
          "ablation": "Head ablation browser", "lens": "Lens view"}


def test_every_page_renders_a_plot_in_chromium(tmp_path):
    missing = browser_available()
    if missing:
        if os.environ.get("FXLENS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required but missing: {missing}")
        pytest.skip(f"needs {missing}")
    import matplotlib.image

    m = tiny_model()
    folder = tmp_path / "tiny-llama"
    m.hf_model.save_pretrained(folder)
    m.tokenizer.save_pretrained(folder)
    assert set(TITLES) == set(PAGES)

    with explorer_server(str(folder), log=tmp_path / "server.log") as url:
        shots = screenshot_pages(url, list(PAGES), tmp_path / "shots")

    assert [s.page for s in shots] == list(PAGES)
    for s in shots:
        assert s.plots >= 1, s.page
        assert s.header.startswith(TITLES[s.page]), (s.page, s.header)
        img = matplotlib.image.imread(s.png)
        assert img.shape[0] >= 500 and img.shape[1] >= 800, img.shape
        # A rendered page has content: many distinct colours, not a blank or single-colour frame.
        colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
        assert len(colours) > 50, (s.page, len(colours))
