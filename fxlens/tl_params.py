"""TransformerLens' parameter names and shapes: ``named_parameters()`` as a TL port prints it.

TL's ``HookedTransformer`` stores ``blocks.0.attn.W_Q`` as ``[n_heads, d_model, d_head]``; fxlens keeps
the HF parameters and derives the TL tensors from them. Where the TL tensor *is* an HF parameter or a
view of one (``embed.W_E``, ``pos_embed.W_pos``, ``unembed.W_U``), it is yielded as such, so in-place
edits reach the model. Everything else (per-head projections gathered from fused or interleaved HF
layouts, norm weights, zero biases the HF module lacks) is a :class:`DerivedWeight`: it reads like any
tensor, but an in-place edit raises instead of changing a copy the model never reads.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                              "__ifloordiv__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__"})


class DerivedWeight(torch.Tensor):
    """A TL-shaped tensor computed from the HF parameters; in-place edits raise (they would be lost)."""

    name: str = "this weight"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fn = getattr(func, "__name__", "")
        if fn in _INPLACE_DUNDERS or (fn.endswith("_") and not fn.startswith("_")):
            self = next((a for a in args if isinstance(a, DerivedWeight)), None)
            label = self.name if self is not None else "a TransformerLens-named weight"
            raise RuntimeError(
                f"{label} is computed from the HuggingFace parameters, so an in-place edit ({fn}) would change a "
                "copy the model never reads. Edit the HF parameter instead (model.hf_model.named_parameters(); "
                "fxlens picks the change up on the next call), or use model.process_weights().")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        base = next((a for a in args if isinstance(a, DerivedWeight)), None)
        if base is not None and isinstance(out, torch.Tensor) and _shares_storage(out, base):
            out = out.as_subclass(cls)  # views (p[0], p.data, p.T) stay guarded
            out.name = base.name
        return out


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    with torch._C.DisableTorchFunctionSubclass():
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _derived(name: str, t: torch.Tensor) -> DerivedWeight:
    out = t.detach().as_subclass(DerivedWeight)
    out.name = name
    return out


def tl_named_parameters(model) -> Iterator[tuple[str, torch.Tensor]]:
    """``(TL name, tensor)`` in TransformerLens' order (see the module docstring).

    Norm weights are listed unless the norms are folded (``normalization_type`` ending in ``Pre``,
    TL's ``LNPre`` / ``RMSPre`` have none); under GQA the key/value weights are TL's ``_W_K`` / ``_W_V``
    ``[n_kv_heads, d_model, d_head]``. Multi-head latent attention (DeepSeek MLA) has no ``W_Q`` / ``W_K`` /
    ``W_V`` (no single matrix per head: ``model.W_K`` raises and says why), so only ``W_O`` / ``b_O`` are listed.
    """
    cfg, fam = model.cfg, model.family
    norms = bool(cfg.normalization_type) and not cfg.normalization_type.endswith("Pre")
    yield "embed.W_E", model.W_E
    if fam.pos_embed is not None:
        yield "pos_embed.W_pos", model.W_pos
    kv = "_" if cfg.n_kv_heads != cfg.n_heads else ""
    latent = any(s.extra.get("latent") for n, s in model.sites.items() if n.endswith(".attn.hook_k"))
    attn = ("W_O", "b_O") if latent else ("W_Q", "W_O", "b_Q", "b_O", f"{kv}W_K", f"{kv}W_V", f"{kv}b_K", f"{kv}b_V")
    stacks = {n: getattr(model, n) for n in ("W_O", "b_O", "W_in", "b_in", "W_out", "b_out")}
    if not latent:
        stacks.update({"W_Q": model.W_Q, "b_Q": model.b_Q, f"{kv}W_K": model.W_K_kv if kv else model.W_K,
                       f"{kv}W_V": model.W_V_kv if kv else model.W_V, f"{kv}b_K": model.b_K_kv if kv else model.b_K,
                       f"{kv}b_V": model.b_V_kv if kv else model.b_V})
    if fam.gated:
        stacks["W_gate"] = model.W_gate
    for L, block in enumerate(model.blocks):
        if norms:
            for ln in ("ln1", "ln2"):
                norm = getattr(block, ln)
                if norm.exists:
                    yield from _norm_params(f"blocks.{L}.{ln}", norm, cfg)
        for n in attn:
            yield f"blocks.{L}.attn.{n}", _derived(f"blocks.{L}.attn.{n}", stacks[n][L])
        for n in ("W_in", "W_gate", "b_in", "W_out", "b_out"):
            if n in stacks:
                yield f"blocks.{L}.mlp.{n}", _derived(f"blocks.{L}.mlp.{n}", stacks[n][L])
    if norms and model.ln_final.exists:
        yield from _norm_params("ln_final", model.ln_final, cfg)
    if model.hf_model.get_output_embeddings() is not None:
        yield "unembed.W_U", model.W_U
        head_bias = getattr(model.hf_model.get_output_embeddings(), "bias", None)
        yield "unembed.b_U", head_bias if head_bias is not None else _derived("unembed.b_U", model.b_U)


def _norm_params(prefix: str, norm, cfg) -> Iterator[tuple[str, torch.Tensor]]:
    yield f"{prefix}.w", _derived(f"{prefix}.w", norm.w)
    if cfg.normalization_type.startswith("LN"):
        yield f"{prefix}.b", _derived(f"{prefix}.b", norm.b)
