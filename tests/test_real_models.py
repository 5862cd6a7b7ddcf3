"""Real offline checkpoints (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) and compiled graphs."""

from __future__ import annotations

import pytest
import torch
import transformers

import fxlens

pytestmark = pytest.mark.slow
IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def smol() -> fxlens.HookedModel:
    return fxlens.from_pretrained(fxlens.offline_model_path("smollm2"))


def test_smollm2_logits_equal_hf_and_ioi_answer_is_mary(smol):
    ids, mask = smol.to_tokens_and_mask([IOI, "The capital of France is"], padding_side="left")
    with torch.no_grad():
        ref = smol.hf_model(input_ids=ids, attention_mask=mask).logits
    out = smol(ids, attention_mask=mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max().item() <= 1e-5
    logits = smol(IOI)
    assert smol.to_string([logits[0, -1].argmax().item()]) == " Mary"
    mary, john = smol.to_single_token(" Mary"), smol.to_single_token(" John")
    assert logits[0, -1, mary] > logits[0, -1, john]


def test_smollm2_sites_match_hf_hidden_states(smol):
    ids = smol.to_tokens(IOI)
    _, cache = smol.run_with_cache(ids, names_filter=lambda n: "resid_post" in n or n.startswith("ln_final"))
    with torch.no_grad():
        hs = smol.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    for L in range(smol.cfg.n_layers - 1):
        assert (cache["resid_post", L] - hs[L + 1]).abs().max().item() <= 1e-4
    assert (cache["ln_final.hook_out"] - hs[-1]).abs().max().item() <= 1e-5
    assert smol.cfg.n_kv_heads == 3 and smol.cfg.n_heads == 9
    assert len(smol.hook_names) == 23 * 30 + 4  # 23 per block + embed + ln_final x3
    assert len(smol.all_hook_names) == 27 * 30 + 4  # + 4 split-input sites per block


def test_token_utilities(smol):
    toks = smol.to_tokens("The cat sat on the mat")
    assert smol.to_string(toks[0]) == "The cat sat on the mat"
    assert "".join(smol.to_str_tokens("The cat sat on the mat")) == "The cat sat on the mat"
    assert smol.get_token_position(" cat", "The cat sat on the cat") == 1
    assert smol.get_token_position(" cat", "The cat sat on the cat", mode="last") == 5
    with_bos = smol.to_tokens("The cat", prepend_bos=True)
    assert with_bos[0, 0].item() == smol.tokenizer.bos_token_id and with_bos.shape[1] == toks[:, :2].shape[1] + 1
    padded, mask = smol.to_tokens_and_mask(["a", "a b c"], padding_side="left")
    assert mask.tolist()[0][:2] == [0, 0]
    assert padded.shape == (2, 3)
    with pytest.raises(ValueError, match="not one"):
        smol.to_single_token(" Mary and")
    with pytest.raises(ValueError, match="empty"):
        smol("")


def test_minilm_hidden_states_equal_hf():
    path = fxlens.offline_model_path("minilm")
    m = fxlens.from_pretrained(path)
    hf = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    ids, mask = m.to_tokens_and_mask(["fxlens instruments unmodified models", "a second sentence"])
    _, cache = m.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: "ln2.hook_out" in n
                                or "pattern" in n)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    real = mask.bool()
    assert m.cfg.family == "bert" and m.cfg.n_layers == 6
    for L in range(6):
        assert (cache["blocks.%d.ln2.hook_out" % L][real] - ref.hidden_states[L + 1][real]).abs().max() <= 1e-5
        assert (cache["pattern", L][0] - ref.attentions[L][0]).abs().max() <= 1e-5
    assert (m(ids, attention_mask=mask)[real] - ref.last_hidden_state[real]).abs().max() <= 1e-5


def test_compiled_graph_honours_hooks_added_after_first_call():
    from tests.conftest import tiny_hf, tokens

    m = fxlens.trace(tiny_hf("llama"), compile=True)
    ids = tokens(2, 6)
    first = m(ids)
    ref = m.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (first - ref).abs().max().item() <= 1e-5
    m.add_hook("blocks.1.hook_resid_pre", lambda x, hook: torch.zeros_like(x))
    hooked = m(ids)
    assert (hooked - first).abs().max().item() > 1e-3
    m.reset_hooks()
    m.add_hook("blocks.1.hook_resid_pre", lambda x, hook: x * 0.5)  # same site, new function
    halved = m(ids)
    assert (halved - hooked).abs().max().item() > 1e-3
    m.reset_hooks()
    assert (m(ids) - first).abs().max().item() <= 1e-6
