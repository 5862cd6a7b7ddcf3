"""Explorer computations on tiny random models, checked against first principles (no Streamlit)."""

from __future__ import annotations

import math

import pytest
import torch

from fxlens.explorer import ablation, attention, circuits, common, dla, lens_view
from fxlens.interventions.factored_matrix import FactoredMatrix
from fxlens.interventions.patches import ReplacePatch
from fxlens.lenses import LogitLens
from tests.explorer.tiny import tiny_model

PROMPT = "When Mary and John went"
TEXTS = ["The cat sat on the mat.", "One, two, three.", "abcabcabc", "Hi"]


def close(a, b, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dla_components_sum_to_the_logit_difference(family):
    m = tiny_model(family)
    ids = common.prompt_tokens(m, PROMPT)
    logits = m(ids)[0]
    for pos in (-1, 5):
        res = dla.direct_logit_attribution(m, PROMPT, "a", "#20", position=pos)
        p = pos % ids.shape[1]
        close(res.logit_diff, logits[p, m.to_single_token("a")] - logits[p, 20])
        close(res.total() + res.bias_terms, res.logit_diff)
        close(res.per_layer[:, 0], res.per_head.sum(1))
        assert res.per_head.shape == (m.cfg.n_layers, m.cfg.n_heads) and res.position == p
        assert len(res.components()) == m.cfg.n_layers * (m.cfg.n_heads + 1) + len(res.other)
    single = dla.direct_logit_attribution(m, PROMPT, 7)  # no counterfactual: the logit itself
    close(single.total() + single.bias_terms, logits[-1, 7])
    assert ("pos_embed" in single.other) == (family == "gpt2")


def test_dla_rejects_multi_token_answers_and_bad_positions():
    m = tiny_model()
    with pytest.raises(ValueError, match="not one"):
        dla.direct_logit_attribution(m, PROMPT, "ab")
    with pytest.raises(ValueError, match="outside"):
        dla.direct_logit_attribution(m, PROMPT, "a", position=99)


def test_attention_patterns_and_summaries():
    m = tiny_model()
    att = attention.attention_patterns(m, PROMPT)
    n = len(common.prompt_tokens(m, PROMPT)[0])
    assert att.patterns.shape == (m.cfg.n_layers, m.cfg.n_heads, n, n) and len(att.str_tokens) == n
    close(att.patterns.sum(-1), torch.ones(m.cfg.n_layers, m.cfg.n_heads, n))
    assert torch.triu(att.patterns, diagonal=1).abs().max() == 0  # causal
    s = attention.head_summary(att.patterns)
    for k in ("previous token", "first token", "self"):
        assert s[k].shape == (m.cfg.n_layers, m.cfg.n_heads) and 0 <= s[k].min() and s[k].max() <= 1
    close(s["previous token"][1, 2], torch.stack([att.patterns[1, 2, i, i - 1] for i in range(1, n)]).mean())
    assert 0 <= s["entropy (bits)"].min() and s["entropy (bits)"].max() <= math.log2(n) + 1e-4
    eye = torch.eye(4).expand(1, 1, 4, 4)
    assert attention.head_summary(eye)["self"].item() == 1 and attention.head_summary(eye)["entropy (bits)"] == 0


def test_ablating_a_head_with_its_own_value_changes_nothing():
    m = tiny_model()
    text = TEXTS[0]
    ids = m.to_tokens(text)
    _, cache = m.run_with_cache(ids, names_filter="blocks.1.attn.hook_z")
    own = ReplacePatch(value=cache["blocks.1.attn.hook_z"], head=2)
    res = ablation.ablate_head(m, [text], 1, 2, own)
    (ex,) = res.examples
    assert ex.delta.shape == (ids.shape[1] - 1,) and ex.delta.abs().max() == 0
    close(ex.clean.mean(), m(ids, return_type="loss"))


def test_zero_and_mean_ablation_per_token_losses():
    m = tiny_model()
    reports = []
    zero = ablation.ablate_head(m, TEXTS, 0, 1, "zero", batch_size=3, progress=lambda f, t: reports.append(f))
    assert reports[-1] == 1.0 and len(reports) == 4  # 2 batches x (clean, ablated)
    assert [e.mean_delta for e in zero.examples] == sorted((e.mean_delta for e in zero.examples), reverse=True)
    assert all(e.delta.abs().max() > 0 for e in zero.examples)
    for e in zero.examples:  # unpadded, one text at a time: the same numbers as a plain hooked run
        ids = m.to_tokens(e.text)
        with m.patch({"blocks.0.attn.hook_z": ablation.ZeroPatch(head=1)}):
            ref = ablation.per_token_loss(m(ids), ids)[0]
        close(e.ablated, ref)
        assert len(e.clean_top) == len(e.ablated_top) == len(e.str_tokens) - 1
    # mean ablation writes the head's mean hook_z over every (non-padding) token of all texts
    mean = ablation.ablate_head(m, TEXTS, 0, 1, "mean", batch_size=3)
    zs = [m.run_with_cache(m.to_tokens(t), names_filter="blocks.0.attn.hook_z")[1]["blocks.0.attn.hook_z"][0, :, 1]
          for t in TEXTS]
    mu = torch.cat(zs).mean(0)
    ids = m.to_tokens(TEXTS[1])

    def put_mean(z, hook):
        z[:, :, 1] = mu
        return z

    ref = ablation.per_token_loss(m.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", put_mean)]), ids)[0]
    close(next(e for e in mean.examples if e.text == TEXTS[1]).ablated, ref)
    with pytest.raises(ValueError, match="kind"):
        ablation.ablate_head(m, TEXTS, 0, 1, "resample")
    with pytest.raises(ValueError, match="does not exist"):
        ablation.ablate_head(m, TEXTS, 5, 0)


def test_copying_score_bounds_and_extremes():
    eye = torch.eye(6)
    assert circuits.copying_score(FactoredMatrix(eye[:, :3], eye[:3])) == pytest.approx(1.0)
    assert circuits.copying_score(FactoredMatrix(-eye[:, :3], eye[:3])) == pytest.approx(-1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        s = circuits.copying_score(FactoredMatrix(torch.randn(8, 3, generator=g), torch.randn(3, 8, generator=g)))
        assert -1 <= s <= 1


def test_head_circuits_match_the_explicit_products():
    m = tiny_model()
    L, h = 1, 3
    ids = circuits.token_subset(m, "a, b, #50", n_frequent=10)
    assert ids[:3] == [m.to_single_token("a"), m.to_single_token("b"), 50] and len(ids) == len(set(ids))
    res = circuits.head_circuits(m, L, h, ids, k=4)
    ln1 = m.hf_model.model.layers[L].input_layernorm
    w_final = m.hf_model.model.norm.weight
    with torch.no_grad():
        x = ln1(m.W_E[ids])
        u = (m.W_U[:, ids] * w_final[:, None]).T
        ov = x @ m.W_V[L, h] @ m.W_O[L, h] @ u.T
        qk = (x @ m.W_Q[L, h]) @ (x @ m.W_K[L, h]).T / math.sqrt(m.cfg.d_head)
        full_ov = ln1(m.W_E) @ m.W_V[L, h] @ m.W_O[L, h] @ (m.W_U * w_final[:, None])
    close(res.ov, ov)
    close(res.qk, qk)
    assert -1 <= res.copying_score <= 1 and -1 <= res.copying_score_subset <= 1
    lam = torch.linalg.eigvals(full_ov.double())
    assert res.copying_score == pytest.approx(float(lam.real.sum() / lam.abs().sum()), abs=1e-4)
    vocab = common.vocab_strings(m)
    best = full_ov[ids[0]].topk(4).indices.tolist()
    assert [t for t, _ in res.ov_top[0]] == [vocab[i] for i in best]
    assert res.ov_diag_top1 == float((ov.argmax(-1) == torch.arange(len(ids))).float().mean())
    pairs = circuits.top_pairs(res.ov, res.tokens, res.tokens, k=3)
    assert pairs[0][2] == pytest.approx(float(res.ov.max())) and len(pairs) == 3
    assert circuits.token_subset(m, "", id_range=(10, 15)) == list(range(10, 15))
    assert circuits.default_words(m, ("a", "Mary")) == "a"


def test_head_streams_before_and_after_the_head():
    m = tiny_model()
    ids = common.prompt_tokens(m, PROMPT)
    streams, logits = lens_view.head_streams(m, ids, 1, 2)
    _, cache = m.run_with_cache(ids)
    result = cache["blocks.1.attn.hook_z"][:, :, 2] @ m.W_O[1, 2]
    close(streams["head input"], cache["blocks.1.hook_resid_pre"])
    close(streams["after head"], cache["blocks.1.hook_resid_mid"])
    close(streams["after head"] - streams["before head"], result)
    close(logits, m(ids))


def test_head_lens_and_trajectory_use_the_logit_lens():
    m = tiny_model()
    hl = lens_view.head_lens(m, PROMPT, 1, 0, k=3)
    ids = common.prompt_tokens(m, PROMPT)
    _, cache = m.run_with_cache(ids)
    probs = torch.softmax(LogitLens(m)(cache["blocks.1.hook_resid_mid"], 1)[0, -1], -1)
    p, i = probs.topk(3)
    assert [t for t, _ in hl.top["after head"][-1]] == [m.tokenizer.decode([t]) for t in i.tolist()]
    close([v for _, v in hl.top["after head"][-1]], p)
    out = torch.softmax(m(ids)[0, -1], -1)
    assert hl.top["output"][-1][0][0] == m.tokenizer.decode([int(out.argmax())])
    for s in lens_view.STREAMS:
        t = hl.target_prob[s]
        assert torch.isnan(t[-1]) and 0 <= t[:-1].min() and t[:-1].max() <= 1
    assert hl.pushed_up[-1][0][1] >= hl.pushed_down[-1][0][1]
    traj = lens_view.lens_trajectory(m, PROMPT)
    assert traj.top_ids.shape == (m.cfg.n_layers + 1, ids.shape[1])
    assert traj.top_ids[-1].tolist() == m(ids)[0].argmax(-1).tolist()
    assert lens_view.get_lens(m) is lens_view.get_lens(m)


def test_token_helpers_and_html():
    m = tiny_model()
    assert common.single_token(m, "#12") == 12 and common.single_token(m, "x") == m.to_single_token("x")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        common.single_token(m, "#100000")
    assert common.parse_token_list(m, "a, b, a,, #9") == [m.to_single_token("a"), m.to_single_token("b"), 9]
    with pytest.raises(ValueError, match="not one"):
        common.parse_token_list(m, "a, bc")
    assert common.show_token(" a\n") == "·a\\n"
    html = common.colored_tokens_html(["<a>", "b"], [float("nan"), -0.5])
    assert html.count("<span") == 2 and "&lt;a&gt;" in html and "rgba(37,99,235,1.00)" in html
    fig = common.heatmap(torch.ones(2, 3), ["x", "x", "y"], ["r", "r"])  # duplicate labels stay apart
    assert list(fig.data[0].x) == [0, 1, 2] and list(fig.layout.xaxis.ticktext) == ["x", "x", "y"]
    with pytest.raises(KeyError, match="register_model"):
        common.load_model("registered:nothing-here")
    with pytest.raises(ValueError, match="no model"):
        common.load_model(" ")


def test_cli_builds_a_loopback_streamlit_command():
    from fxlens.cli import build_parser
    from fxlens.explorer.launch import APP, streamlit_command

    args = build_parser().parse_args(["explore", "--model", "offline:smollm2", "--port", "8765", "--lens", "L"])
    cmd = streamlit_command(args)
    assert cmd[1:5] == ["-m", "streamlit", "run", str(APP)] and APP.is_file()
    flags = dict(zip(cmd[5:cmd.index("--")][::2], cmd[5:cmd.index("--")][1::2]))
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "8765"
    assert flags["--server.headless"] == "true"
    assert cmd[cmd.index("--") + 1:] == ["--model", "offline:smollm2", "--dtype", "float32", "--device", "cpu",
                                         "--lens", "L"]
