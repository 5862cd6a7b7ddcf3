"""The seed Main Demo port (``main_demo_port.py``) run cell by cell on SmolLM2, every printed value checked.

References never come from fxlens' graph: an independently loaded HF model (eager attention) with
PyTorch forward (pre-)hooks, the HF tokenizer, dense ``torch.linalg`` and the HF weights. The port
loads the model the TransformerLens way (LN folded into the weights, unembedding centred), which
leaves log-probs, logit differences, patterns and losses unchanged, so those are compared directly.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch
import transformers

import fxlens
from tests.compat.notebook import Notebook

pytestmark = pytest.mark.slow
PORT = Path(__file__).with_name("main_demo_port.py")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """Restores threads and grad mode; one thread unless told (``FXLENS_THREADS``): two threads thrash here."""
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(int(os.environ.get("FXLENS_THREADS", "1")))
    yield
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)  # the notebook switches gradients off globally, as TL's demo does


@pytest.fixture(scope="module")
def nb():
    shown = go.Figure.show
    torch.manual_seed(0)
    try:
        book = Notebook(PORT).run(keep={9: ("model",)}, log=lambda line: print(line, file=sys.stderr))
    finally:
        go.Figure.show = shown
    book.lm = book.after[9].get("model")
    print("\ncell seconds:", {n: round(s, 1) for n, s in book.seconds.items() if s > 0.5})
    return book


@pytest.fixture(scope="module")
def hf(nb):
    """The HF model on its own: a second copy of the checkpoint the port loaded (fxlens' dequantised fp32
    folder, a plain ``save_pretrained`` one), loaded by transformers with eager attention, and its tokenizer."""
    folder = nb.lm.hf_model.name_or_path
    assert (Path(folder) / "config.json").exists(), folder
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    assert model is not nb.lm.hf_model
    return model, tok


def _ids(tok, text: str, bos: bool = True) -> torch.Tensor:
    ids = tok.encode(text, add_special_tokens=False)
    return torch.tensor([[tok.bos_token_id] * bos + ids])


def _logits(hf_model, ids: torch.Tensor, **kw):
    with torch.no_grad():
        return hf_model(input_ids=ids, **kw)


def _loss(logits: torch.Tensor, ids: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return -lp if per_token else -lp.mean()


def _number(line: str) -> float:
    return float(re.findall(r"-?\d+\.\d+", line)[-1])


# -- cells 1-14: setup, loss, caching ---------------------------------------------------------------------


def test_setup_cells_run(nb):
    nb.ok(1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert nb.printed(2) == ["Using renderer: json"]
    assert type(nb.out[3]).__name__ == "RenderedHTML"
    assert nb.ns["device"] in ("cpu", "cuda", "mps") or str(nb.ns["device"]).startswith(("cpu", "cuda"))
    assert not set(nb.errors) - {55, 56, 57}, {n: e[-300:] for n, e in nb.errors.items()}


def test_loss_cell_10_equals_hf(nb, hf):
    nb.ok(10)
    model, tok = hf
    ids = _ids(tok, nb.ns["model_description_text"])
    assert torch.equal(nb.lm.to_tokens(nb.ns["model_description_text"]), ids)
    ref = _logits(model, ids, labels=ids).loss.item()
    got = nb.ns["loss"].item()
    assert abs(got - ref) < 1e-5, (got, ref)
    assert abs(_number(nb.printed(10)[0]) - ref) < 1e-4
    print(f"cell 10 loss: fxlens {got:.6f}, HF {ref:.6f}")


def test_cache_cells_11_to_14_patterns_equal_hf_eager(nb, hf):
    nb.ok(11, 12, 13, 14)
    model, tok = hf
    ids = _ids(tok, nb.ns["gpt2_text"])
    assert torch.equal(nb.ns["gpt2_tokens"], ids) and nb.printed(11) == ["cpu"]
    n = ids.shape[1]
    assert nb.printed(12)[1] == f"torch.Size([{model.config.num_attention_heads}, {n}, {n}])"
    ref = _logits(model, ids, output_attentions=True)
    torch.testing.assert_close(nb.ns["attention_pattern"], ref.attentions[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(nb.ns["gpt2_logits"].log_softmax(-1), ref.logits.log_softmax(-1), atol=1e-4, rtol=1e-4)
    assert nb.ns["gpt2_str_tokens"] == [tok.decode([i]) for i in ids[0]]
    assert type(nb.out[13]).__name__ == "RenderedHTML"
    assert torch.equal(nb.ns["gpt2_attn"], nb.ns["attention_pattern"])  # cell 14's own assert, stop_at_layer=1


def test_head_ablation_cell_15_equals_hf_hooks(nb, hf):
    nb.ok(15)
    model, _ = hf
    ids, cfg = nb.ns["gpt2_tokens"], model.config
    d_head, h = cfg.hidden_size // cfg.num_attention_heads, nb.ns["head_index_to_ablate"]
    shape = f"torch.Size([1, {ids.shape[1]}, {cfg.num_key_value_heads}, {d_head}])"  # TL's GQA hook_v: kv heads
    assert nb.printed(15)[0] == f"Shape of the value tensor: {shape}"
    ref = _logits(model, ids, labels=ids).loss.item()

    def zero_v(mod, args, out):
        out[..., h * d_head:(h + 1) * d_head] = 0.0
        return out

    handle = model.model.layers[0].self_attn.v_proj.register_forward_hook(zero_v)
    try:
        ref_ablated = _logits(model, ids, labels=ids).loss.item()
    finally:
        handle.remove()
    got, got_ablated = nb.ns["original_loss"].item(), nb.ns["ablated_loss"].item()
    assert abs(got - ref) < 1e-5 and abs(got_ablated - ref_ablated) < 1e-5, (got, ref, got_ablated, ref_ablated)
    assert nb.printed(15)[1:] == [f"Original Loss: {ref:.3f}", f"Ablated Loss: {ref_ablated:.3f}"]
    print(f"cell 15 loss {got:.4f} (HF {ref:.4f}), v-head {h} ablated {got_ablated:.4f} (HF {ref_ablated:.4f})")


def test_z_head_ablation_equals_hf_o_proj_input_hook(nb, hf):
    """The seed's head 8, ablated at ``hook_z`` (one query head; ``hook_v`` has only 3)."""
    model, _ = hf
    ids, lm, d_head = nb.ns["gpt2_tokens"], nb.lm, nb.lm.cfg.d_head

    def zero_z(z, hook):
        z[:, :, 8] = 0.0
        return z

    got = lm.run_with_hooks(ids, return_type="loss", fwd_hooks=[("blocks.0.attn.hook_z", zero_z)]).item()

    def zero_in(mod, args):
        x = args[0].clone()
        x[..., 8 * d_head:9 * d_head] = 0.0
        return (x,)

    handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(zero_in)
    try:
        ref = _logits(model, ids, labels=ids).loss.item()
    finally:
        handle.remove()
    assert abs(got - ref) < 1e-5, (got, ref)
    print(f"z-head 8 ablated loss: fxlens {got:.5f}, HF {ref:.5f}")


# -- cells 16-18: IOI logit difference, DLA, patching -----------------------------------------------------


def _ioi_ref(nb, hf):
    model, tok = hf
    john, mary = tok.encode(" John", add_special_tokens=False)[0], tok.encode(" Mary", add_special_tokens=False)[0]
    clean, corrupt = _ids(tok, nb.ns["clean_prompt"]), _ids(tok, nb.ns["corrupted_prompt"])
    out = _logits(model, clean, output_hidden_states=True)
    def diff(logits):
        return logits[:, -1, john] - logits[:, -1, mary]

    ref_clean, ref_corrupt = diff(out.logits)[0].item(), diff(_logits(model, corrupt).logits)[0].item()
    return model, clean, corrupt, out.hidden_states, ref_clean, ref_corrupt, diff


def test_ioi_logit_diffs_cell_16_equal_hf(nb, hf):
    nb.ok(16)
    _, clean, corrupt, _, ref_clean, ref_corrupt, _ = _ioi_ref(nb, hf)
    assert torch.equal(nb.ns["clean_tokens"], clean) and torch.equal(nb.ns["corrupted_tokens"], corrupt)
    got_clean, got_corrupt = nb.ns["clean_logit_diff"].item(), nb.ns["corrupted_logit_diff"].item()
    assert abs(got_clean - ref_clean) < 2e-4 and abs(got_corrupt - ref_corrupt) < 2e-4
    assert nb.printed(16) == [f"Clean logit difference: {ref_clean:.3f}",
                              f"Corrupted logit difference: {ref_corrupt:.3f}"]
    print(f"cell 16 IOI logit diff: clean {got_clean:.4f} (HF {ref_clean:.4f}), corrupted {got_corrupt:.4f} "
          f"(HF {ref_corrupt:.4f})")


def test_dla_on_cell_16_cache_sums_to_hf_logit_diff(nb, hf):
    """Not printed by the seed (the issue's DLA check): attributions of the port's clean cache sum to the diff."""
    ref = _ioi_ref(nb, hf)[4]
    cache = nb.ns["clean_cache"]
    for stack in (cache.decompose_resid(layer=-1, pos_slice=-1), cache.accumulated_resid(layer=-1, pos_slice=-1)[-1:],
                  cache.get_full_resid_decomposition(layer=-1, pos_slice=-1, expand_neurons=False)):
        total = cache.logit_attrs(stack, " John", " Mary", pos_slice=-1).sum().item()
        assert abs(total - ref) < 1e-3, (total, ref)
    heads = cache.logit_attrs(cache.stack_head_results(layer=-1, pos_slice=-1), " John", " Mary", pos_slice=-1)
    assert heads.shape[0] == nb.lm.cfg.n_layers * nb.lm.cfg.n_heads
    print(f"DLA sum {total:.4f} vs HF logit diff {ref:.4f}")


def test_patching_grid_cell_17_equals_hf_hook_loop(nb, hf):
    nb.ok(17, 18)
    model, clean, corrupt, hidden, ref_clean, ref_corrupt, diff = _ioi_ref(nb, hf)
    n_pos, layers = clean.shape[1], nb.ns["patched_layers"]
    assert layers == list(range(0, model.config.num_hidden_layers, 5))
    ref = torch.zeros(len(layers), n_pos)
    for i, L in enumerate(layers):  # one HF forward per layer, row p patched at position p
        layer = model.model.layers[L]

        def patch(mod, args, kwargs, L=L):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[torch.arange(n_pos), torch.arange(n_pos)] = hidden[L][0]
            return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        handle = layer.register_forward_pre_hook(patch, with_kwargs=True)
        try:
            ref[i] = (diff(_logits(model, corrupt.repeat(n_pos, 1)).logits) - ref_corrupt) / (ref_clean - ref_corrupt)
        finally:
            handle.remove()
    got = nb.ns["ioi_patching_result"]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    fig = nb.ns["FIGURES"][0]
    assert list(fig.data[0].x) == nb.ns["token_labels"] and len(nb.ns["token_labels"]) == n_pos
    assert list(fig.data[0].y) == layers
    print(f"cell 17 grid {tuple(got.shape)}: max |fxlens - HF| {(got - ref).abs().max().item():.2e}; "
          f"last row at the final position {got[-1, -1].item():.4f}")


# -- cells 19-21: induction ------------------------------------------------------------------------------


def test_induction_cells_19_20_equal_hf_eager(nb, hf):
    nb.ok(19, 20, 21)
    model, _ = hf
    tokens, seq_len = nb.ns["repeated_tokens"], nb.ns["seq_len"]
    assert tokens.shape == (10, 100) and torch.equal(tokens[:, :50], tokens[:, 50:])
    out = _logits(model, tokens, output_attentions=True)
    torch.testing.assert_close(nb.ns["loss_by_position"], _loss(out.logits, tokens, per_token=True).mean(0),
                               atol=1e-4, rtol=1e-5)
    ref = torch.stack([a.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len).mean((0, 2)) for a in out.attentions])
    got = nb.ns["induction_score_store"]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    best = divmod(got.argmax().item(), got.shape[1])
    print(f"cell 20 induction scores: max |fxlens - HF| {(got - ref).abs().max().item():.2e}; "
          f"top head L{best[0]}H{best[1]} "
          f"{got.max().item():.3f}; loss 2nd half {nb.ns['loss_by_position'][50:].mean().item():.3f} vs 1st "
          f"{nb.ns['loss_by_position'][:49].mean().item():.3f}")
    shown = [f for f in nb.ns["FIGURES"] if type(f).__name__ == "RenderedHTML"]
    assert len(shown) == 1  # cell 21's display() of L5H5's pattern


# -- cells 24-29: parameters, hook names, unembedding bias --------------------------------------------------


def _param_shapes(nb, cell: int) -> dict[str, tuple[int, ...]]:
    rows = [re.match(r"(\S+) torch\.Size\(\[(.*)\]\)$", line) for line in nb.printed(cell)]
    return {m.group(1): tuple(int(d) for d in m.group(2).split(", ") if d) for m in rows if m}


def test_named_parameters_cells_24_25(nb, hf):
    nb.ok(24, 25)
    c = hf[0].config
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    block, top = _param_shapes(nb, 24), _param_shapes(nb, 25)
    assert block["blocks.0.attn.W_Q"] == (c.num_attention_heads, d, hd)
    assert block["blocks.0.attn.W_O"] == (c.num_attention_heads, hd, d)
    assert block["blocks.0.mlp.W_in"] == (d, c.intermediate_size)
    assert block["blocks.0.mlp.W_out"] == (c.intermediate_size, d)
    assert top["embed.W_E"] == (c.vocab_size, d) and top["unembed.W_U"] == (d, c.vocab_size)
    assert all(k.startswith("blocks.0.") for k in block) and not any(k.startswith("blocks") for k in top)


def test_hook_names_cell_26(nb, hf):
    nb.ok(26)
    model, tok = hf
    c = model.config
    n = len(tok.encode(nb.ns["test_prompt"], add_special_tokens=False)) + 1
    assert nb.printed(26)[0] == f"Num tokens: {n}"
    d, H, K, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    want = {"hook_embed": (1, n, d), "blocks.0.hook_resid_pre": (1, n, d), "blocks.0.ln1.hook_scale": (1, n, 1),
            "blocks.0.ln1.hook_normalized": (1, n, d), "blocks.0.attn.hook_q": (1, n, H, hd),
            "blocks.0.attn.hook_k": (1, n, K, hd), "blocks.0.attn.hook_v": (1, n, K, hd),
            "blocks.0.attn.hook_attn_scores": (1, H, n, n), "blocks.0.attn.hook_pattern": (1, H, n, n),
            "blocks.0.attn.hook_z": (1, n, H, hd), "blocks.0.hook_attn_out": (1, n, d),
            "blocks.0.hook_resid_mid": (1, n, d),
            "blocks.0.ln2.hook_scale": (1, n, 1), "blocks.0.ln2.hook_normalized": (1, n, d),
            "blocks.0.mlp.hook_pre": (1, n, c.intermediate_size), "blocks.0.mlp.hook_post": (1, n, c.intermediate_size),
            "blocks.0.hook_mlp_out": (1, n, d), "blocks.0.hook_resid_post": (1, n, d), "ln_final.hook_scale": (1, n, 1),
            "ln_final.hook_normalized": (1, n, d)}
    got = _param_shapes(nb, 26)
    assert {k: got.get(k) for k in want} == want
    assert all(k.startswith("blocks.0.") or not k.startswith("blocks") for k in got)
    print(f"cell 26 printed {len(got)} sites: {sorted(set(got) - set(want))} besides the seed's")


def test_unembed_bias_cells_27_to_29(nb, hf):
    nb.ok(27, 28, 29)
    assert hf[0].lm_head.bias is None  # SmolLM2 has no unembedding bias: TL's b_U is zeros
    assert torch.equal(nb.ns["unembed_bias"], torch.zeros(hf[0].config.vocab_size))
    lines = nb.printed(28)
    assert lines[0] == "Top 20 values" and lines[21:23] == ["...", "Bottom 20 values"] and len(lines) == 43
    assert all(line.startswith("0.00 ") for line in lines[1:21] + lines[23:])
    assert nb.printed(29) == ["John bias: 0.0000", "Mary bias: 0.0000", "Prob ratio bias: 1.0000x"]


# -- cells 30-40: tokens -------------------------------------------------------------------------------------


def test_token_cells_30_to_37_equal_hf_tokenizer(nb, hf):
    nb.ok(30, 31, 32, 33, 34, 35, 36, 37, 53)
    model, tok = hf
    ids = _ids(tok, nb.ns["example_text"])

    def strs(t: torch.Tensor) -> list[str]:
        return [tok.decode([i]) for i in t[0]]

    assert nb.ns["example_text_str_tokens"] == strs(ids) and nb.printed(30) == [str(strs(ids))]
    assert torch.equal(nb.ns["example_text_tokens"], ids)
    rows = [_ids(tok, t)[0] for t in nb.ns["example_multi_text"]]
    width = max(len(r) for r in rows)
    pad = torch.stack([torch.cat([r, torch.full((width - len(r),), tok.pad_token_id)]) for r in rows])
    assert torch.equal(nb.ns["example_multi_text_tokens"], pad)
    cat = _ids(tok, nb.ns["cat_text"])
    the = tok.encode(" The", add_special_tokens=False)
    assert len(the) == 1
    p = _logits(model, cat).logits.softmax(-1)[0, -1, the[0]].item()
    assert abs(nb.ns["cat_probs"][0, -1, the[0]].item() - p) < 1e-5
    assert nb.printed(33) == [f"Probability tensor shape [batch, position, d_vocab] == torch.Size([1, {cat.shape[1]}, "
                              f"{model.config.vocab_size}])", f"| The| probability: {p:.2%}"]
    decoded = [f"Token 256 - the most common pair of ASCII characters: |{tok.decode([256])}|",
               f"De-Tokenizing the example tokens: {tok.decode(ids[0])}"]
    assert nb.printed(34) == decoded and nb.printed(53) == decoded
    cat_ids = tok.encode(" cat", add_special_tokens=False)[0]
    plain = tok.encode("The cat sat on the mat", add_special_tokens=False)
    assert nb.printed(35) == [f"With BOS: {plain.index(cat_ids) + 1}", f"Without BOS: {plain.index(cat_ids)}"]
    two = [tok.bos_token_id] + tok.encode("The cat sat on the mat. The mat sat on the cat.", add_special_tokens=False)
    where = [i for i, t in enumerate(two) if t == cat_ids]
    assert nb.printed(36) == [f"First occurrence {where[0]}", f"Final occurrence {where[-1]}"]
    assert nb.printed(37) == [str(strs(_ids(tok, "2342+2017=21445"))), str(strs(_ids(tok, "1000+1000000=999999")))]
    print(f"cells 35-36 positions {nb.printed(35)} {nb.printed(36)}; cell 33 P(' The') {p:.4%}")


def test_bos_cells_38_to_40_equal_hf(nb, hf):
    nb.ok(38, 39, 40)
    model, tok = hf
    n, V = len(tok.encode("Hello World", add_special_tokens=False)), model.config.vocab_size
    assert nb.printed(38) == [f"Logits shape by default (with BOS) torch.Size([1, {n + 1}, {V}])",
                              f"Logits shape with BOS torch.Size([1, {n + 1}, {V}])",
                              f"Logits shape without BOS - only 2 positions! torch.Size([1, {n}, {V}])"]
    text = "Claire and Mary went to the shops, then Mary gave a bottle of milk to"
    claire, mary = (tok.encode(s, add_special_tokens=False)[0] for s in (" Claire", " Mary"))
    refs = []
    for bos, got in ((True, nb.ns["claire_logit_with_bos"] - nb.ns["mary_logit_with_bos"]),
                     (False, nb.ns["claire_logit_without_bos"] - nb.ns["mary_logit_without_bos"])):
        last = _logits(model, _ids(tok, text, bos)).logits[0, -1]
        refs.append((last[claire] - last[mary]).item())
        assert abs(got - refs[-1]) < 2e-4, (bos, got, refs[-1])
    assert nb.printed(39) == [f"Logit difference with BOS: {refs[0]:.3f}",
                              f"Logit difference without BOS: {refs[1]:.3f}"]
    pieces = [[tok.decode([i]) for i in tok.encode(s, add_special_tokens=False)] for s in (" Claire", "Claire")]
    assert nb.printed(40) == [f"| Claire| -> {pieces[0]}", f"|Claire| -> {pieces[1]}"]
    print(f"cell 39 Claire-Mary logit diff: with BOS {refs[0]:.4f}, without {refs[1]:.4f} (HF)")


# -- cells 41-52: FactoredMatrix, OV copying scores -----------------------------------------------------------


def test_factored_matrix_cells_41_to_44_equal_dense(nb):
    nb.ok(41, 42, 43, 44)
    A, B, C, AB, F = (nb.ns[k] for k in ("A", "B", "C", "AB", "AB_factor"))
    dense = A @ B
    assert abs(F.norm().item() - dense.norm().item()) < 1e-5
    assert nb.printed(41)[2] == str(F.norm()) and nb.printed(41)[3] == (
        "Right dimension: 5, Left dimension: 5, Hidden dimension: 2")
    ev = torch.linalg.eigvals(dense)
    top = ev[ev.abs().argsort(descending=True)[:2]]
    torch.testing.assert_close(torch.sort(F.eigenvalues.real).values, torch.sort(top.real).values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(F.S, torch.linalg.svdvals(dense)[:2], atol=1e-4, rtol=1e-4)
    abc = nb.ns["ABC_factor"]
    assert abs(abc.norm().item() - (dense @ C).norm().item()) < 1e-3 * (dense @ C).norm().item()
    assert (abc.ldim, abc.mdim, abc.rdim) == (5, 2, 300)
    assert nb.printed(44) == ["tensor(True)"]


def _ov_scores(nb, hf, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Eigenvalue copying scores from the HF weights, processed as TL does (ln1 / ln_final folded, W_U centred)."""
    model, _ = hf
    c = model.config
    hd, group = c.hidden_size // c.num_attention_heads, c.num_attention_heads // c.num_key_value_heads
    if tokens is not None:
        w_u = model.lm_head.weight.T * model.model.norm.weight[:, None]
        w_u = (w_u - w_u.mean(-1, keepdim=True))[:, tokens]
        w_e = model.model.embed_tokens.weight[tokens]
    scores = torch.zeros(c.num_hidden_layers, c.num_attention_heads)
    for L, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for h in range(c.num_attention_heads):
            kv = h // group
            w_v = attn.v_proj.weight[kv * hd:(kv + 1) * hd].T * layer.input_layernorm.weight[:, None]
            w_o = attn.o_proj.weight[:, h * hd:(h + 1) * hd].T
            inner = w_o @ w_v if tokens is None else (w_o @ w_u) @ (w_e @ w_v)
            ev = torch.linalg.eigvals(inner.double())
            scores[L, h] = (ev.sum().real / ev.abs().sum()).float()
    return scores


def test_ov_copying_scores_cells_45_to_48_equal_hf_weights(nb, hf):
    nb.ok(45, 46, 47, 48)
    c = hf[0].config
    shape = (c.num_hidden_layers, c.num_attention_heads)
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    assert nb.printed(45) == [f"FactoredMatrix: Shape(torch.Size([{shape[0]}, {shape[1]}, {d}, {d}])), "
                              f"Hidden Dim({hd})"]
    assert nb.printed(46) == [f"torch.Size([{shape[0]}, {shape[1]}, {hd}])", "torch.complex64"]
    ref = _ov_scores(nb, hf)
    got = nb.ns["OV_copying_score"]
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)
    title = "Eigenvalues of Head L11H11 of GPT-2 Small"  # the seed's title; the cell plots the last head, L29H8
    scatter = [f for f in nb.ns["FIGURES"] if isinstance(f, go.Figure) and f.layout.title.text == title]
    assert len(scatter) == 1 and len(scatter[0].data[0].x) == hd
    print(f"cell 47 OV copying scores: max |fxlens - HF| {(got - ref).abs().max().item():.2e}; "
          f"mean {got.mean().item():.4f}, max {got.max().item():.4f}")


def test_full_ov_copying_scores_cells_49_to_52_equal_hf_weights(nb, hf):
    nb.ok(49, 50, 51, 52)
    c = hf[0].config
    n_tok, hd = len(nb.ns["full_OV_tokens"]), c.hidden_size // c.num_attention_heads
    assert nb.printed(49) == [f"FactoredMatrix: Shape(torch.Size([{c.num_hidden_layers}, {c.num_attention_heads}, "
                              f"{n_tok}, {n_tok}])), Hidden Dim({hd})"]
    assert nb.printed(50) == [f"torch.Size([{c.num_hidden_layers}, {c.num_attention_heads}, {hd}])", "torch.complex64"]
    ref = _ov_scores(nb, hf, nb.ns["full_OV_tokens"])
    got = nb.ns["full_OV_copying_score"]
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=0)
    fig = nb.ns["FIGURES"][-1]
    assert len(fig.data[0].hovertext) == c.num_hidden_layers * c.num_attention_heads
    print(f"cell 51 full OV copying scores ({n_tok} sampled tokens): max |fxlens - HF| "
          f"{(got - ref).abs().max().item():.2e}; corr with cell 47's "
          f"{torch.corrcoef(torch.stack([got.flatten(), nb.ns['OV_copying_score'].flatten()]))[0, 1].item():.3f}")


# -- cells 54-61: generation, hook points, checkpoints ----------------------------------------------------------


def test_generate_cell_54(nb, hf):
    nb.ok(54)
    _, tok = hf
    prompt = "(CNN) President Barack Obama caught in embarrassing new scandal\n"
    text = nb.out[54]
    assert isinstance(text, str) and text.startswith(prompt), text[:200]
    new = tok.encode(text[len(prompt):], add_special_tokens=False)
    assert 0 < len(new) <= 52, len(new)  # 50 new tokens, re-tokenised (a token may split at the seam)
    print(f"cell 54 generated: {text[len(prompt):][:80]!r}")


def test_toy_hook_points_cells_55_to_57(nb):
    nb.ok(55, 56, 57)
    assert nb.printed(56) == ["Model output: 780.0", "Value cached at hook hook_in 5.0",
                              "Value cached at hook layer1.hook_square 25.0", "Value cached at hook hook_mid 28.0",
                              "Value cached at hook layer2.hook_square 784.0", "Value cached at hook hook_out 780.0"]
    assert nb.printed(57) == ["layer2.hook_square", "Output after intervening on layer2.hook_scaled -4.0"]


def test_checkpoint_cells_58_to_61(nb):
    nb.ok(58, 59, 60, 61)
    assert nb.ns["evals"] is fxlens.evals and nb.ns["checkpoint_indices"] == [10, 25, 35, 60, -1]
    for n in (58, 60, 61):  # kept as comments: the checkpoints are not available offline
        assert nb.stdout[n] == ""
