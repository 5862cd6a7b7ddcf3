"""Learned absolute positions from the attention mask, so left padding does not shift them.

HF's forward numbers positions ``0..pos-1`` whatever the mask says, so a left-padded row of
GPT-2 reads the wrong position embeddings (its real tokens start at position ``n_pad``);
TransformerLens and HF ``generate`` count positions from the first real token instead. This
pass shifts the position-embedding lookup's index by ``cumsum(mask) - 1 - arange(pos)`` (clamped at 0):
on unpadded and right-padded input the shift is 0 for every real token, so the index the model
computed is kept, offsets included (BioGPT's and mBART's ``+ 2`` rows).
"""

from __future__ import annotations

import torch
from torch import fx

from ..graph import ancestors, module_path

aten = torch.ops.aten


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[batch, pos]`` position of each token counted from the row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def shift_by_padding(index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``index`` (``[batch or 1, pos]``) shifted back by each row's left padding."""
    return index + (positions_from_mask(mask) - torch.arange(mask.shape[-1], device=mask.device))


def mask_positions(gm: fx.GraphModule, pos_embed: str | None) -> bool:
    """Make the embedding lookup of module ``pos_embed`` read mask-derived positions, in place.

    Returns whether the graph changed (not when the positions already come from the mask, as in OPT).
    """
    if pos_embed is None:
        return False
    graph = gm.graph
    mask = next((n for n in graph.nodes if n.op == "placeholder" and n.name == "attention_mask"), None)
    lookups = [n for n in graph.nodes if n.target is aten.embedding.default and module_path(n) == pos_embed]
    if mask is None or len(lookups) != 1:
        return False
    (lookup,) = lookups
    if mask in ancestors(lookup.args[1], values_only=True):
        return False
    with graph.inserting_before(lookup):
        pos = graph.call_function(shift_by_padding, (lookup.args[1], mask))
    pos.meta = dict(lookup.args[1].meta)
    pos.meta.pop("val", None)
    lookup.args = (lookup.args[0], pos, *lookup.args[2:])
    graph.eliminate_dead_code()
    gm.recompile()
    return True
