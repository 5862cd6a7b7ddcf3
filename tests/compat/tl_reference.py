"""fxlens' cache analyses and utils against TransformerLens' own code, on the same tensors.

Run in a venv with ``transformer-lens==4.3.0`` and this fxlens (``.venv-tl``, see docs/porting.md):
``.venv-tl/bin/python -m tests.compat.tl_reference``. TL's ``ActivationCache`` is given the very
tensors of an fxlens cache and a stand-in model exposing TL's attributes (weights from fxlens, the
unembedding folded with the final norm's weight as TL's ``fold_ln`` does), so any difference is in
the analysis code, not in the forward. Prints one line per check; exits 1 on a mismatch.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
from transformer_lens import ActivationCache as TLCache
from transformer_lens import utilities as tlu

from fxlens import utils
from tests.conftest import tokens, traced

FAILED: list[str] = []


def check(label: str, ours, theirs, tol: float = 1e-5) -> None:
    """Compare two results, or two zero-argument callables (equal if both raise the same error type)."""
    if callable(ours):
        try:
            ours = ours()
        except Exception as e:  # noqa: BLE001
            ours = e
        try:
            theirs = theirs()
        except Exception as e:  # noqa: BLE001
            theirs = e
        if isinstance(ours, Exception) or isinstance(theirs, Exception):
            ok = type(ours) is type(theirs) or (isinstance(ours, Exception) and isinstance(theirs, Exception))
            print(f"{'ok ' if ok else 'BAD'} {label[:160]} raises: ours {ours!r:.80} / TL {theirs!r:.80}")
            if not ok:
                FAILED.append(label)
            return
    if isinstance(ours, tuple):
        ok = ours[1] == theirs[1]
        ours, theirs = ours[0], theirs[0]
    else:
        ok = True
    ok = ok and ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=tol, rtol=tol)
    label = label.replace("\n", " ")[:160]
    print(f"{'ok ' if ok else 'BAD'} {label} {tuple(ours.shape)}")
    if not ok:
        FAILED.append(label)


class Proj(torch.Tensor):
    """A projection tensor that prints as its shape (keeps the check labels short)."""

    def __repr__(self) -> str:
        return f"<{tuple(self.shape)}>"


class StandIn:
    """What TL's ActivationCache reads from a model, from an fxlens model."""

    def __init__(self, m):
        w, _ = m.ln_final_affine()
        c = m.cfg
        self.cfg = SimpleNamespace(n_layers=c.n_layers, n_heads=c.n_heads, d_mlp=c.d_mlp, d_model=c.d_model,
                                   normalization_type=c.normalization_type, attn_only=False, device="cpu")
        self.W_U = m.W_U * w[:, None]
        self.blocks = [SimpleNamespace(attn=SimpleNamespace(W_O=m.W_O[L], b_O=m.b_O[L]),
                                       mlp=SimpleNamespace(W_out=m.W_out[L], b_out=m.b_out[L]))
                       for L in range(c.n_layers)]
        self.ln_final = m.hf_model.get_submodule(m.family.ln_final)

    def tokens_to_residual_directions(self, tokens):
        from transformer_lens.model_bridge.transformer_bridge import TransformerBridge

        return TransformerBridge.tokens_to_residual_directions(self, tokens)

    def accumulated_bias(self, layer, mlp_input=False, include_mlp_biases=True):  # TL's HookedTransformer's
        acc = torch.zeros(self.cfg.d_model)
        for i in range(layer):
            acc = acc + self.blocks[i].attn.b_O + (self.blocks[i].mlp.b_out if include_mlp_biases else 0)
        return acc + (self.blocks[layer].attn.b_O if mlp_input else 0)


def compare_analysis(family: str, batch: int) -> None:
    m = traced(family)
    _, ours = m.run_with_cache(tokens(batch, 6))
    if batch == 1:
        ours.remove_batch_dim()
    data = dict(ours.cache_dict)
    if "hook_pos_embed" in data and ours.has_batch_dim:  # fxlens' site broadcasts over the batch; TL's is repeated
        data["hook_pos_embed"] = data["hook_pos_embed"].expand_as(data["hook_embed"])
    theirs = TLCache(data, StandIn(m), has_batch_dim=ours.has_batch_dim)
    tag = f"{family} batch={batch if ours.has_batch_dim else 'removed'}"

    def same(method: str, layer, kw: dict) -> None:
        check(f"{tag} {method}({layer}, {kw})", lambda: getattr(ours, method)(layer, return_labels=True, **kw),
              lambda: getattr(theirs, method)(layer, return_labels=True, **kw))

    n = m.cfg.n_layers
    p = Proj(torch.randn(m.cfg.d_model, 3, generator=torch.Generator().manual_seed(0)))
    for layer in (None, -1, 0, 1, n):
        for kw in (dict(), dict(incl_mid=True), dict(apply_ln=True), dict(apply_ln=True, incl_mid=True, pos_slice=-1),
                   dict(mlp_input=True, pos_slice=(1, 4)) if layer not in (None, -1, n) else dict(pos_slice=[0, 2])):
            same("accumulated_resid", layer, kw)
        for kw in (dict(), dict(mode="attn", apply_ln=True), dict(mode="mlp", pos_slice=-1), dict(incl_embeds=False),
                   dict(mlp_input=True, apply_ln=True) if layer not in (None, -1, n) else dict(apply_ln=True)):
            if layer == 0 and kw.get("incl_embeds") is False:
                continue  # TL stacks an empty list there
            same("decompose_resid", layer, kw)
        for kw in (dict(), dict(incl_remainder=True, apply_ln=True), dict(pos_slice=-1, apply_ln=True)):
            same("stack_head_results", layer, kw)
        for kw in (dict(), dict(apply_ln=True, pos_slice=-1), dict(neuron_slice=[1, 5], incl_remainder=True),
                   dict(project_output_onto=p, apply_ln=True), dict(project_output_onto=p[:, 0]),
                   dict(project_output_onto=p, apply_ln=True, incl_remainder=True, mlp_input=layer in (0, 1))):
            same("stack_neuron_results", layer, kw)
        for kw in (dict(), dict(expand_neurons=False, apply_ln=True), dict(apply_ln=True, pos_slice=-1),
                   dict(project_output_onto=p, apply_ln=True), dict(project_output_onto=p[:, 1], expand_neurons=False),
                   dict(mlp_input=True, apply_ln=True) if layer not in (None, -1, n) else dict(pos_slice=(0, 3))):
            same("get_full_resid_decomposition", layer, kw)
    stack = ours.decompose_resid()
    for layer in (None, -1, 0, 1, n):
        check(f"{tag} apply_ln_to_stack({layer})", ours.apply_ln_to_stack(stack, layer),
              theirs.apply_ln_to_stack(stack, layer))
    last = ours.get_full_resid_decomposition(pos_slice=-1)
    check(f"{tag} logit_attrs(5, 7)", ours.logit_attrs(last, 5, 7, pos_slice=-1),
          theirs.logit_attrs(last, 5, 7, pos_slice=-1))
    check(f"{tag} logit_attrs all positions", ours.logit_attrs(stack, 5), theirs.logit_attrs(stack, 5))
    if ours.has_batch_dim:
        a, b = torch.arange(5, 5 + batch), torch.arange(20, 20 + batch)
        check(f"{tag} logit_attrs per-example", ours.logit_attrs(stack, a, b), theirs.logit_attrs(stack, a, b))
        check(f"{tag} logit_attrs batch_slice", ours.logit_attrs(stack, 5, 7, batch_slice=[1]),
              theirs.logit_attrs(stack, 5, 7, batch_slice=[1]))
        check(f"{tag} stack_activation", ours.stack_activation("pattern"), theirs.stack_activation("pattern"))
        check(f"{tag} apply_slice_to_batch_dim", ours.apply_slice_to_batch_dim(1)["resid_post", -1],
              theirs.apply_slice_to_batch_dim(1)["resid_post", -1])


def compare_utils() -> None:
    names = ["k6", "scale4ln1", "pre5", "embed", "pos_embed", "resid_pre3", "attn2", "value0", "mlp_post1",
             "blocks.1.hook_resid_post", "hook_embed", "z7a", "normalized3ln2", "attn_out4b", "mlp_in2"]
    calls = [(n,) for n in names] + [("k", 6, "a"), ("pre", 2), ("normalized", 27, "ln2"), ("attn", 3),
                                     ("value", 0), ("q_input", 2), ("resid_mid", 1), ("scale", 0, "ln1"),
                                     ("scale",), ("normalized",), ("result", 3), ("rot_k", 1)]
    bad = [c for c in calls if utils.get_act_name(*c) != tlu.get_act_name(*c)]
    print(f"{'ok ' if not bad else 'BAD'} get_act_name on {len(calls)} calls {bad}")
    FAILED.extend(str(b) for b in bad)
    g = torch.Generator().manual_seed(1)
    logits, toks = torch.randn(2, 5, 9, generator=g), torch.randint(0, 9, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    for kw in (dict(), dict(per_token=True), dict(attention_mask=mask), dict(attention_mask=mask, per_token=True)):
        check(f"lm_cross_entropy_loss {kw}", utils.lm_cross_entropy_loss(logits, toks, **kw),
              tlu.lm_cross_entropy_loss(logits, toks, **kw))
    x = torch.arange(24).reshape(2, 3, 4)
    for s in (None, 1, -1, (2,), (0, 2), (0, 3, 2), [0, 2], torch.tensor([1])):
        for dim in (0, 1, -1):
            if isinstance(s, int) and abs(s) >= x.shape[dim] or (isinstance(s, list) and x.shape[dim] < 3):
                continue
            check(f"Slice({s}).apply(dim={dim})", utils.Slice(s).apply(x, dim), tlu.Slice(s).apply(x, dim))
    from datasets import Dataset

    from tests.explorer.tiny import char_tokenizer

    tok = char_tokenizer()
    ds = Dataset.from_dict({"text": ["abc def", "ghij", "k", "lmnopq rst"]})
    for kw in (dict(max_length=4), dict(max_length=5, add_bos_token=False), dict(max_length=64)):
        ours = torch.stack(list(utils.tokenize_and_concatenate(ds, tok, num_proc=None, **kw)["tokens"]))
        theirs = torch.stack(list(tlu.tokenize_and_concatenate(ds, tok, num_proc=None, **kw)["tokens"]))
        check(f"tokenize_and_concatenate {kw}", ours.float(), theirs.float())


def compare_factored_matrix() -> None:
    from transformer_lens import FactoredMatrix as TLFM

    from fxlens.interventions.factored_matrix import FactoredMatrix

    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(3, 10, 4, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    ours, theirs = FactoredMatrix(A, B), TLFM(A, B)
    x = torch.randn(10, 7, generator=g, dtype=torch.float64)
    for name in ("AB", "BA", "U", "S", "V", "eigenvalues"):
        o, t = getattr(ours, name), getattr(theirs, name)
        check(f"FactoredMatrix.{name}", torch.view_as_real(o) if o.is_complex() else o,
              torch.view_as_real(t) if t.is_complex() else t)
    for name, f in (("norm()", lambda fm: fm.norm()), ("make_even().AB", lambda fm: fm.make_even().AB),
                    ("make_even().A", lambda fm: fm.make_even().A), ("collapse_l()", lambda fm: fm.collapse_l()),
                    ("collapse_r()", lambda fm: fm.collapse_r()), ("T.AB", lambda fm: fm.T.AB),
                    ("get_corner(2)", lambda fm: fm.get_corner(2)), ("(fm @ x).AB", lambda fm: (fm @ x).AB),
                    ("(x.T @ fm).A", lambda fm: (x.T @ fm).A), ("(fm @ fm).AB", lambda fm: (fm @ fm).AB),
                    ("(fm * 2).A", lambda fm: (fm * 2).A), ("unsqueeze(0).AB", lambda fm: fm.unsqueeze(0).AB),
                    ("fm @ v", lambda fm: fm @ x[:, 0])):
        check(f"FactoredMatrix.{name}", f(ours), f(theirs))
    for idx in (1, (1, 2), (1, 2, 3), (-1, -1, -1), (slice(None), [0, 2], slice(1, 3)), (Ellipsis, 3), (0, Ellipsis)):
        check(f"FactoredMatrix[{idx}]", ours[idx].AB, theirs[idx].AB)
    ok = repr(ours) == repr(theirs)
    print(f"{'ok ' if ok else 'BAD'} FactoredMatrix repr {repr(ours)!r}")
    if not ok:
        FAILED.append("repr")


def compare_evals() -> None:
    import transformers
    from transformer_lens import evals as tl_evals

    import fxlens
    from fxlens.interventions import evals
    from tests.conftest import _LLAMA_LIKE

    cfg = transformers.AutoConfig.for_model("llama", vocab_size=20000, bos_token_id=1, **_LLAMA_LIKE)
    torch.manual_seed(0)
    m = fxlens.trace(transformers.AutoModelForCausalLM.from_config(cfg).eval(), graph_cache=False)
    tok = SimpleNamespace(bos_token_id=1)

    class TLView:  # what TL's induction_loss reads
        cfg = SimpleNamespace(default_prepend_bos=True)
        tokenizer = tok

        def __call__(self, *args, **kwargs):
            return m(*args, **kwargs)

    for bos in (None, False):
        torch.manual_seed(5)
        theirs = tl_evals.induction_loss(TLView(), batch_size=3, subseq_len=12, prepend_bos=bos, device="cpu")
        torch.manual_seed(5)
        ours = evals.induction_loss(m, tokenizer=tok, batch_size=3, subseq_len=12, prepend_bos=bos)
        check(f"induction_loss(prepend_bos={bos})", ours.reshape(1), theirs.reshape(1))


def main() -> int:
    torch.manual_seed(0)
    for family in ("llama", "gpt2", "gpt_neox", "opt"):
        for batch in (2, 1):
            compare_analysis(family, batch)
    compare_utils()
    compare_factored_matrix()
    compare_evals()
    print(f"{len(FAILED)} mismatches" + (f": {FAILED}" if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
