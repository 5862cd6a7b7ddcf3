"""Which HF models fxlens can instrument: refuse the others before capture, with the reason.

One function, :func:`unsupported_reason`, so that support for a new kind of model (hybrids, say)
is added by relaxing one check here.
"""

from __future__ import annotations

from torch import nn

#: Parameters that only state-space / linear-recurrence mixers have (Mamba's ``A_log``, RWKV's
#: ``time_decay``); an attention layer has neither.
_SSM_PARAMS = ("A_log", "time_decay")


class UnsupportedModelError(ValueError):
    """The model is of a kind fxlens cannot instrument (the message says which and why)."""


def _is_ssm(module: nn.Module) -> bool:
    return any(name in _SSM_PARAMS for name, _ in module.named_parameters(recurse=False))


def unsupported_reason(hf_model: nn.Module) -> str | None:
    """Why fxlens cannot place TransformerLens sites in ``hf_model``, or ``None`` when it can.

    Looks at the model's structure, not its name: encoder-decoder stacks (T5, BART) and models with
    state-space layers (Mamba, RWKV; hybrids such as Jamba) are refused.
    """
    config = getattr(hf_model, "config", None)
    text = getattr(config, "text_config", None) or config
    kind = getattr(text, "model_type", type(hf_model).__name__)
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        return (f"unsupported: encoder-decoder models ({kind}) have two stacks joined by cross-attention, which "
                "TransformerLens' site names do not describe; use a decoder-only or encoder-only model")
    ssm = sorted({type(m).__name__ for m in hf_model.modules() if _is_ssm(m)})
    if ssm:
        attention = any("attention" in type(m).__name__.lower() and not _is_ssm(m) for m in hf_model.modules())
        what = "hybrid model: its" if attention else "its"
        return (f"unsupported: state-space layers have no attention sites ({kind}: {what} {', '.join(ssm)} "
                "layers are recurrences, not attention); fxlens instruments transformers only")
    return None


__all__ = ["UnsupportedModelError", "unsupported_reason"]
