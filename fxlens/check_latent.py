"""Reference for sites placed at the attention inputs (multi-head latent attention's ``hook_q/k/v``).

MLA (DeepSeek V2/V3 and kin) has no projection whose output is a whole key: the key is the concat of a
per-head part decompressed from a shared latent and a shared rotary part. Its ``hook_q`` / ``hook_k`` /
``hook_v`` are the tensors entering attention, so the reference is what HF passes to its attention
function, recorded by wrapping the ``sdpa`` entry of ``ALL_ATTENTION_FUNCTIONS`` for one forward.
"""

from __future__ import annotations

import torch


def check_attention_inputs(res, model, cache, ids, mask) -> None:
    """``hook_q/k/v`` placed at the attention inputs (multi-head latent attention) against the query, key and
    value HF passes to its attention function (SDPA, wrapped for one forward to record them)."""
    hf, fam, n = model.hf_model, model.family, model.cfg.n_layers
    names = [f"blocks.{L}.attn.hook_{w}" for L in range(n) for w in "qkv"]
    names = [x for x in names if model.sites.get(x) and model.sites[x].extra.get("attention_input")]
    if not names:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    layer = {id(hf.get_submodule(fam.block(L, fam.attn))): L for L in range(n)}
    seen: dict[int, tuple] = {}
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    local = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")

    def record(module, query, key, value, *args, **kwargs):
        if id(module) in layer:
            seen[layer[id(module)]] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
        return sdpa(module, query, key, value, *args, **kwargs)

    impl = getattr(hf.config, "_attn_implementation", None)
    ALL_ATTENTION_FUNCTIONS["sdpa"] = record  # the model's own masks and code paths, SDPA's inputs recorded
    try:
        if impl != "sdpa":
            hf.set_attn_implementation("sdpa")
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=mask)
    except Exception as e:  # noqa: BLE001 - no reference rather than a wrong one
        res._skip("qkv", f"attention inputs not recorded: {type(e).__name__}: {e}"[:160])
        return
    finally:
        if local is None:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = local
        if impl and impl != "sdpa":
            hf.set_attn_implementation(impl)
    for name in names:
        L, w = int(name.split(".")[1]), name[-1]
        if L not in seen:
            res._skip("qkv", f"the attention function of block {L} was not called")
            continue
        ref = seen[L]["qkv".index(w)].transpose(1, 2)  # HF passes [batch, heads, pos, d]
        got = cache[name]
        if ref.shape != got.shape and ref.shape[2] != got.shape[2]:  # repeated KV heads: compare one copy each
            ref = ref[:, :, :: ref.shape[2] // got.shape[2]]
        res._record("qkv", name, got, ref)
