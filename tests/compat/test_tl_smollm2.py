"""TL analysis idioms on SmolLM2 (slow): DLA sums equal the HF model's logit difference, layer=-1 means ln_final."""

from __future__ import annotations

import pytest
import torch

import fxlens
from fxlens.interventions import analysis as A

pytestmark = pytest.mark.slow
IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def smol():
    return fxlens.from_pretrained(fxlens.offline_model_path("smollm2"))


def test_logit_attrs_scale_the_stack_on_smollm2(smol):
    m = smol
    ids = m.to_tokens(IOI)
    _, cache = m.run_with_cache(ids)
    with torch.no_grad():
        last = m.hf_model(ids).logits[0, -1]
    mary, john = m.to_single_token(" Mary"), m.to_single_token(" John")
    diff = (last[mary] - last[john]).item()
    bias = A.logit_bias_terms(m, mary, john).item()
    for stack in (cache.decompose_resid(pos_slice=-1), cache.get_full_resid_decomposition(pos_slice=-1),
                  cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=False),
                  cache.accumulated_resid(pos_slice=-1)[-1:]):
        attrs = cache.logit_attrs(stack, " Mary", " John", pos_slice=-1)
        assert abs(attrs.sum().item() + bias - diff) < 1e-3 * max(1.0, abs(diff))
    unscaled = A.scaled_logit_attrs(m, cache.decompose_resid(pos_slice=-1), mary, john).sum().item()
    assert abs(unscaled - diff) > 10 * abs(diff)  # what the old call gave on an unscaled stack: far off
    n = m.cfg.n_layers
    final = cache["resid_post", -1][None]
    norm = m.hf_model.get_submodule(m.family.ln_final)
    torch.testing.assert_close(cache.apply_ln_to_stack(final, layer=-1)[0] * norm.weight, norm(final[0]),
                               atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cache.apply_ln_to_stack(final, layer=-1), cache.apply_ln_to_stack(final, layer=n - 1))
    assert cache.stack_head_results(-1).shape[0] == n * m.cfg.n_heads
    print(f"SmolLM2 IOI: logit diff {diff:.4f}; DLA sum {attrs.sum().item() + bias:.4f}; "
          f"unscaled stack through the directions {unscaled:.1f}")
