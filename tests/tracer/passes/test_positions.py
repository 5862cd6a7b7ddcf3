"""``mask_positions``: learned positions come from the attention mask; outputs equal HF (and left padding
no longer shifts them)."""

from __future__ import annotations

import pytest
import torch

from fxlens.tracer.capture import capture
from fxlens.tracer.families import RULES
from fxlens.tracer.passes.positions import mask_positions, positions_from_mask, shift_by_padding
from tests.conftest import tiny_hf, tokens
from tests.tracer.passes.graphs import count, first

aten = torch.ops.aten


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_position_lookup_reads_the_mask(family):
    hf = tiny_hf(family)
    gm = capture(hf).gm
    pos_embed = RULES[hf.config.model_type].pos_embed
    lookup = next(n for n in gm.graph.nodes if n.target is aten.embedding.default and n.meta.get("nn_module_stack")
                  and list(n.meta["nn_module_stack"].values())[-1][0] == pos_embed)
    index = lookup.args[1]
    before = {n.name for n in gm.graph.nodes}
    assert count(gm.graph, shift_by_padding) == 0
    assert mask_positions(gm, pos_embed)
    after = {n.name for n in gm.graph.nodes}
    (new,) = after - before  # one node added, none removed: the model's own index (and offsets) is kept
    assert before <= after
    assert lookup.args[1].name == new and lookup.args[1].target is shift_by_padding
    assert lookup.args[1].args[0] is index and lookup.args[1].args[1].name == "attention_mask"
    assert not mask_positions(gm, pos_embed) and {n.name for n in gm.graph.nodes} == after  # already from the mask

    ids = tokens(2, 7)
    full = torch.ones_like(ids)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=full)
        ref = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
        assert torch.equal(first(gm(ids, full)), ref)
        if family == "gpt2":  # left padding: row 1's real tokens give the logits of the unpadded row
            mask = full.clone()
            mask[1, :3] = 0
            padded = first(gm(ids, mask))
            alone = hf(input_ids=ids[1:, 3:], attention_mask=full[1:, 3:]).logits
            assert (padded[1, 3:] - alone[0]).abs().max().item() <= 1e-5
            assert torch.equal(positions_from_mask(mask)[1], torch.tensor([0, 0, 0, 0, 1, 2, 3]))
