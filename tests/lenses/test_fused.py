"""The fused, chunked unembedding KL and the trainer built on it, against plain autograd references."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fxlens.lenses import LogitLens, TokenChunks, TrainConfig, TunedLens, Unembed, evaluate, train_lens
from fxlens.lenses.fused import FusedUnembed, supported
from tests.conftest import VOCAB, traced

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "lens_train.py"


def _eager_train():
    """The benchmark's plain trainer: HF ``output_hidden_states`` + autograd ``log_softmax`` KL per layer."""
    spec = importlib.util.spec_from_file_location("lens_train_bench", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.eager_train


def _chunks(n=24, seq=12, seed=0) -> TokenChunks:
    g = torch.Generator().manual_seed(seed)
    return TokenChunks(torch.randint(3, VOCAB, (n, seq), generator=g), torch.full((n,), 4 * (seq - 1)), ["random"])


def _translators(lens):
    return [p.detach().clone() for p in lens.layer_translators.parameters()]


def _unembed_with_bias_and_scale(family="llama") -> Unembed:
    u = Unembed(traced(family))
    g = torch.Generator().manual_seed(3)
    u.bias = 0.3 * torch.randn(u.d_vocab, generator=g)
    u.logit_scale = 0.7
    return u


@pytest.mark.parametrize("rows", [5, 256])
def test_fused_kl_and_gradient_match_autograd(rows):
    u = _unembed_with_bias_and_scale()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, u.d_model, generator=g, requires_grad=True)
    final = 2 * torch.randn(13, u.d_vocab, generator=g)
    logq = final.log_softmax(-1)
    ref = (logq.exp() * (logq - u.logits_from_normalized(x).log_softmax(-1))).sum(-1)
    (want,) = torch.autograd.grad(ref.sum(), x)
    fused = FusedUnembed(u, rows=rows)
    kl, grad = fused.kl(x, fused.target(final), grad=True)
    assert torch.allclose(kl, ref, atol=1e-5)
    assert torch.allclose(grad, want, atol=1e-5)
    lse, none = fused.logsumexp(x)
    assert none is None and torch.allclose(lse, torch.logsumexp(u.logits_from_normalized(x), -1), atol=1e-5)
    ids = torch.arange(13) * 7
    assert torch.allclose(fused.token_logits(x, ids), u.logits_from_normalized(x).gather(-1, ids[:, None])[:, 0],
                          atol=1e-5)
    # bf16 matmuls: close, not equal
    kl16, grad16 = FusedUnembed(u, bf16=True, rows=rows).kl(x, fused.target(final), grad=True)
    assert torch.allclose(kl16, ref, atol=0.05) and not torch.equal(kl16, kl)
    assert torch.allclose(grad16, want, atol=0.02)


def test_softcapped_logits_are_refused():
    u = Unembed(traced("gemma2"))
    assert u.softcap and not supported(u)
    with pytest.raises(ValueError, match="soft-capped"):
        FusedUnembed(u)


def test_transform_layers_equals_each_layer():
    m = traced("llama")
    tl = TunedLens(m)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tl.layer_translators.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    hs = torch.randn(m.cfg.n_layers, 2, 3, m.cfg.d_model, generator=g)
    want = torch.stack([tl.transform_hidden(hs[i], i) for i in range(m.cfg.n_layers)])
    assert torch.allclose(tl.transform_layers(hs), want, atol=1e-6)
    with pytest.raises(ValueError, match="stacked"):
        tl.transform_layers(hs[:1])


# gpt2 / opt: LayerNorm final norms (opt with a projection after it); gemma2: the soft-cap autograd path
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_trainer_gives_the_eager_reference_lens(family):
    m = traced(family)
    cfg = TrainConfig(steps=6, batch_size=4, micro_batch=2, progress=False, unembed_rows=7)
    ours = train_lens(m, _chunks(), cfg)
    ref = TunedLens(m)
    _eager_train()(m.hf_model, ref, _chunks(), cfg)
    a, b = _translators(ours.lens), _translators(ref)
    scale = max(float(x.abs().max()) for x in a)
    assert scale > 1e-3  # the lens moved
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=0, atol=1e-4 * scale)


def test_bf16_lens_is_within_002_bits_per_byte_of_fp32():
    m = traced("llama")
    cfg = dict(steps=8, batch_size=4, micro_batch=2, progress=False)
    fp32 = train_lens(m, _chunks(), TrainConfig(**cfg)).lens
    bf16 = train_lens(m, _chunks(), TrainConfig(**cfg, bf16_unembed=True)).lens
    assert not torch.equal(_translators(fp32)[0], _translators(bf16)[0])
    held = _chunks(8, 12, seed=5)
    ev = evaluate(m, held, {"fp32": fp32, "bf16": bf16, "logit": LogitLens(m)}, progress=False)
    bpb = ev.metrics
    for a, b in zip(bpb["fp32"]["bits_per_byte"], bpb["bf16"]["bits_per_byte"]):
        assert abs(a - b) < 0.02
    # bf16 evaluation of the same lenses agrees with float32 evaluation
    ev16 = evaluate(m, held, {"fp32": fp32, "logit": LogitLens(m)}, progress=False, bf16_unembed=True)
    for name in ("fp32", "logit"):
        for a, b in zip(bpb[name]["bits_per_byte"], ev16.metrics[name]["bits_per_byte"]):
            assert abs(a - b) < 0.01


def test_evaluate_matches_log_softmax_reference():
    m = traced("gpt2")
    held = _chunks(4, 10, seed=2)
    lens = LogitLens(m)
    ev = evaluate(m, held, {"logit": lens}, progress=False)
    out = m.hf_model(input_ids=held.tokens, output_hidden_states=True)
    tgt = held.tokens[:, 1:].reshape(-1)
    logq = out.logits[:, :-1].flatten(0, 1).log_softmax(-1)
    for i, h in enumerate(out.hidden_states[:-1]):
        logp = lens.unembed(h[:, :-1]).flatten(0, 1).log_softmax(-1)
        ce = -logp.gather(-1, tgt[:, None]).mean()
        kl = (logq.exp() * (logq - logp)).sum(-1).mean()
        assert abs(ev.metrics["logit"]["ce"][i] - float(ce)) < 1e-5
        assert abs(ev.metrics["logit"]["kl"][i] - float(kl)) < 1e-5


def test_resume_refuses_other_precision_and_reads_older_checkpoints(tmp_path):
    m = traced("llama")
    cfg = dict(steps=2, batch_size=4, micro_batch=2, progress=False, checkpoint_every=1)
    train_lens(m, _chunks(), TrainConfig(**cfg), out=tmp_path)
    with pytest.raises(ValueError, match="bf16_unembed"):
        train_lens(m, _chunks(), TrainConfig(**cfg, bf16_unembed=True), out=tmp_path, resume=True)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["config"]["bf16_unembed"]  # written before the field existed
    torch.save(state, tmp_path / "checkpoint.pt")
    assert train_lens(m, _chunks(), TrainConfig(**cfg), out=tmp_path, resume=True).steps_run == 0


def test_training_after_grad_was_switched_off_globally():
    """A ported TL notebook starts with ``torch.set_grad_enabled(False)``: training still trains (and restores it)."""
    m = traced("llama")
    cfg = dict(steps=3, batch_size=4, micro_batch=2, progress=False, unembed_rows=7)
    want = _translators(train_lens(m, _chunks(), TrainConfig(**cfg)).lens)
    torch.set_grad_enabled(False)
    try:
        got = _translators(train_lens(m, _chunks(), TrainConfig(**cfg)).lens)
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
