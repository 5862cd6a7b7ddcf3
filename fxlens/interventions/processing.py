"""TransformerLens' weight processing on an HF model: fold norms, centre writing weights and unembedding.

:func:`process_weights` returns a *new* :class:`~fxlens.HookedModel` over a processed copy of
the HF model (the original is untouched):

* ``fold_ln``: every norm's elementwise weight (and bias) is folded into the linear maps that
  read it (q/k/v, MLP inputs, unembedding), and the norm is set to the identity affine map, so
  its output ``hook_out`` equals ``hook_normalized``, the bare normalised vector (TransformerLens'
  ``LNPre`` / ``RMSPre``; ``cfg.normalization_type`` says so). Exact up to float rounding.
* ``center_writing_weights``: everything that writes to the residual stream (embeddings,
  attention and MLP output projections) has its mean over ``d_model`` removed. Exact only
  when every reader of the residual stream subtracts the mean (LayerNorm models): the default
  ``None`` does it for LayerNorm models and skips RMSNorm ones; ``True`` on an RMSNorm model
  raises.
* ``center_unembed``: ``W_U`` and ``b_U`` lose their mean over the vocabulary. Logits shift by
  one constant per position, which softmax ignores: log-probabilities, losses and logit
  *differences* are unchanged, raw logits are not.

Tied embeddings are untied in the copy. The processed model is checked against the original
on random tokens before it is returned; a difference beyond rounding raises, so a model whose
structure the folding does not cover (post-norm blocks, mixture-of-experts, logit soft-capping
with ``center_unembed``) fails loudly instead of returning wrong weights.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import fx, nn

from ..tracer.graph import SHAPE_OPS, ModuleIndex, is_op
from .weights import in_out, norm_affine


def process_weights(model, *, fold_ln: bool = True, center_writing_weights: bool | None = None,
                    center_unembed: bool = True, fold_value_biases: bool = False, check: bool = True):
    """A processed copy of ``model`` (see module docstring); ``check`` compares logits with the original."""
    fam, cfg = model.family, model.cfg
    layer_norm = cfg.normalization_type.startswith("LN")
    if fam.moe:
        raise ValueError("weight processing is not supported for mixture-of-experts blocks (router and experts "
                         "read the norm and write the residual stream through index ops)")
    if center_writing_weights is None:
        center_writing_weights = layer_norm
    elif center_writing_weights and not layer_norm:
        raise ValueError("center_writing_weights needs LayerNorm: this model uses RMSNorm, which does not remove "
                         "the mean, so centring would change its outputs (TransformerLens skips it too)")
    softcap = getattr(getattr(model.hf_model.config, "text_config", model.hf_model.config),
                      "final_logit_softcapping", None)
    if center_unembed and softcap:
        raise ValueError(f"center_unembed is not softmax-invariant with final logit soft-capping ({softcap})")

    hf = copy.deepcopy(model.hf_model)
    _untie(hf)
    with torch.no_grad():
        if fold_ln:
            _fold_norms(model, hf)
        if center_writing_weights:
            _center_writers(model, hf)
        if center_unembed:
            _center_unembed(hf)
        if fold_value_biases:
            _fold_value_biases(model, hf)
    out = model.retrace(hf)
    if fold_ln:
        out.cfg = dataclasses.replace(out.cfg, normalization_type=cfg.normalization_type + "Pre")
    out.processing = {"fold_ln": fold_ln, "center_writing_weights": bool(center_writing_weights),
                      "center_unembed": center_unembed, "fold_value_biases": fold_value_biases}
    if check:
        _check(model, out, center_unembed)
    return out


def _fold_value_biases(model, hf: nn.Module) -> None:
    """Move each value bias into the output bias (TL's ``fold_value_biases``): every pattern row sums
    to 1, so ``b_O += sum_h b_V[h] @ W_O[h]`` and ``b_V = 0`` leave the outputs unchanged."""
    cfg, fam = model.cfg, model.family
    group = cfg.n_heads // cfg.n_kv_heads
    for L in range(cfg.n_layers):
        v_path, idx = model.qkv_location(L, "v")
        bias = getattr(hf.get_submodule(v_path), "bias", None)
        if bias is None:
            continue
        b_v = bias[idx.to(bias.device)].repeat_interleave(group, 0)  # [n_heads, d_head]
        o = hf.get_submodule(fam.block(L, fam.attn_out))
        W, b_o = in_out(o)  # [n_heads * d_head, d_model]
        shift = torch.einsum("hd,hdm->m", b_v.to(W.dtype), W.unflatten(0, (cfg.n_heads, cfg.d_head)))
        if b_o is not None:
            b_o.add_(shift)
        else:
            o.bias = nn.Parameter(shift)
        bias[idx.to(bias.device)] = 0


def _untie(hf: nn.Module) -> None:
    """Give the copy its own unembedding when it shares the embedding's storage."""
    head, emb = hf.get_output_embeddings(), hf.get_input_embeddings()
    if head is None or emb is None or head.weight.data_ptr() != emb.weight.data_ptr():
        return
    head.weight = nn.Parameter(head.weight.detach().clone())
    for c in (hf.config, getattr(hf.config, "text_config", None)):
        if c is not None and hasattr(c, "tie_word_embeddings"):
            c.tie_word_embeddings = False


def norm_readers(model, site: str) -> list[str]:
    """HF module paths of the linear maps reading the norm output at ``site`` (e.g. ``blocks.0.ln1.hook_out``).

    Follows reshapes/splits forward from the norm's output node; any other reader raises.
    """
    gm = model.base_graph
    ix = ModuleIndex(gm.graph)
    node = next(n for n in gm.graph.nodes if n.name == model.sites[site].node)
    readers: dict[str, None] = {}
    todo: list[fx.Node] = [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if is_op(u, SHAPE_OPS):
                todo.append(u)
                continue
            path = ix.path(u)
            mod = model.hf_model.get_submodule(path) if path else None
            try:
                in_out(mod) if mod is not None else None
            except TypeError:
                mod = None
            if mod is None or u.op != "call_function":
                raise ValueError(f"cannot fold {site}: its output is read by {u.name} ({u.target}) in "
                                 f"{path or 'the top level'}, not by a linear layer (post-norm block?)")
            readers[path] = None
    return list(readers)


def _norm_sites(model) -> list[str]:
    names = [f"blocks.{L}.{ln}.hook_out" for L in range(model.cfg.n_layers) for ln in ("ln1", "ln2")]
    return [n for n in (*names, "ln_final.hook_out") if n in model.sites]


def _fold_norms(model, hf: nn.Module) -> None:
    centre = model.cfg.normalization_type.startswith("LN")
    for site in _norm_sites(model):
        if site == "ln_final.hook_out" and model.output_kind != "logits":
            continue  # no unembedding to fold into: the final norm stays as it is
        norm = hf.get_submodule(model.sites[site].module)
        w, b = norm_affine(norm, model.cfg.d_model, centre)
        for path in norm_readers(model, site):
            lin = hf.get_submodule(path)
            W, bias = in_out(lin)  # W [in, out] is a view of the parameter
            shift = b.to(W.dtype) @ W
            if bias is not None:
                bias.add_(shift)
            elif shift.abs().max() > 0:
                lin.bias = nn.Parameter(shift)
            W.mul_(w.to(W.dtype)[:, None])
        _set_identity(norm, model.cfg.d_model, centre, site)


def _set_identity(norm: nn.Module, d_model: int, centre: bool, site: str) -> None:
    """Set a norm's parameters so its elementwise map is ``x_hat * 1 + 0`` (probes ``(1 + w)`` styles too)."""
    bias, weight = getattr(norm, "bias", None), getattr(norm, "weight", None)
    if isinstance(bias, torch.Tensor):
        bias.zero_()
    if isinstance(weight, torch.Tensor):
        weight.zero_()
        at0, _ = norm_affine(norm, d_model, centre)
        weight.fill_(1.0)
        at1, _ = norm_affine(norm, d_model, centre)
        weight.copy_((1 - at0) / (at1 - at0))
    w, b = norm_affine(norm, d_model, centre)
    if not (torch.allclose(w.float(), torch.ones_like(w.float()), atol=1e-4) and b.abs().max() <= 1e-4):
        raise ValueError(f"cannot make the norm at {site} ({type(norm).__name__}) the identity affine map")


def _center_writers(model, hf: nn.Module) -> None:
    fam = model.family
    if fam.attn_post_norm or fam.mlp_post_norm or fam.post_norm:
        raise ValueError("center_writing_weights: this model writes the residual stream through post-norms")
    for path in (fam.embed, fam.pos_embed):
        if path is not None:
            emb = hf.get_submodule(path).weight
            emb.sub_(emb.mean(-1, keepdim=True))
    for L in range(model.cfg.n_layers):
        for rel in (fam.attn_out, fam.mlp_out):
            W, bias = in_out(hf.get_submodule(fam.block(L, rel)))  # [in, d_model]
            W.sub_(W.mean(-1, keepdim=True))
            if bias is not None:
                bias.sub_(bias.mean())


def _center_unembed(hf: nn.Module) -> None:
    head = hf.get_output_embeddings()
    if head is None:
        raise ValueError("center_unembed needs an unembedding; this model has no LM head")
    W, bias = in_out(head)  # [d_model, vocab]
    W.sub_(W.mean(-1, keepdim=True))
    if bias is not None:
        bias.sub_(bias.mean())


def _check(before, after, shifted: bool) -> None:
    """Compare outputs on random tokens; raise when they differ beyond rounding."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, before.cfg.d_vocab, (2, 7), generator=gen)
    a, b = before(ids).float(), after(ids).float()
    if shifted:
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    err = (a - b).abs().max().item()
    tol = max(1e-3, 100 * torch.finfo(before.hf_model.dtype).eps) * (1 + a.abs().max().item())
    if err > tol:
        raise ValueError(f"weight processing changed this model's outputs (max-abs {err:.3g} > {tol:.3g}); "
                         "its structure is not covered (post-norm or non-linear norm readers?)")
