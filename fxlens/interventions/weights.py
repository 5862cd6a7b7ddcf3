"""Weights in TransformerLens layout, read from the HF parameters.

Which parameter rows feed which head is not assumed per family: for every q/k/v site and
MLP input site, the captured graph is probed once to learn which output feature of the
projection lands at each ``(head, d_head)`` (fused GPT-2 ``c_attn``, interleaved NeoX
``query_key_value`` and Phi-3 ``qkv_proj`` / ``gate_up_proj`` all come out right).
``nn.Linear`` (``[out, in]``) and GPT-2 ``Conv1D`` (``[in, out]``) layouts are both read.
Per-layer weights are views of the HF parameters where the feature index is affine (all
common layouts); stacked ``[n_layers, ...]`` tensors are copies, cached until a
parameter changes.

Shapes (TransformerLens): ``W_Q [L, n_heads, d_model, d_head]``, ``b_Q [L, n_heads, d_head]``,
``W_O [L, n_heads, d_head, d_model]``, ``W_in/W_gate [L, d_model, d_mlp]``,
``W_out [L, d_mlp, d_model]``, ``W_E [d_vocab, d_model]``, ``W_U [d_model, d_vocab]``.
Scalars the graph applies outside the modules are part of the weights, so the weights are what the
sites imply: ``W_E[ids] == hook_embed`` (Gemma's ``sqrt(d_model)``, Granite's ``embedding_multiplier``),
``einsum(z, W_O) + b_O == hook_attn_out`` and ``hook_post @ W_out + b_out == hook_mlp_out`` (Granite's
``residual_multiplier``), ``ln_final.hook_out @ W_U + b_U == logits`` (Granite's ``logits_scaling``,
Cohere's ``logit_scale``; before a final soft-cap, which is not linear). Scaled weights are copies.
GQA: ``W_K``/``W_V``/``b_K``/``b_V`` are repeated to ``n_heads`` (query head ``h`` reads KV
head ``h // (n_heads // n_kv_heads)``), as in TransformerLens; ``W_K_kv`` etc. keep
``n_kv_heads`` heads and match the ``hook_k``/``hook_v`` sites.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..tracer.graph import SHAPE_OPS, is_op, module_path
from ..tracer.passes.split_inputs import probe_feature_index
from .factored_matrix import FactoredMatrix
from .scales import embedding_scale, head_input_problem, logit_scale, site_scale


def in_out(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W [in, out], bias [out] | None)`` of a linear-like module (a view, no copy)."""
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        raise TypeError(f"{type(module).__name__} is not a linear layer (no 2-D weight)")
    conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores [in, out]
    return (w if conv1d else w.T), getattr(module, "bias", None)


def gather_out(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``w[:, index]`` moved to ``[*index.shape[:-1], in, index.shape[-1]]``; a view when ``index`` is affine."""
    flat = index.reshape(-1, index.shape[-1])
    n, d = flat.shape
    a = int(flat[0, 0])
    step = int(flat[1, 0] - flat[0, 0]) if n > 1 else 0
    affine = torch.equal(flat, a + step * torch.arange(n)[:, None] + torch.arange(d)[None, :])
    if affine:
        so, si = w.stride(1), w.stride(0)
        view = w.as_strided((n, w.shape[0], d), (step * so, si, so), w.storage_offset() + a * so)
    else:
        view = w[:, flat].permute(1, 0, 2)
    return view.reshape(*index.shape[:-1], w.shape[0], d)


def gather_bias(b: torch.Tensor | None, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``b[index]``, or zeros shaped like ``index`` when the projection has no bias."""
    if b is None:
        return torch.zeros(index.shape, dtype=like.dtype, device=like.device)
    return b[index.to(b.device)]


def _feeding_projection(node: fx.Node) -> fx.Node:
    """The first non-shape op above ``node`` (the projection whose features it selects)."""
    while is_op(node, SHAPE_OPS):
        node = node.args[0]
    return node


class WeightLayout:
    """Where each TransformerLens weight lives in the HF model; probed once per model."""

    def __init__(self, model):
        self.model, cfg, fam = model, model.cfg, model.family
        base = model.base_graph
        sites, nodes = model.sites, {n.name: n for n in base.graph.nodes}
        self.qkv = model.split_index()  # "L.q" -> [heads, d_head] feature index
        self.qkv_module = {f"{L}.{w}": sites[f"blocks.{L}.attn.hook_{w}"].extra.get("proj_module")
                           for L in range(cfg.n_layers) for w in "qkv"}
        probes, self.mlp_module = {}, {}
        mlp_sites = {"gate": "hook_pre", "in": "hook_pre_linear"} if fam.gated else {"in": "hook_pre"}
        for L in range(cfg.n_layers):
            for key, site in mlp_sites.items():
                if f"blocks.{L}.mlp.{site}" not in sites:  # a mixture of experts: no single input projection
                    continue
                node = nodes[sites[f"blocks.{L}.mlp.{site}"].node]
                proj = _feeding_projection(node)
                self.mlp_module[f"{L}.{key}"] = module_path(proj)
                probes[f"{L}.{key}"] = (proj, node, lambda x: x.reshape(1, 1, -1))
        self.mlp = probe_feature_index(base, probes)  # "L.in" -> [d_mlp]
        # scalars applied outside the modules (see the module docstring); a post-norm's scale is not W_O's
        self.attn_scale = [site_scale(sites, f"blocks.{L}.hook_attn_out", fam.attn_post_norm)
                           for L in range(cfg.n_layers)]
        self.mlp_scale = [site_scale(sites, f"blocks.{L}.hook_mlp_out", fam.mlp_post_norm)
                          for L in range(cfg.n_layers)]
        self.embed_scale = site_scale(sites, "hook_embed", None)
        self.logit_scale = logit_scale(base, model.hf_model)
        self.head_problem = head_input_problem(base, model.hf_model, sites)

    def module(self, path: str) -> nn.Module:
        return self.model.hf_model.get_submodule(path)


def norm_affine(module: nn.Module, d_model: int, centre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective elementwise ``(w, b)`` of a norm module: ``y = x_hat * w + b``.

    Probed numerically, so Gemma's ``(1 + weight)`` and bias-free norms need no special case.
    ``x_hat`` is ``x / scale`` (RMSNorm) or ``(x - mean) / scale`` (LayerNorm, ``centre=True``).
    """
    p = next(module.parameters(), None)
    dtype, device = (p.dtype, p.device) if p is not None else (torch.float32, "cpu")
    with torch.no_grad():
        zero = module(torch.zeros(1, d_model, dtype=torch.float64 if dtype == torch.float64 else dtype, device=device))
        x = torch.eye(d_model, dtype=torch.float64) * 1e3
        xc = x - x.mean(-1, keepdim=True) if centre else x
        x_hat = xc / xc.pow(2).mean(-1, keepdim=True).sqrt()
        y = module(x.to(dtype=dtype, device=device)).double()
        b = zero[0].double()
        w = ((y - b).diagonal() / x_hat.diagonal().to(device))
    return w.to(dtype), b.to(dtype)


class WeightsMixin:
    """TransformerLens weight attributes for :class:`~fxlens.HookedModel` (see module docstring)."""

    # -- plumbing -----------------------------------------------------------------
    def _layout(self) -> WeightLayout:
        self.ensure_fresh()
        return self.memo("weight_layout", lambda: WeightLayout(self))

    def _stack(self, name: str, per_layer) -> torch.Tensor:
        """``torch.stack([per_layer(L)])``, cached on the parameters' identities and versions."""
        return self._cached(name, lambda: torch.stack([per_layer(L) for L in range(self.cfg.n_layers)]))

    def _cached(self, name: str, make) -> torch.Tensor:
        """``make()``, cached on the parameters' identities and versions."""
        cache = self.__dict__.setdefault("_weight_stacks", {})
        key = tuple((p.data_ptr(), p._version) for p in self.hf_model.parameters())
        hit = cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        out = make()
        cache[name] = (key, out)
        return out

    def _scaled(self, name: str, t: torch.Tensor | None, scale: float) -> torch.Tensor | None:
        """``t * scale`` (cached), or ``t`` itself (a view of the HF tensor) when ``scale`` is 1."""
        if t is None or scale == 1.0:
            return t
        return self._cached(name, lambda: t * scale)

    def _qkv(self, L: int, w: str) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self._layout()
        if lay.qkv_module[f"{L}.{w}"] is None:
            raise ValueError(latent_problem(self.cfg.family, L, w))
        W, b = in_out(lay.module(lay.qkv_module[f"{L}.{w}"]))
        idx = lay.qkv[f"{L}.{w}"]
        return gather_out(W, idx), gather_bias(b, idx, W)

    def _mlp_in(self, L: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self._layout()
        key = f"{L}.{which}"
        if f"blocks.{L}.mlp.hook_router_logits" in self.sites:
            raise ValueError(f"block {L}'s MLP is a mixture of experts: it has no single W_in / W_gate / W_out "
                             "(per-expert weights are the HF experts' parameters)")
        if key not in lay.mlp:
            raise AttributeError(f"this {self.cfg.family} MLP is not gated: it has W_in but no W_gate")
        W, b = in_out(lay.module(lay.mlp_module[key]))
        idx = lay.mlp[key]
        return gather_out(W, idx[None])[0], gather_bias(b, idx, W)

    def qkv_location(self, L: int, w: str) -> tuple[str, torch.Tensor]:
        """``(HF module path, feature index [heads, d_head])`` of block ``L``'s q, k or v projection."""
        lay = self._layout()
        if lay.qkv_module[f"{L}.{w}"] is None:
            raise ValueError(latent_problem(self.cfg.family, L, w))
        return lay.qkv_module[f"{L}.{w}"], lay.qkv[f"{L}.{w}"]

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.cfg.n_heads // self.cfg.n_kv_heads, dim=1)

    def _module(self, rel: str | None, L: int | None = None) -> nn.Module:
        if rel is None:
            raise AttributeError(f"{self.cfg.family} models have no such module")
        return self.hf_model.get_submodule(self.family.block(L, rel) if L is not None else rel)

    # -- attention ------------------------------------------------------------------
    @property
    def W_Q(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_model, d_head]``: ``ln1.hook_out @ W_Q + b_Q == attn.hook_q``."""
        return self._stack("W_Q", lambda L: self._qkv(L, "q")[0])

    @property
    def b_Q(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_head]`` (zeros without a bias)."""
        return self._stack("b_Q", lambda L: self._qkv(L, "q")[1])

    @property
    def W_K_kv(self) -> torch.Tensor:
        """``[n_layers, n_kv_heads, d_model, d_head]``: the KV heads as stored (matches ``hook_k``)."""
        return self._stack("W_K_kv", lambda L: self._qkv(L, "k")[0])

    @property
    def b_K_kv(self) -> torch.Tensor:
        """``[n_layers, n_kv_heads, d_head]``."""
        return self._stack("b_K_kv", lambda L: self._qkv(L, "k")[1])

    @property
    def W_V_kv(self) -> torch.Tensor:
        """``[n_layers, n_kv_heads, d_model, d_head]`` (matches ``hook_v``)."""
        return self._stack("W_V_kv", lambda L: self._qkv(L, "v")[0])

    @property
    def b_V_kv(self) -> torch.Tensor:
        """``[n_layers, n_kv_heads, d_head]``."""
        return self._stack("b_V_kv", lambda L: self._qkv(L, "v")[1])

    @property
    def W_K(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_model, d_head]``; KV heads repeated per query head under GQA."""
        return self._repeat_kv(self.W_K_kv)

    @property
    def b_K(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_head]`` (repeated under GQA)."""
        return self._repeat_kv(self.b_K_kv)

    @property
    def W_V(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_model, d_head]`` (repeated under GQA)."""
        return self._repeat_kv(self.W_V_kv)

    @property
    def b_V(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_head]`` (repeated under GQA)."""
        return self._repeat_kv(self.b_V_kv)

    def _o(self, L: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        W, b = in_out(self._module(self.family.attn_out, L))
        s = self._layout().attn_scale[L]
        W = W.unflatten(0, (self.cfg.n_heads, -1))  # z's head size (MLA values have their own)
        return (W, b) if s == 1.0 else (W * s, None if b is None else b * s)

    def _down(self, L: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if f"blocks.{L}.mlp.hook_router_logits" in self.sites:
            raise ValueError(f"block {L}'s MLP is a mixture of experts: it has no single W_out "
                             "(per-expert weights are the HF experts' parameters)")
        W, b = in_out(self._module(self.family.mlp_out, L))
        s = self._layout().mlp_scale[L]
        return (W, b) if s == 1.0 else (W * s, None if b is None else b * s)

    @property
    def W_O(self) -> torch.Tensor:
        """``[n_layers, n_heads, d_head, d_model]``: ``einsum(z, W_O) + b_O`` is ``hook_attn_out`` (the output
        projection, times Granite's ``residual_multiplier``; before the post-norm of Gemma 2/3)."""
        return self._stack("W_O", lambda L: self._o(L)[0])

    @property
    def b_O(self) -> torch.Tensor:
        """``[n_layers, d_model]`` (zeros without a bias)."""
        return self._stack("b_O", lambda L: _or_zeros(self._o(L)[1], self.cfg.d_model, self._o(L)[0]))

    # -- MLP --------------------------------------------------------------------------
    @property
    def W_in(self) -> torch.Tensor:
        """``[n_layers, d_model, d_mlp]``: the linear (up) input of gated MLPs, the only input otherwise."""
        return self._stack("W_in", lambda L: self._mlp_in(L, "in")[0])

    @property
    def b_in(self) -> torch.Tensor:
        """``[n_layers, d_mlp]``."""
        return self._stack("b_in", lambda L: self._mlp_in(L, "in")[1])

    @property
    def W_gate(self) -> torch.Tensor:
        """``[n_layers, d_model, d_mlp]``: gated MLPs' gate (``ln2.hook_out @ W_gate == mlp.hook_pre``)."""
        return self._stack("W_gate", lambda L: self._mlp_in(L, "gate")[0])

    @property
    def b_gate(self) -> torch.Tensor:
        """``[n_layers, d_mlp]``."""
        return self._stack("b_gate", lambda L: self._mlp_in(L, "gate")[1])

    @property
    def W_out(self) -> torch.Tensor:
        """``[n_layers, d_mlp, d_model]``: ``mlp.hook_post @ W_out + b_out`` is ``hook_mlp_out`` (the down
        projection, times Granite's ``residual_multiplier``; before the post-norm of Gemma 2/3)."""
        return self._stack("W_out", lambda L: self._down(L)[0])

    @property
    def b_out(self) -> torch.Tensor:
        """``[n_layers, d_model]``."""
        def one(L):
            W, b = self._down(L)
            return _or_zeros(b, self.cfg.d_model, W)
        return self._stack("b_out", one)

    # -- embeddings -----------------------------------------------------------------------
    @property
    def W_E(self) -> torch.Tensor:
        """``[d_vocab, d_model]``: ``W_E[ids] == hook_embed``, the token embedding table times the model's
        embedding scale (Gemma's ``sqrt(d_model)``, Granite's ``embedding_multiplier``; TransformerLens folds
        them in too). A view of the HF table when there is no scale, else a cached copy."""
        emb = self._module(self.family.embed)
        return self._scaled("W_E", emb.weight, self._layout().embed_scale * embedding_scale(emb))

    @property
    def W_pos(self) -> torch.Tensor:
        """``[n_ctx, d_model]``: learned absolute positions (OPT's offset rows dropped)."""
        if self.family.pos_embed is None:
            raise AttributeError(f"{self.cfg.family} models have no learned position embedding "
                                 f"({self.cfg.positional_embedding_type} positions)")
        mod = self._module(self.family.pos_embed)
        return mod.weight[getattr(mod, "offset", 0):]

    @property
    def W_U(self) -> torch.Tensor:
        """``[d_model, d_vocab]``: ``ln_final.hook_out @ W_U + b_U`` are the logits (before a final soft-cap):
        the LM head times the graph's logit scale (Granite's ``1 / logits_scaling``, Cohere's ``logit_scale``).
        A view of the HF weight when there is no scale, else a cached copy."""
        head = self.hf_model.get_output_embeddings()
        if head is None:
            raise AttributeError("this model has no unembedding (an encoder without an LM head)")
        if self._layout().head_problem:
            raise ValueError(f"W_U is undefined: {self._layout().head_problem}, so ln_final.hook_out @ W_U would not "
                             "be the logits; unembed through the HF model (hf_model.lm_head) instead")
        return self._scaled("W_U", head.weight.T, self._layout().logit_scale)

    @property
    def b_U(self) -> torch.Tensor:
        """``[d_vocab]`` (zeros without a bias)."""
        head = self.hf_model.get_output_embeddings()
        b = self._scaled("b_U", getattr(head, "bias", None), self._layout().logit_scale)
        return _or_zeros(b, self.cfg.d_vocab, head.weight)

    def ln_final_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective ``(w, b)`` of the final norm: ``ln_final.hook_out == ln_final.hook_normalized * w + b``."""
        if self.family.ln_final is None:
            raise AttributeError("this model has no final norm")
        centre = self.cfg.normalization_type.startswith("LN")
        return norm_affine(self._module(self.family.ln_final), self.cfg.d_model, centre)

    # -- circuits -------------------------------------------------------------------------
    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per layer and head: ``[n_layers, n_heads, d_model, d_model]``, factored."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K.T`` per layer and head: ``[n_layers, n_heads, d_model, d_model]``, factored
        (before rotary: with rotary positions this is the content-only bilinear form)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))


def latent_problem(family: str, L: int, w: str) -> str:
    """Why block ``L`` has no ``W_{w}``: its attention input is not one linear map of the residual."""
    return (f"W_{w.upper()} / b_{w.upper()} are undefined for {family} block {L}: multi-head latent attention "
            f"builds hook_{w} from a shared low-rank latent (a norm inside) and a separately rotated part, so no "
            f"single [d_model, d_head] matrix gives it. Use the HF projections (e.g. kv_b_proj) directly, "
            f"or the hook_q / hook_k / hook_v sites.")


def _or_zeros(b: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    return b if b is not None else torch.zeros(n, dtype=like.dtype, device=like.device)
