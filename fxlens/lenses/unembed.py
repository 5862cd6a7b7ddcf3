"""``Unembed``: the model's own final norm + unembedding, frozen, as a module lenses decode through."""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn


class Unembed(nn.Module):
    """Map residual-stream vectors to logits exactly as the model maps its last residual.

    ``logits = softcap(scale * (W · post(norm(h)) + b))`` where ``norm`` is the model's final
    norm (found through the family rule), ``post`` an optional projection after it (OPT's
    ``project_out``), ``W``/``b`` the HF output embedding, and ``scale`` / ``softcap`` the
    config's logit scaling (Cohere ``logit_scale``, Granite ``logits_scaling``, Gemma 2/3
    ``final_logit_softcapping``). Applied to the last block's ``hook_resid_post`` it reproduces
    the model's logits.

    The norm is a frozen copy; the unembedding weight is a frozen, non-persistent view of the
    model's own tensor (no copy, never trained, not part of ``state_dict``).

    Args:
        model: a traced :class:`fxlens.HookedModel` of a causal LM.
    """

    def __init__(self, model):
        super().__init__()
        hf, family = model.hf_model, model.family
        if family.ln_final is None:
            raise ValueError(f"{model.cfg.family} models have no final norm: lenses need a causal LM "
                             "(load it with AutoModelForCausalLM / fxlens.from_pretrained)")
        head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            raise ValueError(f"lenses need an nn.Linear output embedding (lm_head); this model has "
                             f"{type(head).__name__}. Load the *ForCausalLM class of the model.")
        self.final_norm = copy.deepcopy(hf.get_submodule(family.ln_final))
        post = None
        if family.name == "opt":
            post = getattr(hf.get_submodule("model.decoder"), "project_out", None)
        self.post_norm = copy.deepcopy(post) if post is not None else None
        self.register_buffer("weight", head.weight.detach(), persistent=False)
        self.register_buffer("bias", head.bias.detach() if head.bias is not None else None, persistent=False)
        config = getattr(hf.config, "text_config", None) or hf.config
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        scaling = getattr(config, "logits_scaling", None)
        self.logit_scale = scale / float(scaling) if scaling else scale
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.requires_grad_(False)

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[1] if self.post_norm is None else self.post_norm.in_features)

    @property
    def d_vocab(self) -> int:
        return int(self.weight.shape[0])

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm (and projection): ``[..., d_model]`` -> what the unembedding reads."""
        x = self.final_norm(h.to(self.weight.device))
        return self.post_norm(x) if self.post_norm is not None else x

    def logits_from_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Unembed an already normalised vector ``[..., d]`` -> ``[..., d_vocab]``."""
        z = nn.functional.linear(x, self.weight, self.bias)
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Residual ``[..., d_model]`` -> logits ``[..., d_vocab]``."""
        return self.logits_from_normalized(self.normalize(h))

    def unembedding_hash(self) -> str:
        """tuned-lens' hash of the unembedding (``sha256(np.array_str(W, precision=1))`` of the float32
        ``[d_vocab, d_model]`` matrix), so lenses move between the two libraries without false alarms."""
        import numpy as np

        w = self.weight.detach().to("cpu", torch.float32).numpy()
        return hashlib.sha256(np.array_str(w, precision=1).encode()).hexdigest()

    def legacy_hash(self) -> str:
        """The hash fxlens wrote before (SHA-256 of the float32 bytes), still accepted on load."""
        w = self.weight.detach().to("cpu", torch.float32).contiguous()
        return hashlib.sha256(w.numpy().tobytes()).hexdigest()
