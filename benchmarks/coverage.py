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
    python benchmarks/coverage.py --merge bart    # rerun some and update their rows in docs/coverage.*
    python benchmarks/coverage.py --shard=1/2 & python benchmarks/coverage.py --shard=2/2; \
        python benchmarks/coverage.py --merge     # two halves in parallel, then the table
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_configs import causal_model, tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ["bert", "roberta", "distilbert", "electra", "xlm-roberta", "camembert", "albert", "deberta-v2"]
TIMEOUT_S = 150


def tiny_model(model_type: str):
    """A tiny random model of ``model_type`` (causal LM, or the base model for encoders)."""
    import torch
    import transformers

    cfg = tiny_config(model_type)
    torch.manual_seed(0)
    if model_type in ENCODERS:
        model = transformers.AutoModel.from_config(cfg)
    else:
        model = causal_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.float().eval()


def check_one(model_type: str) -> dict:
    """Trace one family and measure fidelity; never raises (the reason goes in the row)."""
    import torch

    import fxlens
    from fxlens.check import check_sites
    from fxlens.tracer.families import RULES

    row = dict(_failed_row(model_type, ""), how="rule" if model_type in RULES else "discovery")
    stage = "build tiny config"
    try:
        model = tiny_model(model_type)
        stage = "trace"
        m = fxlens.trace(model, graph_cache=False)  # cold: no graph cache
        how = {s.found_by for s in m.sites.values()}  # a rule also serves wrapped text towers (Gemma 3)
        row.update(how="rule" if how == {"rule"} else "discovery")
        row.update(captured=True, sites=True, n_sites=len(m.all_hook_names), family=m.cfg.family,
                   capture_s=round(m.capture_seconds, 2))
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
        stage = "site values"
        res = check_sites(m, ids)
        row.update(values_ok=res.ok, values=res.summary(), skipped=res.skipped,
                   errors={k: c.max_err for k, c in res.classes.items() if not c.skipped})
    except _Timeout:
        raise
    except Exception as e:  # noqa: BLE001 - recorded, never hidden
        msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
        row["reason"] = f"{stage}: {msg[:300]}"
        if stage == "trace" and type(e).__name__ in ("SiteError", "DiscoveryError"):
            row["captured"], row["sites"] = True, False
    return row


def green(row: dict) -> bool:
    """Fully supported: captured, every site placed, outputs equal HF within tolerance and every site class
    holds the right tensor (``fxlens.check``)."""
    return (row["sites"] is True and row["fidelity"] is not None and row["fidelity"] <= 1e-5
            and row["cache_all"] is not None and row["cache_all"] <= 1e-4
            and row["hooks_all"] is not None and row["hooks_all"] <= 1e-4 and row.get("values_ok") is True)


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
    return _failed_row(model_type, f"crashed: {reason}")


def _failed_row(model_type: str, reason: str) -> dict:
    return {"model_type": model_type, "how": "?", "captured": False, "sites": None, "n_sites": 0, "fidelity": None,
            "cache_all": None, "hooks_all": None, "values_ok": None, "values": "", "capture_s": None,
            "reason": reason}


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
        return _failed_row(model_type, str(e))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.1e}"


def write_markdown(rows: list[dict], seconds: float, total: int) -> str:
    import torch
    import transformers

    n_green = sum(map(green, rows))
    checked = sum(1 for r in rows if "values_ok" in r)
    by_how = {h: sum(1 for r in rows if green(r) and r["how"] == h) for h in ("rule", "discovery")}
    lines = [
        "# Coverage matrix", "",
        "Generated by `make coverage` (`benchmarks/coverage.py`): every `model_type` in transformers' "
        "causal-LM auto mapping plus common encoders, each built from a tiny random config (2 layers, "
        "d_model 64), traced with its rule or by discovery, and checked against HF in fp32.", "",
        f"transformers {transformers.__version__}, torch {torch.__version__}; {len(rows)} families, "
        f"**{n_green} green** ({by_how['rule']} by rule, {by_how['discovery']} by discovery alone); "
        f"families took {seconds / 60:.1f} min in all."
        + ("" if checked == total else f" **Partial: {checked} of {total} families checked with this "
           "harness; the other rows are from an older run and are not counted green.**"), "",
        "Columns: captured (torch.export succeeded), sites (every site placed), fidelity (max-abs no-hook "
        "output vs HF, green ≤ 1e-5), cache-all / hooks-all (max-abs with every site cached / an identity "
        "hook on every site, green ≤ 1e-4), site values (`fxlens.check.check_sites`: every site class "
        "against HF `hidden_states`, forward hooks on the HF modules, eager attention weights, and the "
        "residual / head-result sums; `ok`, or the failing classes with their relative max error), capture "
        "(cold `trace()` seconds, no graph cache). Green needs all of them. A family that is not green shows "
        "why; a family whose site values are wrong is never green.", "",
        "| model_type | found by | captured | sites | fidelity | cache-all | hooks-all | site values | capture s "
        "| status / reason |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (not green(r), r["model_type"])):
        sites = "–" if r["sites"] is None else ("yes" if r["sites"] else "no")
        values = "–" if r.get("values_ok") is None else (r.get("values") or "").replace("|", "/")
        if "values_ok" not in r:  # a row from an older run, before site values were checked
            status = "not rerun with the site-value check" + (f" (older run: {r['reason'][:120]})" if r["reason"]
                                                              else " (older run: outputs equal HF)")
        else:
            status = "**green**" if green(r) else (r["reason"] or ("wrong site values" if r["values_ok"] is False
                                                                  else "outputs differ from HF"))
        cap = "–" if r.get("capture_s") is None else f"{r['capture_s']:.1f}"
        lines.append(f"| {r['model_type']} | {r['how']} | {'yes' if r['captured'] else 'no'} | {sites} | "
                     f"{_fmt(r['fidelity'])} | {_fmt(r['cache_all'])} | {_fmt(r['hooks_all'])} | {values} | {cap} "
                     f"| {status} |")
    return "\n".join(lines) + "\n"


def _write(old: dict, rows: list[dict], out_json: Path, out_md: Path | None, total: int) -> None:
    table = sorted({**old, **{r["model_type"]: r for r in rows}}.values(), key=lambda r: r["model_type"])
    out_json.write_text(json.dumps(table, indent=1) + "\n")
    if out_md is not None:
        out_md.write_text(write_markdown(table, sum(r.get("seconds", 0) for r in table), total))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        print(json.dumps(check_one(argv[1])))
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    isolate, merge = "--isolate" in argv, "--merge" in argv
    shard = next((a.split("=", 1)[1] for a in argv if a.startswith("--shard=")), None)
    argv = [a for a in argv if a not in ("--isolate", "--merge") and not a.startswith("--shard=")]
    every = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(ENCODERS))
    types = argv or ([] if merge else every)  # --merge alone: rebuild the table from the stored rows
    out_json, out_md = ROOT / "docs" / "coverage.json", ROOT / "docs" / "coverage.md"
    if shard:  # "--shard=1/2": every 2nd family from the 1st, rows to docs/coverage.shard1.json, merged after
        i, n = map(int, shard.split("/"))
        types, out_json, merge = types[i - 1::n], out_json.with_suffix(f".shard{i}.json"), True
    old = {r["model_type"]: r for r in json.loads(out_json.read_text())} if merge and out_json.exists() else {}
    for extra in sorted(out_json.parent.glob("coverage.shard*.json")) if not shard else []:
        old.update({r["model_type"]: r for r in json.loads(extra.read_text())})  # finished shards
    rows = []
    for i, mt in enumerate(types, 1):
        t = time.perf_counter()
        row = _run_subprocess(mt) if isolate else _run_inline(mt)
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        why = row["reason"] or row.get("values") or ""
        print(f"[{i}/{len(types)}] {mt:28s} {'green' if green(row) else 'FAIL ' + why[:110]}", flush=True)
        if not argv or merge:  # rewritten after every family, so an interrupted run still leaves its rows
            _write(old, rows, out_json, None if shard else out_md, len(every))
    if merge and not rows:
        _write(old, rows, out_json, out_md, len(every))
    print(f"{sum(map(green, rows))}/{len(rows)} green")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
