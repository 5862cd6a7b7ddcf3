"""``HookedTransformer``: TransformerLens' entry point and defaults over fxlens' graph.

``HookedTransformer.from_pretrained(name_or_path, ...)`` takes TransformerLens' keywords with its
defaults: TL's weight processing (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
``fold_value_biases``) and a BOS token prepended to text (``default_prepend_bos=True``), so a
ported notebook sees TL's positions and numbers. ``from_pretrained_no_processing`` keeps the HF
weights. The plain :func:`fxlens.from_pretrained` keeps the HF model as is and the tokenizer's own
special-token behaviour.
"""

from __future__ import annotations

import warnings

import torch

from .model import HookedModel

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
_REFUSED = ("refactor_factored_attn_matrices", "checkpoint_index", "checkpoint_value", "first_n_layers")


class HookedTransformer(HookedModel):
    """A :class:`~fxlens.HookedModel` made the TransformerLens way (see the module docstring)."""

    @classmethod
    def from_pretrained(cls, model_name: str, fold_ln: bool = True, center_writing_weights: bool = True,
                        center_unembed: bool = True, fold_value_biases: bool = True, hf_model=None, tokenizer=None,
                        device: str | torch.device | None = None, n_devices: int = 1, move_to_device: bool = True,
                        default_prepend_bos: bool | None = None, default_padding_side: str = "right",
                        dtype: str | torch.dtype = "float32", compile: bool = False, **kwargs) -> HookedTransformer:
        """Load (or wrap ``hf_model``) and process the weights as TransformerLens does.

        ``center_writing_weights`` applies to LayerNorm models only (TL skips it for RMSNorm too).
        ``n_devices > 1`` is refused: fxlens places multi-GPU models with ``device_map`` instead.
        """
        import transformers

        from .loading import from_pretrained, trace

        bad = sorted(k for k in kwargs if k in _REFUSED and kwargs[k] not in (None, False))
        if bad:
            raise NotImplementedError(f"{bad} are not supported by fxlens' HookedTransformer")
        kwargs = {k: v for k, v in kwargs.items() if k not in _REFUSED}
        if n_devices != 1:
            raise NotImplementedError("n_devices > 1: load with device_map= (accelerate) via fxlens.from_pretrained")
        dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        device = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        if hf_model is not None:
            if move_to_device:
                hf_model = hf_model.to(device=device, dtype=dtype)
            if tokenizer is None:
                try:
                    tokenizer = transformers.AutoTokenizer.from_pretrained(model_name)
                except (OSError, ValueError) as e:
                    warnings.warn(f"no tokenizer for {model_name!r} ({e}); the model takes token ids only",
                                  stacklevel=2)
            model = trace(hf_model, tokenizer, compile=compile, model_class=cls)
        else:
            model = from_pretrained(model_name, dtype=dtype, device=device, compile=compile, model_class=cls,
                                    **kwargs)
            if tokenizer is not None:
                model.tokenizer = tokenizer
        if model.tokenizer is not None:
            model.tokenizer.padding_side = default_padding_side
        if fold_ln or center_writing_weights or center_unembed or fold_value_biases:
            layer_norm = model.cfg.normalization_type.startswith("LN")
            model = model.process_weights(fold_ln=fold_ln, center_writing_weights=center_writing_weights and layer_norm,
                                          center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        model.default_prepend_bos = True if default_prepend_bos is None else default_prepend_bos
        model.cfg.default_prepend_bos = model.default_prepend_bos
        return model

    @classmethod
    def from_pretrained_no_processing(cls, model_name: str, fold_ln: bool = False,
                                      center_writing_weights: bool = False, center_unembed: bool = False,
                                      fold_value_biases: bool = False, **kwargs) -> HookedTransformer:
        """``from_pretrained`` without weight processing (logits equal the HF model's)."""
        return cls.from_pretrained(model_name, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                   center_unembed=center_unembed, fold_value_biases=fold_value_biases, **kwargs)
