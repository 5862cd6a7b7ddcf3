"""Turn what a user passes to a forward into checked ``(input_ids, attention_mask)`` tensors."""

from __future__ import annotations

import torch


def _is_text(x: object) -> bool:
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(s, str) for s in x))


def _as_ids(x: object, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        ids = x
    elif isinstance(x, (list, tuple)):
        try:
            ids = torch.tensor(x)
        except (TypeError, ValueError) as e:
            raise TypeError("input must be a string, a list of strings, or token ids (a tensor or a list of "
                            f"ints / equal-length lists of ints); could not read {type(x).__name__}: {e}") from e
    else:
        raise TypeError(f"input must be a string, a list of strings, or token ids [batch, pos], "
                        f"not {type(x).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, not {ids.dtype} (did you pass embeddings or a mask?)")
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    return ids.to(device=device, dtype=torch.long)


def _check_mask(mask: object, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(mask, (list, tuple)):
        mask = torch.tensor(mask)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor [batch, pos] of 0/1, not {type(mask).__name__}")
    mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the tokens have shape "
                         f"{tuple(ids.shape)}: give one 0/1 entry per token")
    if mask.dtype.is_floating_point and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold 0/1 values (1 = attend), not an additive float mask")
    return mask.to(ids.device, torch.long)


def model_inputs(model, input, attention_mask=None, prepend_bos: bool | None = None,
                 padding_side: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [batch, pos], mask [batch, pos])`` for ``input``, checked against the model.

    Text is tokenised here (with its own padding mask, never one left over from another call);
    token ids are checked to be inside the vocabulary and to fit the context.
    """
    if input is None:
        raise TypeError("input is None: give a string, a list of strings or token ids [batch, pos]")
    if isinstance(input, (bytes, bytearray)):
        raise TypeError("input is bytes: decode it to str first (e.g. data.decode('utf-8'))")
    if _is_text(input):
        ids, mask = model.to_tokens_and_mask(list(input) if isinstance(input, tuple) else input,
                                             prepend_bos=prepend_bos, padding_side=padding_side)
    else:
        ids = _as_ids(input, model.device)
        mask = None
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"empty or malformed input: token tensor of shape {tuple(ids.shape)}; expected [batch, pos]")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= model.cfg.d_vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside this model's vocabulary (0..{model.cfg.d_vocab - 1})")
    if model.cfg.n_ctx and ids.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"input has {ids.shape[1]} tokens; this model's context is {model.cfg.n_ctx}. "
                         "Truncate the input (to_tokens(..., truncate=True)) or split it into chunks.")
    if attention_mask is not None:
        mask = _check_mask(attention_mask, ids)
    elif mask is None:
        mask = torch.ones_like(ids)
    return ids, mask
