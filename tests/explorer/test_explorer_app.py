"""Every explorer page through Streamlit's headless AppTest on a tiny random Llama (same process)."""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("plotly")

from streamlit.testing.v1 import AppTest  # noqa: E402

from fxlens.explorer import register_model  # noqa: E402
from fxlens.explorer.app import APP_PATH, PAGES  # noqa: E402
from fxlens.explorer.common import MODEL_ENV  # noqa: E402
from fxlens.lenses import TunedLens  # noqa: E402
from tests.explorer.tiny import tiny_model  # noqa: E402


@pytest.fixture
def app(monkeypatch):
    """A fresh AppTest of the explorer on the tiny model; ``app(page)`` runs it on that page."""
    monkeypatch.setenv(MODEL_ENV, register_model(tiny_model(), "tiny-llama"))

    def run(page: str) -> AppTest:
        at = AppTest.from_file(str(APP_PATH), default_timeout=120)
        at.query_params["page"] = page
        return at.run()

    return run


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def test_every_page_renders_and_the_url_names_the_page(app):
    for page in PAGES:
        at = ok(app(page))
        assert at.sidebar.radio(key="page").value == page and at.query_params["page"] == page
        assert charts(at) >= 1, page
    at.sidebar.radio(key="page").set_value("lens").run()
    assert at.query_params["page"] == "lens" and ok(at).header[0].value == "Lens view"


def test_attention_page_follows_the_sidebar_head(app):
    at = app("attention")
    at.sidebar.number_input(key="layer").set_value(0)
    at.sidebar.number_input(key="head").set_value(3)
    at.sidebar.text_area(key="prompt").set_value("abc abc abc").run()
    ok(at)
    assert [s.value for s in at.subheader][:2] == ["Head L0H3", "All heads of layer 0"]
    at.selectbox(key="att_stat").set_value("entropy (bits)").run()
    assert charts(ok(at)) == 3


def test_dla_page_answer_counterfactual_and_errors(app):
    at = ok(app("dla"))
    assert [m.label.startswith("model's logit(") for m in at.metric][0] and len(at.dataframe) == 1
    model_value, total = (float(m.value) for m in at.metric[:2])
    assert model_value == pytest.approx(total + float(at.metric[2].value), abs=2e-4)
    at.selectbox(key="dla_counter").set_value(0).run()  # "none": the answer's own logit
    assert "−" not in ok(at).metric[0].label and charts(at) == 2
    other = len(at.selectbox(key="dla_answer").options) - 1
    at.selectbox(key="dla_answer").set_value(other).run()
    at.text_input(key="dla_answer_text").set_value("xy").run()  # two tokens: shown, not swallowed
    assert at.error and "not one" in at.error[0].value and not at.exception


def test_circuits_page_token_subsets(app):
    at = ok(app("circuits"))
    assert len(at.metric) == 4 and charts(at) == 2 and len(at.dataframe) == 4
    score = float(at.metric[0].value)
    assert -1 <= score <= 1
    at.text_input(key="circ_tokens").set_value("a, b, c, #40")
    at.radio(key="circ_source").set_value("a range of ids").run()
    at.number_input(key="circ_start").set_value(60).run()
    ok(at)
    assert at.slider(key="circ_show").max == 4 + 40  # 4 user tokens + 40 ids


def test_ablation_page_ranks_examples(app):
    at = app("ablation")
    at.text_area(key="abl_texts").set_value("The cat sat.\nabcabc\\nabc\nHello there")
    at.radio(key="abl_kind").set_value("mean").run()
    ok(at)
    assert charts(at) == 1 and len(at.get("html")) == 3
    table = at.dataframe[0].value
    assert list(table["mean Δ loss"]) == sorted(table["mean Δ loss"], reverse=True) and len(table) == 3
    bodies = [h.proto.body for h in at.get("html")]
    assert sum("↵<br>" in b for b in bodies) == 1  # "\\n" in a line is a newline inside the example
    at.selectbox(key="abl_pick").set_value(2).run()
    assert len(ok(at).dataframe[1].value) >= 1


def test_lens_page_logit_and_tuned_lens(app, tmp_path):
    at = ok(app("lens"))
    assert charts(at) == 2 and len(at.dataframe) == 3
    assert list(at.dataframe[0].value.columns) == ["head input", "before head", "after head", "output"]
    lens = TunedLens.from_model(tiny_model())
    lens.save(tmp_path / "lens")
    at.text_input(key="lens_path").set_value(str(tmp_path / "lens")).run()
    at.radio(key="lens_value").set_value("entropy").run()
    assert charts(ok(at)) == 2
    at.text_input(key="lens_path").set_value(str(tmp_path / "missing")).run()
    assert at.error and not at.exception


def test_a_model_that_cannot_load_is_reported(monkeypatch):
    monkeypatch.setenv(MODEL_ENV, "registered:not-registered")
    at = AppTest.from_file(str(APP_PATH), default_timeout=60).run()
    assert at.error and "could not load" in at.error[0].value and "not-registered" in at.error[0].value
    assert not at.exception and charts(at) == 0
