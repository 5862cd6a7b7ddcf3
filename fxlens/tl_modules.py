"""TransformerLens' module tree as views: ``model.blocks[3].attn.W_Q``, ``model.embed.W_E``, ``model.ln_final.w``.

fxlens has no wrapper modules; these small objects index the stacked weight properties of
:class:`~fxlens.interventions.weights.WeightsMixin` (``model.W_Q[3]``), which read the HF parameters,
and give the norms TransformerLens' ``w`` / ``b``. Plus the few model methods a TL port calls on them
(``accumulated_bias``, ``tokens_to_residual_directions``, ``all_composition_scores``, ``loss_fn``,
``set_use_*``), mixed into :class:`~fxlens.HookedModel`.
"""

from __future__ import annotations

import torch

from .interventions.weights import norm_affine
from .tl_params import tl_named_parameters


class _Slice:
    """``getattr(view, name) == getattr(model, name)[index]`` for the names it serves."""

    def __init__(self, model, index, names: tuple[str, ...], label: str):
        self._model, self._index, self._names, self._label = model, index, names, label

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self._names:
            raise AttributeError(f"{self._label} has no {name!r}; it has {list(self._names)}")
        value = getattr(self._model, name)
        return value if self._index is None else value[self._index]

    def __repr__(self) -> str:
        return f"<{self._label}: {', '.join(self._names)}>"


class _Norm:
    """A norm's elementwise affine map ``x_hat * w + b`` (TL's ``LayerNorm.w`` / ``.b``)."""

    def __init__(self, model, path: str | None, label: str):
        self._model, self._path, self._label = model, path, label

    @property
    def exists(self) -> bool:
        """Whether the model has this norm (post-norm or norm-free blocks may not)."""
        return self._path is not None

    def _affine(self):
        if self._path is None:
            raise AttributeError(f"this model has no {self._label}")
        m = self._model
        return norm_affine(m.hf_model.get_submodule(self._path), m.cfg.d_model,
                           m.cfg.normalization_type.startswith("LN"))

    @property
    def w(self) -> torch.Tensor:
        return self._affine()[0]

    @property
    def b(self) -> torch.Tensor:
        return self._affine()[1]


class _Block:
    def __init__(self, model, L: int):
        fam = model.family
        attn = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "OV", "QK", "W_K_kv", "W_V_kv")
        mlp = ("W_in", "b_in", "W_out", "b_out") + (("W_gate", "b_gate") if fam.gated else ())
        self.attn = _Slice(model, L, attn, f"blocks[{L}].attn")
        self.mlp = _Slice(model, L, mlp, f"blocks[{L}].mlp")
        self.ln1 = _Norm(model, fam.block(L, fam.ln1) if fam.ln1 else None, f"blocks[{L}].ln1")
        self.ln2 = _Norm(model, fam.block(L, fam.ln2) if fam.ln2 else None, f"blocks[{L}].ln2")


def _fro2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a @ b||_F^2`` per leading index, from the small Gram matrices."""
    return torch.einsum("...ij,...ji->...", a.transpose(-1, -2) @ a, b @ b.transpose(-1, -2))


def _composition(a1, b1, a2, b2) -> torch.Tensor:
    """``||(A1 B1)(A2 B2)||_F / ||A1 B1||_F / ||A2 B2||_F`` for every pair of heads ``[L, H, L, H]``,
    without forming any ``d_model x d_model`` matrix."""
    x = torch.einsum("lhij,mgjk->lhmgik", b1, a2)  # [L, H, L, H, r, r]
    ga, gb = a1.transpose(-1, -2) @ a1, b2 @ b2.transpose(-1, -2)
    prod = torch.einsum("lhab,lhmgbc,mgcd,lhmgad->lhmg", ga, x, gb, x)
    return prod.clamp(min=0).sqrt() / _fro2(a1, b1).sqrt()[:, :, None, None] / _fro2(a2, b2).sqrt()[None, None]


class TLModulesMixin:
    """``blocks``, ``embed``, ``pos_embed``, ``unembed``, ``ln_final`` and TL's helper methods."""

    @property
    def blocks(self) -> list[_Block]:
        return [_Block(self, L) for L in range(self.cfg.n_layers)]

    @property
    def embed(self) -> _Slice:
        return _Slice(self, None, ("W_E",), "embed")

    @property
    def pos_embed(self) -> _Slice:
        return _Slice(self, None, ("W_pos",), "pos_embed")

    @property
    def unembed(self) -> _Slice:
        return _Slice(self, None, ("W_U", "b_U"), "unembed")

    @property
    def ln_final(self) -> _Norm:
        return _Norm(self, self.family.ln_final, "ln_final")

    # -- parameters, as nn.Module users expect -----------------------------------------
    def parameters(self, recurse: bool = True):
        """The HF model's parameters (the leaves an optimiser or ``requires_grad_`` loop needs)."""
        return self.hf_model.parameters(recurse)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """TransformerLens' names and shapes (``blocks.0.attn.W_Q [n_heads, d_model, d_head]``,
        ``embed.W_E``, ``unembed.W_U``); see :mod:`fxlens.tl_params`. The HF names are
        ``model.hf_model.named_parameters()``."""
        pre = f"{prefix}." if prefix else ""
        return ((pre + n, p) for n, p in tl_named_parameters(self))

    def state_dict(self, *args, **kwargs):
        return self.hf_model.state_dict(*args, **kwargs)

    def eval(self):
        self.hf_model.eval()
        return self

    def set_tokenizer(self, tokenizer, default_padding_side: str | None = None) -> None:
        if default_padding_side is not None:
            tokenizer.padding_side = default_padding_side
        self.tokenizer = tokenizer

    # -- TransformerLens helper methods ---------------------------------------------
    def loss_fn(self, logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        """Next-token cross-entropy of ``logits`` for ``tokens`` (TL's ``loss_fn``)."""
        from .loss import lm_loss

        return lm_loss(logits, tokens, attention_mask, per_token=per_token)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """``[d_model]``: the biases written to the residual stream before block ``layer``
        (and its attention's, with ``mlp_input``), as TransformerLens computes it."""
        total = torch.zeros(self.cfg.d_model, dtype=self.cfg.dtype, device=self.device)
        for L in range(layer):
            total = total + self.b_O[L] + (self.b_out[L] if include_mlp_biases else 0)
        if mlp_input:
            total = total + self.b_O[layer]
        return total

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """Unembedding direction(s) ``W_U[:, token]``: ``[d_model]`` for one token, ``[n, d_model]`` for many."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        t = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, t].movedim(0, -1)

    def all_composition_scores(self, mode: str) -> torch.Tensor:
        """``[n_layers, n_heads, n_layers, n_heads]`` Q/K/V composition scores (zero unless the first
        head's layer is earlier), as TransformerLens' ``all_composition_scores``."""
        if mode not in ("Q", "K", "V"):
            raise ValueError(f"mode must be 'Q', 'K' or 'V', not {mode!r}")
        ov, qk = self.OV, self.QK
        right = {"Q": qk, "K": qk.T, "V": ov}[mode]
        scores = _composition(ov.A, ov.B, right.A, right.B)
        n = self.cfg.n_layers
        keep = torch.arange(n)[:, None, None, None] < torch.arange(n)[None, None, :, None]
        return torch.where(keep.to(scores.device), scores, torch.zeros_like(scores))

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """TL's flag: caching every site (``names_filter=None``) then includes ``attn.hook_result``."""
        self.cfg.use_attn_result = use_attn_result

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """TL's flag: list and match ``hook_{q,k,v}_input`` (they always work by full name)."""
        self.cfg.use_split_qkv_input = use_split_qkv_input
        self.use_split_inputs = use_split_qkv_input

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """TL's flag; ``hook_mlp_in`` is always available in fxlens."""
        self.cfg.use_hook_mlp_in = use_hook_mlp_in
