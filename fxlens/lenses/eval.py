"""Evaluate lenses on held-out text, and the per-prompt ``PredictionTrajectory``.

Per lens layer (``0 .. n_layers``; the last is the model's own output): next-token cross-entropy
(nats/token), KL(final || lens) (nats/token) and bits per byte (cross-entropy in bits over the
UTF-8 bytes of the predicted text). All lenses read the same cached forward.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import TokenChunks
from .fused import FusedUnembed, supported
from .logit_lens import Lens, residual_stream


@dataclass
class LensEval:
    """Per-layer metrics of one or more lenses on one text.

    Attributes:
        layers: ``[0, 1, ..., n_layers]``.
        metrics: lens name -> metric (``"ce"``, ``"kl"``, ``"bits_per_byte"``) -> one value per layer.
        n_tokens: predicted tokens evaluated; ``n_bytes``: their UTF-8 bytes.
        sources: the text files.
    """

    layers: list[int]
    metrics: dict[str, dict[str, list[float]]]
    n_tokens: int
    n_bytes: int
    sources: list[str] = field(default_factory=list)
    model: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LensEval:
        """Read an ``eval.json`` written by :meth:`save`; ``ValueError`` naming the file if it is not one."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**raw)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is not an eval.json written by `fxlens lens eval` ({type(e).__name__}: {e}); "
                             "run `fxlens lens eval` again") from e

    def markdown(self, metric: str = "bits_per_byte") -> str:
        """A Markdown table: one row per layer, one column per lens (plus their difference for two)."""
        names = list(self.metrics)
        head = "| layer | " + " | ".join(names) + (f" | {names[1]} − {names[0]} |" if len(names) == 2 else " |")
        rows = [head, "|" + "---|" * (len(names) + 1 + (len(names) == 2))]
        n = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            vals = [self.metrics[k][metric][i] for k in names]
            cells = [f"{v:.3f}" for v in vals] + ([f"{vals[1] - vals[0]:+.3f}"] if len(names) == 2 else [])
            label = f"{layer} (output)" if layer == n else str(layer)
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(rows)


class _LayerScores:
    """Summed next-token cross-entropy and KL(final || lens) of one lens layer's rows."""

    def __init__(self, lens: Lens, bf16: bool):
        self.lens = lens
        self.fused = FusedUnembed(lens.unembed, bf16=bf16) if supported(lens.unembed) else None
        self.autocast = torch.autocast(lens.unembed.weight.device.type, dtype=torch.bfloat16, enabled=bf16)

    def target(self, final_logits: torch.Tensor) -> tuple:
        if self.fused is not None:
            return (self.fused.target(final_logits),)
        logq = torch.log_softmax(final_logits.float(), -1)
        return logq, logq.exp()

    def __call__(self, h: torch.Tensor, i: int, target: tuple, ids: torch.Tensor) -> tuple[float, float]:
        if self.fused is not None:  # chunked: no [tokens, d_vocab] tensor besides one block
            x = self.lens.normalized(h, i).flatten(0, -2)
            lse, _ = self.fused.logsumexp(x)
            ce = lse - self.fused.token_logits(x, ids)
            kl = self.fused.kl_from_lse(x, lse, target[0])
            return ce.sum().double().item(), kl.sum().double().item()
        logq, q = target
        with self.autocast:
            z = self.lens(h, i).flatten(0, -2)
        logp = torch.log_softmax(z.float(), -1)
        ce = -logp.gather(-1, ids.to(logp.device)[:, None]).sum()
        kl = (q.to(logp.device) * (logq.to(logp.device) - logp)).sum()
        return ce.double().item(), kl.double().item()


@torch.no_grad()
def evaluate(model, chunks: TokenChunks, lenses: dict[str, Lens], *, micro_batch: int = 4,
             progress: bool = True, bf16_unembed: bool = False) -> LensEval:
    """Cross-entropy, KL to the final layer and bits/byte per layer for every lens in ``lenses``.

    One ``run_with_cache`` (residual sites only) per micro-batch feeds all lenses. Positions whose
    next token is in the chunk (``pos < seq_len - 1``) are scored. ``bf16_unembed`` runs the lens
    unembedding matmuls in bfloat16 (float32 softmax and sums); the final layer is the model's own
    logits either way.
    """
    if not lenses:
        raise ValueError("give at least one lens, e.g. {'logit lens': LogitLens(model)}")
    if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive integer (sequences per forward), not {micro_batch!r}")
    n = model.cfg.n_layers
    ce = {k: torch.zeros(n + 1, dtype=torch.float64) for k in lenses}
    kl = {k: torch.zeros(n + 1, dtype=torch.float64) for k in lenses}
    scores = {k: _LayerScores(lens, bf16_unembed) for k, lens in lenses.items()}
    n_tok = 0
    for mb in tqdm(torch.arange(len(chunks)).split(micro_batch), desc="evaluating lenses", disable=not progress):
        ids = chunks.tokens[mb]
        logits, stream = residual_stream(model, ids, final=False)
        target = ids[:, 1:].reshape(-1).to(logits.device)
        final = logits[:, :-1].flatten(0, 1)
        final_ce = torch.nn.functional.cross_entropy(final.float(), target, reduction="sum").double().cpu()
        for name, score in scores.items():
            ce[name][n] += final_ce
            tgt = score.target(final)
            for i in range(n):
                c, k = score(stream[i][:, :-1], i, tgt, target)
                ce[name][i] += c
                kl[name][i] += k
        n_tok += target.numel()
    n_bytes = int(chunks.target_bytes[: len(chunks)].sum())
    metrics = {}
    for name in lenses:
        metrics[name] = {"ce": (ce[name] / n_tok).tolist(), "kl": (kl[name] / n_tok).tolist(),
                         "bits_per_byte": (ce[name] / math.log(2) / n_bytes).tolist()}
    src_model = str(getattr(model.hf_model.config, "name_or_path", ""))
    return LensEval(list(range(n + 1)), metrics, n_tok, n_bytes, list(chunks.sources), src_model)


@dataclass
class PredictionTrajectory:
    """What a lens predicts at every layer and position of one prompt.

    All arrays are ``[n_layers + 1, pos]`` (row ``n_layers`` is the model's output).

    Attributes:
        tokens: the prompt's token ids; ``str_tokens`` their text.
        top_ids / top_tokens: the most likely next token per layer and position (id, text).
        top_probs: its probability.
        entropy: entropy of the lens' distribution (bits).
        kl_to_final: KL(final || lens) in bits.
        target_probs: probability of the actual next token (the last position gets NaN).
    """

    tokens: list[int]
    str_tokens: list[str]
    top_ids: torch.Tensor
    top_tokens: list[list[str]]
    top_probs: torch.Tensor
    entropy: torch.Tensor
    kl_to_final: torch.Tensor
    target_probs: torch.Tensor
    lens_name: str = ""

    @property
    def n_layers(self) -> int:
        return self.top_ids.shape[0] - 1

    @classmethod
    @torch.no_grad()
    def from_lens(cls, model, lens: Lens, input, lens_name: str = "") -> PredictionTrajectory:
        """Run ``input`` (text or ids ``[pos]`` / ``[1, pos]``) once and decode every layer with ``lens``."""
        ids = model.to_tokens(input) if isinstance(input, str) else torch.as_tensor(input).reshape(1, -1)
        if ids.shape[0] != 1:
            raise ValueError("a trajectory is for one sequence")
        logits, stream = residual_stream(model, ids, final=False)
        n = model.cfg.n_layers
        rows = [lens(stream[i], i)[0].float() for i in range(n)] + [logits[0].float()]
        logp = torch.stack([torch.log_softmax(r.to(rows[-1].device), -1) for r in rows])  # [L+1, pos, V]
        p = logp.exp()
        top_p, top_i = p.max(-1)
        ent = -(p * logp).nansum(-1) / math.log(2)
        kl = (p[-1:] * (logp[-1:] - logp)).nansum(-1) / math.log(2)
        tgt = torch.full(top_p.shape, float("nan"))
        nxt = ids[0, 1:].to(p.device)
        tgt[:, :-1] = p[:, :-1].gather(-1, nxt.view(1, -1, 1).expand(n + 1, -1, 1)).squeeze(-1).cpu()
        decode = model.tokenizer.decode if model.tokenizer is not None else str
        str_tokens = [decode([t]) if model.tokenizer is not None else str(t) for t in ids[0].tolist()]
        tops = [[decode([t]) if model.tokenizer is not None else str(t) for t in row] for row in top_i.tolist()]
        return cls(ids[0].tolist(), str_tokens, top_i.cpu(), tops, top_p.cpu(), ent.cpu(), kl.cpu(), tgt, lens_name)
