"""The TransformerLens Main Demo, reproduced with fxlens on SmolLM2-135M-Instruct (CPU, offline).

Run: ``make main-demo`` (or ``.venv/bin/python docs/main_demo.py``). Prints every number and
writes ``docs/main_demo.md`` (this run's output) plus the PNG figures beside it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import fxlens  # noqa: E402
from fxlens.interventions import analysis as A  # noqa: E402
from fxlens.interventions import evals as E  # noqa: E402
from fxlens.interventions import patching as P  # noqa: E402
from fxlens.interventions.patches import AddPatch, MeanPatch, ZeroPatch  # noqa: E402
from fxlens.interventions.weights import norm_affine  # noqa: E402

DOCS = Path(__file__).parent
OUT: list[str] = []


def say(text: str = "") -> None:
    """Print and record for the Markdown rendering."""
    print(text)
    OUT.append(text)


def section(title: str, prose: str, code: str) -> None:
    OUT.append(f"\n## {title}\n\n{prose}\n\n```python\n{code.strip()}\n```\n\nOutput:\n\n```text")
    print(f"\n== {title} ==")


def end_section(image: str | None = None) -> None:
    OUT.append("```")
    if image:
        OUT.append(f"\n![{image}]({image})")


def heatmap(data: torch.Tensor, path: str, title: str, xlabel: str, ylabel: str, xticks=None, cmap="RdBu",
            centre: bool = True) -> None:
    fig, ax = plt.subplots(figsize=(9, 7))
    lim = data.abs().max().item()
    im = ax.imshow(data.numpy(), cmap=cmap, aspect="auto", vmin=-lim if centre else None, vmax=lim if centre else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), xticks, rotation=60, ha="right")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(DOCS / path, dpi=90)
    plt.close(fig)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("FXLENS_THREADS", "1")))  # shared 2-core boxes: avoid OMP thrash
    t_start = time.perf_counter()

    section("Loading the model", "An unmodified HF checkpoint, captured once with `torch.export`; sites carry "
            "TransformerLens names.", 'model = fxlens.from_pretrained(fxlens.offline_model_path("smollm2"))')
    model = fxlens.from_pretrained(fxlens.offline_model_path("smollm2"))
    c = model.cfg
    say(repr(model))
    say(f"n_layers={c.n_layers} d_model={c.d_model} n_heads={c.n_heads} n_kv_heads={c.n_kv_heads} "
        f"d_head={c.d_head} d_mlp={c.d_mlp} d_vocab={c.d_vocab} norm={c.normalization_type}")
    end_section()

    # -- IOI -------------------------------------------------------------------------
    clean_text = "When Mary and John went to the store, John gave a drink to"
    corrupt_text = "When Mary and John went to the store, Mary gave a drink to"
    section("Indirect object identification: clean vs corrupted",
            "The clean prompt should be completed with ` Mary` (the indirect object); the corrupted one swaps "
            "the second name so the answer flips. The metric is the logit difference ` Mary` - ` John`.",
            '''clean, corrupted = model.to_tokens(clean_text), model.to_tokens(corrupt_text)
clean_logits, clean_cache = model.run_with_cache(clean)
metric = lambda logits: logits[0, -1, mary] - logits[0, -1, john]''')
    clean, corrupted = model.to_tokens(clean_text), model.to_tokens(corrupt_text)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    clean_logits, clean_cache = model.run_with_cache(clean)
    corrupt_logits = model(corrupted)
    clean_ld, corrupt_ld = metric(clean_logits).item(), metric(corrupt_logits).item()
    say(f"tokens: {model.to_str_tokens(clean)}")
    say(f"clean logit diff     {clean_ld:+.4f}   top-1: {model.to_string([clean_logits[0, -1].argmax().item()])!r}")
    say(f"corrupted logit diff {corrupt_ld:+.4f}   top-1: "
        f"{model.to_string([corrupt_logits[0, -1].argmax().item()])!r}")
    end_section()

    # -- direct logit attribution ---------------------------------------------------
    section("Direct logit attribution",
            "Decompose the final residual stream at the last position into embeddings, heads, MLPs and biases; "
            "with the cached final-norm scale the attributions sum exactly to the logit difference.",
            '''stack, labels = A.get_full_resid_decomposition(clean_cache, model, expand_neurons=False,
                                               apply_ln=True, pos_slice=-1, return_labels=True)
attrs = A.scaled_logit_attrs(model, stack, mary, john)[:, 0]''')
    stack, labels = A.get_full_resid_decomposition(clean_cache, model, expand_neurons=False, apply_ln=True,
                                                   pos_slice=-1, return_labels=True)
    attrs = A.scaled_logit_attrs(model, stack, mary, john)[:, 0]
    say(f"sum of {len(labels)} component attributions: {attrs.sum().item():+.4f} "
        f"(+ norm/unembed bias terms {A.logit_bias_terms(model, mary, john).item():+.4f}) vs logit diff "
        f"{clean_ld:+.4f}")
    top = attrs.abs().topk(8).indices
    say("largest components: " + ", ".join(f"{labels[i]} {attrs[i].item():+.2f}" for i in top))
    end_section()

    # -- activation patching ----------------------------------------------------------
    section("Activation patching: residual stream by layer and position",
            "Patch the clean `resid_pre` into the corrupted run at every (layer, position): "
            f"{c.n_layers * clean.shape[1]} cells. fxlens runs them as one wavefront over per-block graph "
            "segments (cells join the batch at their layer, from the cached corrupted residual stream; cells in "
            "the shared prefix are skipped exactly), unembedding only the last position. The result is "
            "normalised so 1 = clean, 0 = corrupted.",
            '''resid_pre = P.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, logits_at=-1)''')
    t = time.perf_counter()
    resid_pre = P.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, logits_at=-1, progress=False)
    sweep_s = time.perf_counter() - t
    norm = (resid_pre - corrupt_ld) / (clean_ld - corrupt_ld)
    say(f"shape {tuple(resid_pre.shape)}, {sweep_s:.2f} s ({model.cfg.n_layers * clean.shape[1]} cells)")
    toks = model.to_str_tokens(clean)
    for L in (0, 5, 10, 15, 20, 25, 29):
        say(f"layer {L:2d}: " + " ".join(f"{v:+.2f}" for v in norm[L].tolist()))
    heatmap(norm, "main_demo_resid_pre.png", "resid_pre patching (normalised logit diff)", "position", "layer",
            xticks=[f"{i}:{s}" for i, s in enumerate(toks)])
    end_section("main_demo_resid_pre.png")

    # -- head ablation -------------------------------------------------------------------
    text = ("The quick brown fox jumps over the lazy dog. Alice went to Paris in the spring, where she studied "
            "painting and learned to speak French fluently. Later she returned home and opened a small studio.")
    section("Head ablation and its loss change",
            "Zero- and mean-ablate single heads (`hook_z`) with the patch vocabulary and measure the LM loss "
            "on a short text; then sweep zero-ablation of every head on the IOI metric in one batched call.",
            '''with model.patch({f"blocks.{L}.attn.hook_z": ZeroPatch(head=h)}):
    loss = model(text_tokens, return_type="loss")
ablation = P.patch_sweep(model, clean, None, metric, [f"blocks.{L}.attn.hook_z" for L in range(n_layers)],
                         by_pos=False, by_head=True, patch=ZeroPatch())''')
    text_tokens = model.to_tokens(text)
    base_loss = model(text_tokens, return_type="loss").item()
    say(f"clean loss {base_loss:.4f}")
    _, z_cache = model.run_with_cache(text_tokens, names_filter=lambda n: n.endswith("hook_z"))
    for L, h in ((0, 0), (3, 1), (8, 4), (15, 2)):
        with model.patch({f"blocks.{L}.attn.hook_z": ZeroPatch(head=h)}):
            zero = model(text_tokens, return_type="loss").item()
        ref = z_cache[f"blocks.{L}.attn.hook_z"][0].reshape(-1, c.n_heads, c.d_head)  # positions as a batch
        mean = MeanPatch(reference=ref, head=h)
        with model.patch({f"blocks.{L}.attn.hook_z": mean}):
            meaned = model(text_tokens, return_type="loss").item()
        say(f"L{L}H{h}: zero-ablated loss {zero:.4f} ({zero - base_loss:+.4f}), "
            f"mean-ablated {meaned:.4f} ({meaned - base_loss:+.4f})")
    t = time.perf_counter()
    ablation = P.patch_sweep(model, clean, None, metric, [f"blocks.{L}.attn.hook_z" for L in range(c.n_layers)],
                             by_pos=False, by_head=True, patch=ZeroPatch(), logits_at=-1, progress=False)
    say(f"IOI zero-ablation sweep over {c.n_layers * c.n_heads} heads: {time.perf_counter() - t:.2f} s")
    drop = ablation - clean_ld
    top = drop.flatten().topk(6, largest=False).indices
    say("heads whose ablation hurts the logit diff most: "
        + ", ".join(f"L{i // c.n_heads}H{i % c.n_heads} {drop.flatten()[i].item():+.2f}" for i in top))
    heatmap(drop, "main_demo_head_ablation.png", "IOI logit diff change when zero-ablating each head", "head",
            "layer")
    end_section("main_demo_head_ablation.png")

    # -- induction -------------------------------------------------------------------------
    section("Induction: loss on repeated random tokens and head scores",
            "Random tokens repeated once: a model with induction heads predicts the second half far better. "
            "Induction score = mean attention from each second-half token to the token after its previous "
            "occurrence; previous-token score = mean attention to the previous position.",
            '''rep = E.repeated_tokens(model, batch=4, seq_len=50)
first, second = E.mean_induction_loss(model, rep, seq_len=50)
scores = E.head_scores(model, rep, seq_len=50)   # induction / duplicate / previous, [n_layers, n_heads]''')
    rep = E.repeated_tokens(model, batch=4, seq_len=50, seed=0)
    first, second = E.mean_induction_loss(model, rep, seq_len=50)
    say(f"repeated tokens {tuple(rep.shape)}: loss first half {first:.3f}, second half {second:.3f}")
    scores = E.head_scores(model, rep, seq_len=50)
    ind = scores["induction"]
    top = ind.flatten().topk(6).indices
    say("top induction heads: " + ", ".join(f"L{i // c.n_heads}H{i % c.n_heads} {ind.flatten()[i]:.3f}"
                                              for i in top))
    prev = scores["previous"].flatten().topk(4).indices
    say("top previous-token heads: " + ", ".join(
        f"L{i // c.n_heads}H{i % c.n_heads} {scores['previous'].flatten()[i]:.3f}" for i in prev))
    heatmap(ind, "main_demo_induction_scores.png", "induction score per head", "head", "layer", cmap="Blues",
            centre=False)
    best = top[0].item()
    bl, bh = divmod(best, c.n_heads)
    with model.patch({f"blocks.{bl}.attn.hook_z": ZeroPatch(head=bh)}):
        ab_first, ab_second = E.mean_induction_loss(model, rep, seq_len=50)
    say(f"ablating L{bl}H{bh}: second-half loss {second:.3f} -> {ab_second:.3f}")
    end_section("main_demo_induction_scores.png")

    # -- OV circuit ----------------------------------------------------------------------------
    section("OV circuit: do induction heads copy?",
            "The full OV circuit `W_E @ W_V @ W_O @ W_U` of a head, as a `FactoredMatrix` over 500 random tokens "
            "(the RMSNorm weights of ln1 and the final norm folded in): a copying head maps each token to "
            "itself. Reported: the fraction of tokens whose own logit is the row's top-1, and the top-5 rate. "
            "With raw `W_E` as the input (the TL demo's choice for a 2-layer model) the deep induction heads of "
            "SmolLM2 barely copy: by layer 17 a token's residual is far from its embedding. In context, the head's "
            "OV output for each first-half token of the repeated sequence (its actual ln1-normalised residual at "
            "the head's layer, which is what the induction head reads) is unembedded over the full vocabulary: "
            "top-1 / top-10 = how often that token's own logit ranks first / in the top 10.",
            '''OV = model.OV[L, h]                                      # FactoredMatrix [d_model, d_model]
full = FactoredMatrix(W_E[toks] * w_ln1, OV.A) @ FactoredMatrix(OV.B, w_final[:, None] * W_U[:, toks])''')
    from fxlens.interventions.factored_matrix import FactoredMatrix

    g = torch.Generator().manual_seed(0)
    sample = torch.randint(1000, 20000, (500,), generator=g)
    w_final, _ = model.ln_final_affine()
    WE, WU = model.W_E[sample], model.W_U[:, sample] * w_final[:, None]
    OV = model.OV
    _, rep_cache = model.run_with_cache(rep, names_filter=lambda n: n.endswith("ln1.hook_normalized"))
    rows = []
    heads = [(i // c.n_heads, i % c.n_heads) for i in top[:4].tolist()] + [(0, 0), (15, 5)]
    for L, h in heads:
        w1, _ = norm_affine(model.hf_model.get_submodule(model.family.block(L, model.family.ln1)), c.d_model, False)
        ov = OV[L, h]
        full = FactoredMatrix(WE * w1, ov.A) @ FactoredMatrix(ov.B, WU)
        m = full.AB
        diag = m.diagonal()
        top1 = (m.argmax(-1) == torch.arange(len(sample))).float().mean().item()
        top5 = (m > diag[:, None]).sum(-1).lt(5).float().mean().item()
        src = rep_cache[f"blocks.{L}.ln1.hook_normalized"][:, 1:51].reshape(-1, c.d_model)  # first-half tokens
        own = rep[:, 1:51].reshape(-1)
        ctx_logits = (src @ ov.A) @ (ov.B @ (model.W_U * w_final[:, None]))  # [200, d_vocab]
        own_logit = ctx_logits.gather(-1, own[:, None])
        ext_top1 = (ctx_logits > own_logit).sum(-1).lt(1).float().mean().item()
        ext_top10 = (ctx_logits > own_logit).sum(-1).lt(10).float().mean().item()
        rows.append((L, h, top1, top5, ind[L, h].item()))
        say(f"L{L}H{h}: W_E copying top-1 {top1:.3f}, top-5 {top5:.3f}; in context: top-1 "
            f"{ext_top1:.3f}, top-10 {ext_top10:.3f} (induction score {ind[L, h]:.3f}); "
            f"OV norm {ov.norm().item():.1f}, top singular values "
            + " ".join(f"{s:.1f}" for s in ov.S[:3].tolist()))
    end_section()

    # -- generation with a steering hook ----------------------------------------------------------
    section("Generation with hooks",
            "HF `generate` with the KV cache; hooks sit at the equivalent HF module boundaries. Greedy, no hook "
            "vs a steering vector (`AddPatch`) on the residual stream: the difference of the ` Paris` and "
            "` London` residuals at layer 10.",
            '''steer = AddPatch(vector=(paris_resid - london_resid), scale=2.0)
model.generate(prompt, max_new_tokens=20, do_sample=False, fwd_hooks=[("blocks.10.hook_resid_post", steer)])''')
    prompt = "I went on holiday to"
    say("no hook:  " + repr(model.generate(prompt, max_new_tokens=20, do_sample=False)))
    _, pc = model.run_with_cache(" Paris", names_filter="blocks.10.hook_resid_post")
    _, lc = model.run_with_cache(" London", names_filter="blocks.10.hook_resid_post")
    vector = pc["blocks.10.hook_resid_post"][0, -1] - lc["blocks.10.hook_resid_post"][0, -1]
    for scale in (1.0, 2.0):
        steered = model.generate(prompt, max_new_tokens=20, do_sample=False,
                                 fwd_hooks=[("blocks.10.hook_resid_post", AddPatch(vector=vector, scale=scale))])
        say(f"steered towards Paris (scale {scale}): " + repr(steered))
    end_section()

    total = time.perf_counter() - t_start
    say(f"\n(total {total:.1f} s, {torch.get_num_threads()} thread(s), torch {torch.__version__})")
    header = ("# The TransformerLens Main Demo with fxlens (SmolLM2-135M-Instruct)\n\n"
              "Generated by `make main-demo` (`docs/main_demo.py`); every number below is this run's output, "
              "on CPU. The steps follow the TransformerLens Main Demo (GPT-2 small there): IOI logit difference, "
              "activation patching, head ablation, induction heads, OV copying, and generation with hooks.\n")
    (DOCS / "main_demo.md").write_text(header + "\n".join(OUT) + "\n")


if __name__ == "__main__":
    main()
