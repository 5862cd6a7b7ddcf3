"""Site-by-site parity with TransformerLens: every TL-named site fxlens places on SmolLM2 against
TransformerLens 4.3's ``TransformerBridge`` over the same weights.

Runs in an environment with ``transformer-lens==4.3.0`` beside fxlens (``.venv-tl/``, see
``benchmarks/requirements-peers.txt``)::

    .venv-tl/bin/python benchmarks/tl_parity.py [--json out.json] [--markdown out.md]

Both tools get the same token tensor (the bridge's string input would prepend BOS) and their own
copy of the HF model (the bridge rewrites its model in place and forces eager attention); fxlens
runs plain, without weight processing. Every site name both caches hold is compared: shapes, then
values. A site agrees when ``max|a - b| <= ATOL + RTOL * max|b|`` (fp32 rounding); attention
scores are compared where both are unmasked, and both must mask the same entries (TransformerLens
keeps HF's finite ``finfo.min`` fill, fxlens ``-inf``). A hooked run checks that doubling
``hook_normalized`` changes the logits as it does in TransformerLens. Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ATOL, RTOL = 1e-5, 1e-4
PROMPT = "When Mary and John went to the store, John gave a drink to"
_MASKED = -1e30  # scores below this are masked entries


def load(text: str = PROMPT, processed: bool = False):
    """``(fxlens model, TransformerBridge, token ids)`` over two copies of the same SmolLM2 checkpoint.

    ``processed``: both with TransformerLens' default weight processing (fxlens'
    ``HookedTransformer.from_pretrained`` against the bridge's ``enable_compatibility_mode()``).
    """
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    import fxlens

    gguf = fxlens.offline_model_path("smollm2")
    m = fxlens.HookedTransformer.from_pretrained(gguf) if processed else fxlens.from_pretrained(gguf)
    path, tok = m.hf_model.config._name_or_path, m.tokenizer  # the dequantised safetensors folder
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    bridge = TransformerBridge.boot_transformers(path, hf_model=hf, tokenizer=tok, device="cpu")
    if processed:
        bridge.enable_compatibility_mode(disable_warnings=True)
    ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids]])
    return m, bridge, ids


def compare(a: torch.Tensor, b: torch.Tensor, name: str) -> dict:
    """Shape and value agreement of fxlens' ``a`` with TransformerLens' ``b``."""
    row = {"site": name, "shape": list(a.shape), "tl_shape": list(b.shape)}
    if a.shape != b.shape:
        return {**row, "ok": False, "why": "shape"}
    a, b = a.double(), b.double()
    if name.endswith("hook_attn_scores"):
        ma, mb = a < _MASKED, b < _MASKED
        if not torch.equal(ma, mb):
            return {**row, "ok": False, "why": "mask"}
        a, b = a[~ma], b[~mb]
    diff = (a - b).abs().max().item()
    ref = b.abs().max().item()
    ok = diff <= ATOL + RTOL * ref
    return {**row, "ok": ok, "max_abs": diff, "rel": diff / max(ref, 1e-30), **({} if ok else {"why": "values"})}


def parity(text: str = PROMPT, processed: bool = False) -> dict:
    """Every site both models name, compared."""
    m, bridge, ids = load(text, processed)
    with torch.no_grad():
        logits_fx, fx = m.run_with_cache(ids)
        logits_tl, tl = bridge.run_with_cache(ids)
    tl = {k: v for k, v in tl.items()}
    common = sorted(set(fx.keys()) & set(tl.keys()), key=lambda n: m.hook_names.index(n))
    rows = [compare(fx[n], tl[n], n) for n in common]
    logits = compare(logits_fx, logits_tl, "logits")
    # the same edit on the norms' TL sites in both tools: it must flow through the weights alike
    edit = [(n, lambda x, hook: 2 * x) for n in ("blocks.5.ln1.hook_normalized", "blocks.5.ln2.hook_normalized",
                                                  "ln_final.hook_normalized")]
    with torch.no_grad():
        hooked = compare(m.run_with_hooks(ids, fwd_hooks=edit), bridge.run_with_hooks(ids, fwd_hooks=edit),
                         "logits, hook_normalized doubled")
    only_fx = sorted(set(fx.keys()) - set(tl.keys()))
    return {"processed": processed, "tokens": ids.shape[1], "atol": ATOL, "rtol": RTOL, "rows": rows,
            "logits": logits, "hooked": hooked,
            "n_sites": len(rows), "n_differ": sum(not r["ok"] for r in rows),
            "fxlens_only": sorted({re.sub(r"^blocks\.\d+\.", "blocks.{L}.", n) for n in only_fx})}


def table(res: dict) -> str:
    """Markdown: one row per site template (layers pooled), worst layer's numbers."""
    groups: dict[str, list[dict]] = {}
    for r in res["rows"]:
        groups.setdefault(re.sub(r"^blocks\.\d+\.", "blocks.{L}.", r["site"]), []).append(r)
    lines = [("Both with TransformerLens' weight processing (fxlens `HookedTransformer.from_pretrained`, bridge "
              "`enable_compatibility_mode()`). " if res.get("processed") else "")
             + f"{res['n_sites'] - res['n_differ']} of {res['n_sites']} TL-named sites agree "
             f"({res['tokens']} tokens; |a-b| <= {res['atol']:g} + {res['rtol']:g}·max|b|); logits max abs "
             f"{res['logits'].get('max_abs', float('nan')):.2e}; "
             "with ln*.hook_normalized doubled in both (blocks.5, ln_final) "
             f"{res['hooked'].get('max_abs', float('nan')):.2e} ({'agree' if res['hooked']['ok'] else 'DIFFER'})", "",
             "| site | sites | agree | shape | worst max abs | worst rel | why |", "|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        worst = max(rs, key=lambda r: r.get("rel", float("inf")))
        why = ", ".join(sorted({r["why"] for r in rs if not r["ok"]})) or "–"
        lines.append(f"| `{name}` | {len(rs)} | {sum(r['ok'] for r in rs)} | `{worst['shape']}` | "
                     f"{worst.get('max_abs', float('nan')):.2e} | {worst.get('rel', float('nan')):.2e} | {why} |")
    lines += ["", "fxlens-only sites (no TransformerBridge counterpart): "
              + ", ".join(f"`{n}`" for n in res["fxlens_only"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the per-site results here")
    ap.add_argument("--markdown", type=Path, help="write the table here")
    ap.add_argument("--processed", action="store_true", help="both with TL's default weight processing")
    a = ap.parse_args(argv)
    res = parity(processed=a.processed)
    md = table(res)
    print(md)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    if a.markdown:
        a.markdown.write_text(md)
    return 1 if res["n_differ"] or not (res["logits"]["ok"] and res["hooked"]["ok"]) else 0


if __name__ == "__main__":
    sys.exit(main())
