"""Logit lens, tuned lens, Unembed, KL loss, save/load (both formats) on tiny random models."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch

from fxlens.lenses import LogitLens, TunedLens, Unembed, load_lens, residual_stream, save_lens
from fxlens.lenses.io import read_lens
from fxlens.lenses.train import kl_to_target
from fxlens.lenses.tuned_lens import TunedLensConfig
from tests.conftest import FAMILIES, tokens, traced

CAUSAL = [f for f in FAMILIES if f not in ("bert", "roberta")]


@pytest.mark.parametrize("family", CAUSAL)
def test_unembed_reproduces_model_logits(family):
    m = traced(family)
    logits, stream = residual_stream(m, tokens(2, 7))
    assert len(stream) == m.cfg.n_layers + 1
    out = Unembed(m)(stream[-1])
    assert torch.equal(out, logits), (out - logits).abs().max()


def test_gemma2_softcap_is_applied():
    m = traced("gemma2")
    u = Unembed(m)
    assert u.softcap == m.hf_model.config.final_logit_softcapping
    _, stream = residual_stream(m, tokens(1, 5))
    x = u.normalize(stream[-1])
    raw = torch.nn.functional.linear(x, u.weight)
    assert not torch.equal(raw, u(stream[-1]))  # the cap changes the logits
    assert torch.equal(torch.tanh(raw / u.softcap) * u.softcap, u(stream[-1]))


def test_unembed_is_frozen_and_shares_weights():
    m = traced("llama")
    u = Unembed(m)
    assert not any(p.requires_grad for p in u.parameters())
    assert u.weight.data_ptr() == m.hf_model.get_output_embeddings().weight.data_ptr()
    assert "weight" not in u.state_dict()


def test_encoder_has_no_lens():
    with pytest.raises(ValueError, match="no final norm"):
        Unembed(traced("bert"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_logit_lens_last_layer_is_model_and_zero_tuned_lens_is_logit_lens(family):
    m = traced(family)
    logits, stream = residual_stream(m, tokens(2, 6))
    ll, tl = LogitLens(m), TunedLens(m)
    n = m.cfg.n_layers
    assert torch.equal(ll(stream[n], n), logits)
    assert torch.equal(tl(stream[n], n), logits)
    for i in range(n + 1):
        assert torch.equal(tl(stream[i], i), ll(stream[i], i))
    assert not torch.equal(ll(stream[0], 0), logits)
    with pytest.raises(IndexError):
        ll(stream[0], n + 1)


def test_tuned_lens_translator_is_residual_affine():
    m = traced("llama")
    tl = TunedLens(m)
    with torch.no_grad():
        tl[1].weight.copy_(0.1 * torch.randn_like(tl[1].weight))
        tl[1].bias.copy_(torch.randn_like(tl[1].bias))
    h = torch.randn(2, 3, m.cfg.d_model)
    want = h + h @ tl[1].weight.T + tl[1].bias
    assert torch.allclose(tl.transform_hidden(h, 1), want, atol=1e-6)
    assert torch.equal(tl(h, 1), Unembed(m)(tl.transform_hidden(h, 1)))
    assert torch.equal(tl.transform_hidden(h, 0), h)  # other layers untouched


def test_fused_kl_matches_autograd_kl():
    torch.manual_seed(0)
    z = torch.randn(5, 40, requires_grad=True)
    target = torch.randn(5, 40)
    logp = target.log_softmax(-1)
    p, neg_h = logp.exp(), (logp.exp() * logp).sum(-1)
    ours = kl_to_target(z, p, neg_h)
    ref = (p * (logp - z.log_softmax(-1))).sum(-1)
    assert torch.allclose(ours, ref, atol=1e-6)
    w = torch.randn(5)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), z)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), z)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)
    assert torch.allclose(kl_to_target(target, p, neg_h), torch.zeros(5), atol=1e-6)


def _random_lens(m, seed=0) -> TunedLens:
    tl = TunedLens(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tl.layer_translators.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return tl


@pytest.mark.parametrize("fmt", ["fxlens", "tuned-lens"])
def test_save_load_round_trip(tmp_path, fmt):
    m = traced("llama")
    tl = _random_lens(m)
    save_lens(tl, tmp_path / "lens", format=fmt)
    files = sorted(p.name for p in (tmp_path / "lens").iterdir())
    assert files == (["config.json", "params.safetensors"] if fmt == "fxlens" else ["config.json", "params.pt"])
    back = load_lens(m, tmp_path / "lens")
    for a, b in zip(tl.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    h = torch.randn(1, 4, m.cfg.d_model)
    assert torch.equal(tl(h, 1), back(h, 1))
    assert back.config == tl.config


def test_tuned_lens_package_layout(tmp_path):
    """The tuned-lens format: config.json with its fields, params.pt = layer_translators.state_dict()."""
    m = traced("llama")
    tl = _random_lens(m, seed=3)
    tl.save(tmp_path, format="tuned-lens")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["lens_type"] == "linear_tuned_lens" and cfg["num_hidden_layers"] == m.cfg.n_layers
    assert cfg["d_model"] == m.cfg.d_model and cfg["bias"] is True and len(cfg["unembed_hash"]) == 64
    state = torch.load(tmp_path / "params.pt", weights_only=True)
    assert sorted(state) == sorted(f"{i}.{k}" for i in range(m.cfg.n_layers) for k in ("weight", "bias"))
    # A file written by the tuned-lens package: same layout, plus an unknown config key.
    cfg["some_future_key"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="some_future_key"):
        back = TunedLens.from_pretrained(m, tmp_path)
    assert torch.equal(back[1].weight, tl[1].weight)


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_refused(tmp_path):
    m = traced("llama")
    TunedLens(m).save(tmp_path, format="tuned-lens")
    with open(tmp_path / "params.pt", "wb") as f:
        pickle.dump({"0.weight": _Evil()}, f)
    with pytest.raises(ValueError, match="weights_only"):
        load_lens(m, tmp_path)


def test_wrong_model_or_hash(tmp_path):
    m, other = traced("llama"), traced("gpt2")
    TunedLens(m).save(tmp_path)
    with pytest.raises(ValueError, match="layers x d_model|d_model"):
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["d_model"] = 99
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        load_lens(m, tmp_path)
    tl = TunedLens(other)
    tl.config.unembed_hash = "0" * 64
    tl.save(tmp_path / "b")
    with pytest.warns(UserWarning, match="different unembedding"):
        load_lens(other, tmp_path / "b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_lens(m, _save(TunedLens(m), tmp_path / "c"))  # matching hash: no warning


def _save(lens, path):
    lens.save(path)
    return path


def test_config_rejects_other_lens_types():
    with pytest.raises(ValueError, match="lens_type"):
        TunedLensConfig.from_dict({"base_model_name_or_path": "x", "d_model": 4, "num_hidden_layers": 2,
                                   "lens_type": "rank_one"})
    with pytest.raises(ValueError, match="d_model"):
        TunedLensConfig.from_dict({"base_model_name_or_path": "x", "num_hidden_layers": 2})
    assert read_lens  # re-exported helper exists
