"""fxlens demo: ``python -m fxlens.demo`` (or ``make demo``).

Loads SmolLM2-135M-Instruct from the offline package's GGUF file, shows where fxlens found
its hook sites, runs the IOI prompt and caches a few activations.
"""

from __future__ import annotations

import time

import torch

import fxlens

PROMPT = "When Mary and John went to the store, John gave a drink to"
CACHED = [
    "blocks.0.attn.hook_pattern",
    "blocks.0.attn.hook_q",
    "blocks.0.attn.hook_k",
    "blocks.15.hook_resid_post",
    "ln_final.hook_normalized",
]


def _rule(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def print_sites(m: fxlens.HookedModel) -> None:
    """Block 0's sites and the sites outside the blocks, one row each."""
    table = m.site_table()
    rows = [r for r in table if r["name"].startswith("blocks.0.") or not r["name"].startswith("blocks.")]
    head = {"name": "site", "shape": "shape", "module": "HF module"}
    w = [max(len(str(r[k])) for r in [*rows, head]) for k in ("name", "shape", "module")]
    print(f"{'site':<{w[0]}}  {'shape':<{w[1]}}  {'HF module':<{w[2]}}  found by")
    for r in rows:
        print(f"{r['name']:<{w[0]}}  {r['shape']:<{w[1]}}  {r['module']:<{w[2]}}  {r['found_by']}")
    per_block = sum(r["name"].startswith("blocks.0.") for r in table)
    print(f"... {len(table)} sites in total: {per_block} per block x {m.cfg.n_layers} blocks "
          f"+ {len(table) - per_block * m.cfg.n_layers} outside the blocks")
    split = len(table) - len(m.hook_names)
    if split:
        print(f"    ({len(m.hook_names)} in m.hook_names: the {split} split-input sites (hook_attn_in, "
              "hook_q/k/v_input) are matched by filters only with m.use_split_inputs = True)")


def main() -> None:
    t0 = time.perf_counter()
    m = fxlens.from_pretrained(fxlens.offline_model_path("smollm2"))
    print(f"{m}\nloaded in {time.perf_counter() - t0:.1f} s (graph capture {m.capture_seconds:.1f} s)")

    _rule("hook sites (block 0 and outside the blocks)")
    print_sites(m)

    _rule("next token")
    ids = m.to_tokens(PROMPT)
    logits = m(ids)
    last = logits[0, -1]
    probs = torch.softmax(last.float(), dim=-1)
    top = probs.topk(5)
    print(f"prompt: {PROMPT!r} ({ids.shape[1]} tokens)")
    for p, t in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {m.to_string([t])!r:>12}  p={p:.3f}")
    mary, john = m.to_single_token(" Mary"), m.to_single_token(" John")
    diff = (last[mary] - last[john]).item()
    print(f"logit(' Mary') - logit(' John') at the last position: {diff:+.3f}")

    _rule("run_with_cache (names_filter = 5 sites)")
    _, cache = m.run_with_cache(ids, names_filter=CACHED)
    for name in CACHED:
        print(f"  {name:<28} {tuple(cache[name].shape)}")
    print(f"  cache['pattern', 0] is cache['blocks.0.attn.hook_pattern']: "
          f"{torch.equal(cache['pattern', 0], cache['blocks.0.attn.hook_pattern'])}")
    print(f"  (GQA: hook_q has {m.cfg.n_heads} heads, hook_k has {m.cfg.n_kv_heads})")


if __name__ == "__main__":
    main()
