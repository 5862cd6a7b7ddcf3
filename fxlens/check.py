"""Check every site's value against references that do not come from fxlens' graph.

References: HF ``hidden_states`` (residual stream entering each block), PyTorch forward
hooks on the HF modules a site names (embeddings, norm outputs and inputs, attention
and MLP outputs, q/k/v projections, MLP activations), eager attention weights for
``hook_pattern``, and two identities that tie the sites together: the embeddings plus
every branch output sum to the last ``resid_post`` (what ``decompose_resid`` relies on),
per-head results through ``W_O`` sum to ``hook_attn_out``, and the embedding / unembedding
weights reproduce ``hook_embed`` and the logits (``W_E[ids]``, ``ln_final.hook_out @ W_U + b_U``).

Documented scalings are part of the reference: Granite multiplies the embedding by
``embedding_multiplier`` and every branch output by ``residual_multiplier`` before the
residual add (MiniCPM by ``scale_depth / sqrt(num_hidden_layers)``), CTRL its embedding by
``sqrt(n_embd)`` (Gemma's ``sqrt(d_model)`` is inside its embedding module's output). Hooks record
copies, so later in-place edits do not reach them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .check_latent import check_attention_inputs
from .interventions.analysis import decompose_resid, head_results

TOL = 1e-4  # relative to max(1, |reference|): fp32 tiny models agree to ~1e-6; a wrong tensor is off by ~1e-1


_REQUIRED = ("resid", "embed", "attn_out", "mlp_out", "qkv", "pattern", "decompose")
_MAY_SKIP = ("heads", "weights")


@dataclass
class ClassResult:
    """Outcome for one site class: worst error over its sites, or why it was not checked."""

    max_err: float = 0.0
    n: int = 0
    worst: str = ""
    skipped: str = ""

    @property
    def ok(self) -> bool:
        """Checked at least once and within tolerance."""
        return not self.skipped and self.n > 0 and self.max_err <= TOL


@dataclass
class SiteCheck:
    """Per-site-class results (``resid``, ``embed``, ``norm``, ``attn_out``, ...)."""

    classes: dict[str, ClassResult] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every class passed; only ``heads`` may be skipped, where branch outputs are renormalised."""
        return (all(c.ok or (c.skipped and k in _MAY_SKIP) for k, c in self.classes.items())
                and all(k in self.classes for k in _REQUIRED))

    @property
    def failed(self) -> dict[str, ClassResult]:
        """Classes whose values differ from the reference."""
        return {k: c for k, c in self.classes.items() if not c.ok and not c.skipped}

    @property
    def skipped(self) -> dict[str, str]:
        """Classes that could not be checked, with the reason."""
        return {k: c.skipped for k, c in self.classes.items() if c.skipped}

    def summary(self) -> str:
        """``attn_out 3.1e-01 (blocks.0.hook_attn_out); ...`` for failures, ``ok`` otherwise."""
        bad = [f"{k} {c.max_err:.1e} ({c.worst})" for k, c in self.failed.items()]
        bad += [f"{k} unchecked: {why}" for k, why in self.skipped.items() if k not in _MAY_SKIP]
        bad += [f"{k} unchecked" for k in _REQUIRED if k not in self.classes]
        return "; ".join(bad) if bad else "ok"

    def _record(self, cls: str, name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        res = self.classes.setdefault(cls, ClassResult())
        got, ref = got.detach().double(), ref.detach().double()
        if got.shape != ref.shape:
            if got.numel() != ref.numel():
                err = math.inf
            else:
                ref = ref.reshape(got.shape)
        if got.shape == ref.shape:
            finite = torch.isfinite(ref)
            scale = max(1.0, ref[finite].abs().max().item() if finite.any() else 1.0)
            same_inf = (got == ref) | (torch.isnan(got) & torch.isnan(ref))
            err = ((got - ref).abs().where(~same_inf, torch.zeros_like(got)).max().item() / scale)
        err = math.inf if math.isnan(err) else err  # a NaN where the reference has a number is a failure
        res.n += 1
        if err > res.max_err or not res.worst:
            res.max_err, res.worst = max(res.max_err, err), name

    def _skip(self, cls: str, why: str) -> None:
        if cls not in self.classes or not self.classes[cls].n:
            self.classes[cls] = ClassResult(skipped=why)


def _copy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    return (tuple if isinstance(x, tuple) else list)(_copy(v) for v in x) if isinstance(x, (tuple, list)) else x


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class _Recorder:
    """Forward hooks on named HF modules: each path gets its call's input and output.

    A module object reached under several paths (a shared activation) is called once per
    path, in layer order; the i-th call belongs to the i-th path. Paths whose call count
    does not match are left out (no reference rather than a wrong one).
    """

    def __init__(self, root: nn.Module, paths: set[str]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, object] = {}
        self._calls: dict[int, list] = defaultdict(list)
        self._paths: dict[int, list[str]] = defaultdict(list)
        self._handles = []
        for p in sorted(paths, key=_layer_key):
            try:
                mod = root.get_submodule(p)
            except AttributeError:
                continue
            if not self._paths[id(mod)]:
                self._handles.append(mod.register_forward_hook(self._hook(id(mod)), with_kwargs=True))
            self._paths[id(mod)].append(p)

    def _hook(self, key: int):
        def fn(mod, args, kwargs, out):  # copies: the model may later mutate them in place (GIT's embeddings +=)
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            self._calls[key].append((_copy(x), _copy(out)))
        return fn

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for key, paths in self._paths.items():
            calls = self._calls.get(key, [])
            if len(paths) > 1 and len(calls) != len(paths):
                continue
            for p, (x, out) in zip(paths, calls):
                self.inputs[p], self.outputs[p] = x, out


def _layer_key(path: str) -> tuple:
    return tuple(int(t) if t.isdigit() else -1 for t in path.split(".")), path


def _multiplier(config, name: str) -> float:
    v = getattr(config, name, None)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 1.0


def _residual_scale(config) -> float:
    """Granite's ``residual_multiplier``; MiniCPM's ``scale_depth / sqrt(num_hidden_layers)`` on every branch."""
    if isinstance(getattr(config, "scale_depth", None), (int, float)) and getattr(config, "model_type", "") in (
            "minicpm", "minicpm3"):
        return float(config.scale_depth) / math.sqrt(config.num_hidden_layers)
    return _multiplier(config, "residual_multiplier")


def _embed_scale(config) -> float:
    """Granite's ``embedding_multiplier``, CTRL's ``sqrt(n_embd)`` (in its forward, ``inputs_embeds *= ...``);
    Gemma's ``sqrt(d_model)`` sits inside its embedding module."""
    if getattr(config, "model_type", None) == "ctrl":
        return math.sqrt(config.n_embd)
    return _multiplier(config, "embedding_multiplier")


def _eps(mod: nn.Module) -> float:
    for k in ("eps", "variance_epsilon", "variance_eps", "epsilon"):
        v = getattr(mod, k, None)
        if isinstance(v, float):
            return v
    return 1e-5


def _centres(mod: nn.Module, x: torch.Tensor) -> bool:
    """LayerNorm (centring) or RMSNorm? LayerNorm's output ignores a constant shift of its input."""
    with torch.no_grad():
        a, b = _first(mod(x)), _first(mod(x + 3.0))
    return bool(torch.allclose(a, b, atol=1e-4, rtol=1e-4))


def _ref_scale(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's scale from its input: ``sqrt(var + eps)`` (LayerNorm) or ``sqrt(mean(x^2) + eps)``."""
    xd = x.double()
    if _centres(mod, x):
        return (xd.var(-1, keepdim=True, unbiased=False) + _eps(mod)).sqrt()
    return (xd.pow(2).mean(-1, keepdim=True) + _eps(mod)).sqrt()


def check_sites(model, ids: torch.Tensor | None = None) -> SiteCheck:
    """Compare every site class of ``model`` (a ``HookedModel``) with references from its HF model.

    Returns a :class:`SiteCheck`; ``.ok`` is the stricter "green". Nothing here reads the
    captured graph: the HF model is run with forward hooks.
    """
    hf, fam, sites, n = model.hf_model, model.family, model.sites, model.cfg.n_layers
    config = getattr(hf.config, "text_config", None) or hf.config
    if ids is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, max(4, min(int(config.vocab_size), 250)), (2, 7), generator=g)
    ids = ids.to(model.device)
    mask = torch.ones_like(ids)
    res = SiteCheck()
    logits, cache = model.run_with_cache(ids)
    mods = {s.module for s in sites.values() if s.module}
    mods |= {s.extra["proj_module"] for s in sites.values() if "proj_module" in s.extra}
    mods |= {fam.block(L, "") for L in range(n)} | {fam.block(L, fam.attn) for L in range(n)}
    for rel in (fam.attn_post_norm, fam.mlp_post_norm):
        if rel:
            mods |= {fam.block(L, rel) for L in range(n)}
    rec = _Recorder(hf, mods)
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        rec.close()
    hs = getattr(out, "hidden_states", None) or getattr(out, "decoder_hidden_states", None)
    _check_resid(res, model, cache, hs, rec)
    _check_modules(res, model, cache, rec, config)
    _check_identities(res, model, cache, config)
    _check_pattern(res, model, cache, ids, mask, rec)
    check_attention_inputs(res, model, cache, ids, mask)
    _check_weights(res, model, cache, ids, logits, config)
    return res


def _check_weights(res: SiteCheck, model, cache, ids, logits, config) -> None:
    """``W_E[ids] == hook_embed`` and ``ln_final.hook_out @ W_U + b_U == logits`` (the scales included)."""
    try:
        if "hook_embed" in cache:
            res._record("weights", "W_E[ids] vs hook_embed", model.W_E[ids], cache["hook_embed"])
        if model.output_kind != "logits" or "ln_final.hook_out" not in cache:
            res._skip("weights", "no LM head after a final norm")
        elif getattr(config, "final_logit_softcapping", None):
            res._skip("weights", "final logit soft-capping: W_U is the map before the cap")
        else:
            res._record("weights", "ln_final.hook_out @ W_U + b_U vs logits",
                        cache["ln_final.hook_out"] @ model.W_U + model.b_U, logits)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        res._skip("weights", f"{type(e).__name__}: {e}"[:160])


def _check_resid(res: SiteCheck, model, cache, hs, rec: _Recorder) -> None:
    fam, n = model.family, model.cfg.n_layers
    for L in range(n):
        block = fam.block(L, "")
        if hs is not None and len(hs) > L:
            res._record("resid", f"blocks.{L}.hook_resid_pre", cache[f"blocks.{L}.hook_resid_pre"], hs[L])
        elif block in rec.inputs:
            res._record("resid", f"blocks.{L}.hook_resid_pre", cache[f"blocks.{L}.hook_resid_pre"], rec.inputs[block])
        if block in rec.outputs:
            post = cache[f"blocks.{L}.ln2.hook_out"] if fam.post_norm else cache[f"blocks.{L}.hook_resid_post"]
            res._record("resid", f"blocks.{L}.hook_resid_post", post, _first(rec.outputs[block]))
    if not res.classes.get("resid"):
        res._skip("resid", "no hidden_states and no block hooks fired")


def _check_modules(res: SiteCheck, model, cache, rec: _Recorder, config) -> None:
    fam, sites, hf = model.family, model.sites, model.hf_model
    rmul = _residual_scale(config)
    for name, site in sites.items():
        if name not in cache:
            continue
        got, mod_path = cache[name], site.module
        out = _first(rec.outputs.get(mod_path))
        inp = rec.inputs.get(mod_path)
        leaf = name.rsplit(".", 1)[-1]
        if name == "hook_embed" and out is not None:
            res._record("embed", name, got, out * _embed_scale(config))
        elif name == "hook_pos_embed" and out is not None:  # either side may be unbatched or batch 1
            got, out = torch.broadcast_tensors(got, out) if got.dim() != out.dim() or got.shape[0] == 1 \
                else (got, out.expand_as(got))
            res._record("embed", name, got, out)
        elif leaf == "hook_out" and out is not None:
            res._record("norm", name, got, out)
        elif leaf == "hook_normalized" and inp is not None:  # TL's pre-weight vector, from the module input
            mod = hf.get_submodule(mod_path)
            xd = inp.double()
            xc = xd - xd.mean(-1, keepdim=True) if _centres(mod, inp) else xd
            res._record("norm", name, got, (xc / _ref_scale(mod, inp)).to(got.dtype))
        elif leaf == "hook_scale" and inp is not None:
            res._record("norm", name, got, _ref_scale(hf.get_submodule(mod_path), inp))
        elif leaf in ("hook_attn_out", "hook_mlp_out"):
            L = int(name.split(".")[1])
            post = fam.attn_post_norm if leaf == "hook_attn_out" else fam.mlp_post_norm
            path = fam.block(L, post) if post else mod_path
            ref = _first(rec.outputs.get(path))
            if ref is not None:
                res._record(leaf[5:], name, got, ref * rmul)
        elif leaf in ("hook_pre", "hook_post") and inp is not None:
            res._record("mlp_act", name, got, inp)
        elif leaf in ("hook_q", "hook_k", "hook_v") and not site.extra.get("attention_input"):
            _check_qkv(res, name, site, got, _first(rec.outputs.get(site.extra.get("proj_module"))), model)


def _check_qkv(res: SiteCheck, name: str, site, got: torch.Tensor, proj_out, model) -> None:
    """``hook_q/k/v`` are the projection's output split into heads (before QK-norm and rotary)."""
    if proj_out is None:
        res._skip("qkv", f"projection module {site.extra.get('proj_module')} did not run")
        return
    if got.dim() != 4:  # not [batch, pos, heads, d_head]: the site is misplaced
        res._record("qkv", name, got, torch.full_like(got, math.nan))
        return
    B, S, H, D = got.shape
    width = proj_out.shape[-1]
    proj_out = proj_out.reshape(B, S, width)
    if width == H * D:
        res._record("qkv", name, got, proj_out.reshape(B, S, H, D))
        return
    # fused projection: one of the documented layouts of the HF modules (the best match is the reference)
    c = model.cfg
    which = name.rsplit("_", 1)[-1]
    sizes = {"q": c.n_heads * c.d_head, "k": c.n_kv_heads * c.d_head, "v": c.n_kv_heads * c.d_head}
    if sum(sizes.values()) != width:
        res._record("qkv", name, got, torch.full_like(got, math.nan))
        return
    start = {"q": 0, "k": sizes["q"], "v": sizes["q"] + sizes["k"]}[which]
    contiguous = proj_out[..., start:start + H * D].reshape(B, S, H, D)
    cands = [contiguous]
    if c.n_heads == c.n_kv_heads:
        cands.append(proj_out.reshape(B, S, H, 3, D)[..., "qkv".index(which), :])  # GPT-NeoX, per head
        if width % 12 == 0:  # CodeGen: 4 model-parallel blocks, each [q | v | k]
            blocks = proj_out.reshape(B, S, 4, 3, width // 12)[:, :, :, "qvk".index(which)]
            cands.append(blocks.reshape(B, S, H, D))
    errs = [((got - cand).abs().max().item(), cand) for cand in cands]
    res._record("qkv", name, got, min(errs, key=lambda e: e[0])[1])


def _check_identities(res: SiteCheck, model, cache, config) -> None:
    """Embeddings + branch outputs sum to the residual; head results sum to ``hook_attn_out``."""
    fam, n = model.family, model.cfg.n_layers
    if fam.post_norm:  # norm(x + sublayer(x)): each sum is what the following norm reads
        for L in range(n):
            p = f"blocks.{L}"
            if f"{p}.hook_resid_mid" in cache:
                res._record("decompose", f"{p}.hook_resid_mid",
                            cache[f"{p}.hook_resid_pre"] + cache[f"{p}.hook_attn_out"], cache[f"{p}.hook_resid_mid"])
            res._record("decompose", f"{p}.hook_resid_post",
                        cache[f"{p}.ln1.hook_out"] + cache[f"{p}.hook_mlp_out"], cache[f"{p}.hook_resid_post"])
        res._skip("heads", "post-norm blocks: hook_attn_out is checked against the HF module instead")
        return
    parts = [cache["hook_embed"]] + ([cache["hook_pos_embed"]] if "hook_pos_embed" in cache else [])
    embeds_sum = model.sites["hook_embed"].extra.get("sums_to_resid", True)
    if embeds_sum:
        res._record("decompose", "hook_embed (+pos) vs blocks.0.hook_resid_pre",
                    sum(p.expand_as(parts[0]) for p in parts), cache["blocks.0.hook_resid_pre"])
    for L in range(n):
        p = f"blocks.{L}"
        pre, a, m = cache[f"{p}.hook_resid_pre"], cache[f"{p}.hook_attn_out"], cache[f"{p}.hook_mlp_out"]
        if fam.parallel:
            res._record("decompose", f"{p}.hook_resid_post", pre + a + m, cache[f"{p}.hook_resid_post"])
        else:
            res._record("decompose", f"{p}.hook_resid_mid", pre + a, cache[f"{p}.hook_resid_mid"])
            res._record("decompose", f"{p}.hook_resid_post", cache[f"{p}.hook_resid_mid"] + m,
                        cache[f"{p}.hook_resid_post"])
    if fam.attn_post_norm or fam.mlp_post_norm:
        res._skip("heads", "branch outputs are renormalised before the residual add: not linear in heads")
        return
    try:
        if embeds_sum:
            total = decompose_resid(cache, model).sum(0)
        else:  # an embedding norm: decompose_resid must refuse the embeddings, and sums from resid_pre0
            try:
                decompose_resid(cache, model)
                res._record("decompose", "decompose_resid must refuse", torch.full_like(cache["hook_embed"], math.nan),
                            cache["hook_embed"])
            except ValueError:
                pass
            total = decompose_resid(cache, model, incl_embeds=False).sum(0) + cache["blocks.0.hook_resid_pre"]
        res._record("decompose", "decompose_resid sum", total, cache[f"blocks.{n - 1}.hook_resid_post"])
        for L in range(n):
            heads = head_results(cache, model, L).sum(2) + model.b_O[L]
            res._record("heads", f"blocks.{L} head results", heads, cache[f"blocks.{L}.hook_attn_out"])
    except (KeyError, ValueError, NotImplementedError, RuntimeError) as e:
        res._skip("heads", f"{type(e).__name__}: {e}"[:160])


def _check_pattern(res: SiteCheck, model, cache, ids, mask, rec_sdpa: _Recorder) -> None:
    """``hook_pattern`` against the attention weights HF's eager attention returns."""
    hf, fam, n = model.hf_model, model.family, model.cfg.n_layers
    paths = {fam.block(L, fam.attn): L for L in range(n)}
    impl = getattr(hf.config, "_attn_implementation", None)
    try:
        hf.set_attn_implementation("eager")
    except Exception as e:  # noqa: BLE001 - some families have no eager path
        res._skip("pattern", f"no eager attention: {type(e).__name__}")
        return
    rec = _Recorder(hf, set(paths))
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        rec.close()
        if impl:
            hf.set_attn_implementation(impl)
    returned = getattr(out, "attentions", None) or getattr(out, "decoder_attentions", None)
    for path, L in paths.items():
        out = rec.outputs.get(path)
        w = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
        if not isinstance(w, torch.Tensor) and returned is not None and len(returned) == n:
            w = returned[L]
        name = f"blocks.{L}.attn.hook_pattern"
        if name in cache and isinstance(w, torch.Tensor):
            res._record("pattern", name, cache[name], w)
    res._skip("pattern", "eager attention returned no weights")

