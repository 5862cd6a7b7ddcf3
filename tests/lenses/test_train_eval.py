"""Tuned-lens training (determinism, resume after a kill), evaluation, trajectories, data, plots."""

from __future__ import annotations

import math

import pytest
import torch

from fxlens.lenses import (
    LensEval,
    LogitLens,
    PredictionTrajectory,
    TokenChunks,
    TrainConfig,
    TunedLens,
    austen_files,
    evaluate,
    load_lens,
    residual_stream,
    text_files,
    train_lens,
)
from fxlens.lenses.train import batch_indices
from fxlens.model import lm_loss
from tests.conftest import VOCAB, traced


def _chunks(n=24, seq=12, seed=0) -> TokenChunks:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(3, VOCAB, (n, seq), generator=g)
    return TokenChunks(toks, torch.full((n,), 4 * (seq - 1)), ["random"])


CFG = dict(steps=8, batch_size=4, micro_batch=2, checkpoint_every=3, progress=False)


def _params(lens):
    return [p.detach().clone() for p in lens.layer_translators.parameters()]


def test_training_lowers_kl_and_is_deterministic():
    m = traced("llama")
    a = train_lens(m, _chunks(), TrainConfig(**CFG))
    b = train_lens(m, _chunks(), TrainConfig(**CFG))
    for x, y in zip(_params(a.lens), _params(b.lens)):
        assert torch.equal(x, y)
    assert any(p.abs().sum() > 0 for p in _params(a.lens))
    assert len(a.losses) == 8 and len(a.losses[0]) == m.cfg.n_layers
    # the trained lens is closer to the final distribution than the logit lens on the training data
    ev = evaluate(m, _chunks(), {"logit": LogitLens(m), "tuned": a.lens}, progress=False)
    assert all(t < lg for t, lg in zip(ev.metrics["tuned"]["kl"][:-1], ev.metrics["logit"]["kl"][:-1]))
    c = train_lens(m, _chunks(), TrainConfig(**{**CFG, "seed": 1}))
    assert not torch.equal(_params(c.lens)[0], _params(a.lens)[0])


def test_micro_batch_only_changes_summation_order():
    m = traced("llama")
    a = train_lens(m, _chunks(), TrainConfig(**CFG))
    b = train_lens(m, _chunks(), TrainConfig(**{**CFG, "micro_batch": 4}))
    for x, y in zip(_params(a.lens), _params(b.lens)):
        assert torch.allclose(x, y, atol=1e-5)


class _Killed(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    m = traced("llama")
    full = train_lens(m, _chunks(), TrainConfig(**CFG), out=tmp_path / "full")

    def kill(step, result):
        if step == 5:  # dies after step 5; the last checkpoint is step 3
            raise _Killed

    with pytest.raises(_Killed):
        train_lens(m, _chunks(), TrainConfig(**CFG), out=tmp_path / "run", callback=kill)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3
    steps = []
    res = train_lens(m, _chunks(), TrainConfig(**CFG), out=tmp_path / "run", resume=True,
                     callback=lambda s, r: steps.append(s))
    assert steps == [4, 5, 6, 7, 8] and res.steps_run == 5
    for x, y in zip(_params(full.lens), _params(res.lens)):
        assert torch.equal(x, y)
    assert res.losses == full.losses
    saved = load_lens(m, tmp_path / "run")
    for x, y in zip(_params(full.lens), _params(saved)):
        assert torch.equal(x, y)
    # resuming a finished run does nothing; other settings are refused
    again = train_lens(m, _chunks(), TrainConfig(**CFG), out=tmp_path / "run", resume=True)
    assert again.steps_run == 0
    with pytest.raises(ValueError, match="other settings"):
        train_lens(m, _chunks(), TrainConfig(**{**CFG, "lr": 0.5}), out=tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="other data"):
        train_lens(m, _chunks(seed=9), TrainConfig(**CFG), out=tmp_path / "run", resume=True)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    idx = torch.cat([batch_indices(s, 10, 5, seed=3) for s in range(2)])
    assert sorted(idx.tolist()) == list(range(10))
    assert torch.equal(batch_indices(1, 10, 5, 3), batch_indices(1, 10, 5, 3))
    assert not torch.equal(batch_indices(0, 10, 5, 3), batch_indices(0, 10, 5, 4))


def test_evaluate_metrics_are_consistent():
    m = traced("llama")
    ch = _chunks(6, 10)
    ev = evaluate(m, ch, {"logit": LogitLens(m), "zero tuned": TunedLens(m)}, micro_batch=4, progress=False)
    n = m.cfg.n_layers
    assert ev.layers == list(range(n + 1)) and ev.n_tokens == 6 * 9 and ev.n_bytes == 6 * 4 * 9
    assert ev.metrics["logit"] == ev.metrics["zero tuned"]  # zero-initialised tuned lens == logit lens
    lg = ev.metrics["logit"]
    final = float(lm_loss(m(ch.tokens), ch.tokens))
    assert math.isclose(lg["ce"][n], final, rel_tol=1e-5)
    assert lg["kl"][n] == 0.0
    for i in range(n + 1):
        assert math.isclose(lg["bits_per_byte"][i], lg["ce"][i] * ev.n_tokens / math.log(2) / ev.n_bytes, rel_tol=1e-9)
    # KL of layer 0 by hand
    logits, stream = residual_stream(m, ch.tokens, final=False)
    lq = logits[:, :-1].log_softmax(-1)
    lp = LogitLens(m)(stream[0][:, :-1], 0).log_softmax(-1)
    kl0 = (lq.exp() * (lq - lp)).sum(-1).mean()
    assert math.isclose(lg["kl"][0], float(kl0), rel_tol=1e-4)
    table = ev.markdown()
    assert table.count("\n") == n + 2 and f"{n} (output)" in table


def test_eval_json_round_trip(tmp_path):
    m = traced("llama")
    ev = evaluate(m, _chunks(4, 8), {"logit": LogitLens(m)}, progress=False)
    assert LensEval.load(ev.save(tmp_path / "e.json")) == ev


def test_prediction_trajectory():
    m = traced("llama")
    ids = _chunks(1, 9).tokens[0]
    tr = PredictionTrajectory.from_lens(m, LogitLens(m), ids)
    n = m.cfg.n_layers
    logits = m(ids[None])[0]
    assert tr.top_ids.shape == (n + 1, 9)
    assert torch.equal(tr.top_ids[n], logits.argmax(-1))
    assert torch.allclose(tr.top_probs[n], logits.softmax(-1).max(-1).values, atol=1e-6)
    assert torch.all(tr.kl_to_final[n] == 0) and torch.all(tr.kl_to_final[:n] >= -1e-6)
    assert torch.all((tr.entropy >= 0) & (tr.entropy <= math.log2(VOCAB) + 1e-4))
    assert torch.isnan(tr.target_probs[:, -1]).all() and not torch.isnan(tr.target_probs[:, :-1]).any()
    assert tr.top_tokens[0][0] == str(int(tr.top_ids[0, 0]))  # no tokenizer: ids as text


def test_text_sources_and_missing_austen(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.txt").write_text("y")
    assert [p.name for p in text_files(tmp_path)] == ["a.txt", "b.txt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_files(tmp_path / "nope.txt")
    monkeypatch.setenv("FXLENS_AUSTEN", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y r-cran-janeaustenr"):
        austen_files("train")
    with pytest.raises(FileNotFoundError, match="make austen"):
        text_files(["austen:eval"])


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from fxlens.lenses import plots

    m = traced("llama")
    ev = evaluate(m, _chunks(2, 8), {"logit": LogitLens(m), "tuned": TunedLens(m)}, progress=False)
    p1 = plots.plot_metric(ev, tmp_path / "bpb.png")
    tr = PredictionTrajectory.from_lens(m, LogitLens(m), _chunks(1, 6).tokens[0], lens_name="logit")
    p2 = plots.plot_trajectory(tr, tmp_path / "traj.png")
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    with pytest.raises(ValueError, match="unknown metric"):
        plots.plot_metric(ev, tmp_path / "x.png", "accuracy")
