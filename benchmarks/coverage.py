"""Coverage matrix: trace every causal-LM family in transformers from a tiny random config.

For each ``model_type`` in transformers' causal-LM auto mapping (plus common encoders):
build a tiny random model, trace it (rule if one exists, else discovery), and check
fidelity (no-hook output vs HF, fp32, max-abs <= 1e-5), that every site was placed, that
caching every site and an identity hook on every site leave the output unchanged
(<= 1e-4). Each family runs under a time limit (in-process, or one subprocess each with ``--isolate``); results go to
``docs/coverage.md`` (and ``docs/coverage.json``).

    python benchmarks/coverage.py                 # all families (~15-25 min on 2 cores)
    python benchmarks/coverage.py llama gpt2      # some
    python benchmarks/coverage.py --isolate       # one subprocess per family (slower, crash-proof)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ["bert", "roberta", "distilbert", "electra", "xlm-roberta", "camembert", "albert", "deberta-v2"]
TINY = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=128, head_dim=16, n_embd=64, n_layer=2, n_head=4,
    n_positions=128, n_inner=128, ffn_dim=128, num_layers=2, num_heads=4, d_model=64, n_layers=2,
    num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4,
    shared_expert_intermediate_size=32, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, embedding_size=64, max_seq_len=128,
    decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128, encoder_layers=2, encoder_attention_heads=4,
    encoder_ffn_dim=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=64, attention_chunk_size=64,
    rotary_dim=8,
    # non-trivial documented scalings, so a site that misses them is caught
    embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0,
)
TIMEOUT_S = 180


def tiny_model(model_type: str):
    """A tiny random model of ``model_type`` (causal LM, or the base model for encoders)."""
    import torch
    import transformers

    default = transformers.AutoConfig.for_model(model_type)
    sub = getattr(default, "text_config", None)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    kwargs = {k: v for k, v in TINY.items() if k in known}
    if sub is not None and not isinstance(sub, dict):
        sub_known = set(sub.to_dict()) | set(getattr(sub, "attribute_map", {}))
        kwargs["text_config"] = {k: v for k, v in TINY.items() if k in sub_known}
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    if model_type in ENCODERS:
        model = transformers.AutoModel.from_config(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.float().eval()


def check_one(model_type: str) -> dict:
    """Trace one family and measure fidelity; never raises (the reason goes in the row)."""
    import torch

    import fxlens
    from fxlens.tracer.families import RULES

    row = {"model_type": model_type, "how": "rule" if model_type in RULES else "discovery", "captured": False,
           "sites": None, "n_sites": 0, "fidelity": None, "cache_all": None, "hooks_all": None, "reason": ""}
    stage = "build tiny config"
    try:
        model = tiny_model(model_type)
        stage = "trace"
        m = fxlens.trace(model, graph_cache=False)
        row.update(captured=True, sites=True, n_sites=len(m.all_hook_names), family=m.cfg.family)
        ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
        stage = "HF forward"
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        ref = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        stage = "fxlens forward"
        row["fidelity"] = (m(ids) - ref).abs().max().item()
        stage = "cache all sites"
        logits, cache = m.run_with_cache(ids)
        row["cache_all"] = (logits - ref).abs().max().item()
        stage = "identity hook on every site"
        hooked = m.run_with_hooks(ids, fwd_hooks=[(lambda n: True, lambda x, hook: x.clone())])
        row["hooks_all"] = (hooked - ref).abs().max().item()
    except _Timeout:
        raise
    except Exception as e:  # noqa: BLE001 - recorded, never hidden
        msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
        row["reason"] = f"{stage}: {msg[:300]}"
        if stage == "trace" and type(e).__name__ in ("SiteError", "DiscoveryError"):
            row["captured"], row["sites"] = True, False
    return row


def green(row: dict) -> bool:
    """Fully supported: captured, every site placed, outputs equal HF within tolerance."""
    return (row["sites"] is True and row["fidelity"] is not None and row["fidelity"] <= 1e-5
            and row["cache_all"] is not None and row["cache_all"] <= 1e-4
            and row["hooks_all"] is not None and row["hooks_all"] <= 1e-4)


def _run_subprocess(model_type: str) -> dict:
    env = dict(os.environ, FXLENS_GRAPH_CACHE="0", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", model_type], capture_output=True, text=True,
                              timeout=TIMEOUT_S, env=env, cwd=ROOT)
        last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if last:
            return json.loads(last[-1])
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    except subprocess.TimeoutExpired:
        reason = f"timed out after {TIMEOUT_S} s"
    return {"model_type": model_type, "how": "?", "captured": False, "sites": None, "n_sites": 0,
            "fidelity": None, "cache_all": None, "hooks_all": None, "reason": f"crashed: {reason}"}


class _Timeout(Exception):
    pass


def _run_inline(model_type: str) -> dict:
    """``check_one`` in this process (imports paid once), with an alarm-based time limit."""
    def on_alarm(signum, frame):
        raise _Timeout(f"timed out after {TIMEOUT_S} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TIMEOUT_S)
    try:
        return check_one(model_type)
    except _Timeout as e:
        return {"model_type": model_type, "how": "?", "captured": False, "sites": None, "n_sites": 0,
                "fidelity": None, "cache_all": None, "hooks_all": None, "reason": str(e)}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.1e}"


def write_markdown(rows: list[dict], seconds: float, total: int) -> str:
    import torch
    import transformers

    n_green = sum(map(green, rows))
    by_how = {h: sum(1 for r in rows if green(r) and r["how"] == h) for h in ("rule", "discovery")}
    lines = [
        "# Coverage matrix", "",
        "Generated by `make coverage` (`benchmarks/coverage.py`): every `model_type` in transformers' "
        "causal-LM auto mapping plus common encoders, each built from a tiny random config (2 layers, "
        "d_model 64), traced with its rule or by discovery, and checked against HF in fp32.", "",
        f"transformers {transformers.__version__}, torch {torch.__version__}; {len(rows)} families, "
        f"**{n_green} green** ({by_how['rule']} by rule, {by_how['discovery']} by discovery with no rule); "
        f"run took {seconds / 60:.1f} min."
        + ("" if len(rows) == total else f" **Partial: {len(rows)} of {total} families checked.**"), "",
        "Columns: captured (torch.export succeeded), sites (every site placed), fidelity (max-abs no-hook "
        "output vs HF, green ≤ 1e-5), cache-all / hooks-all (max-abs with every site cached / an identity "
        "hook on every site, green ≤ 1e-4). A family that is not green shows why; none returns wrong numbers "
        "silently.", "",
        "| model_type | found by | captured | sites | fidelity | cache-all | hooks-all | status / reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (not green(r), r["model_type"])):
        sites = "–" if r["sites"] is None else ("yes" if r["sites"] else "no")
        status = "**green**" if green(r) else (r["reason"] or "outputs differ from HF")
        lines.append(f"| {r['model_type']} | {r['how']} | {'yes' if r['captured'] else 'no'} | {sites} | "
                     f"{_fmt(r['fidelity'])} | {_fmt(r['cache_all'])} | {_fmt(r['hooks_all'])} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        print(json.dumps(check_one(argv[1])))
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    isolate = "--isolate" in argv
    argv = [a for a in argv if a != "--isolate"]
    types = argv or sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(ENCODERS))
    t0, rows = time.perf_counter(), []
    for i, mt in enumerate(types, 1):
        row = _run_subprocess(mt) if isolate else _run_inline(mt)
        rows.append(row)
        print(f"[{i}/{len(types)}] {mt:28s} {'green' if green(row) else 'FAIL ' + row['reason'][:110]}", flush=True)
        if not argv:  # rewritten after every family, so an interrupted run still leaves its rows
            (ROOT / "docs" / "coverage.json").write_text(json.dumps(rows, indent=1) + "\n")
            (ROOT / "docs" / "coverage.md").write_text(
                write_markdown(rows, time.perf_counter() - t0, len(types)))
    print(f"{sum(map(green, rows))}/{len(rows)} green")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
