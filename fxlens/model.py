"""``HookedModel``: the TransformerLens API over a captured, specialised HF graph.

Every forward goes through one entry, :meth:`HookedModel.run`: it checks the input, checks the
graph still matches the HF model (re-binding or re-capturing it if the model changed), picks
the specialised graph for the call's signature (cached sites, hooked sites, where to stop) and
runs it with the call's hooks (see :mod:`fxlens.hooks`). The forward, ``run_with_cache``,
``run_with_hooks``, patching sweeps, generation, lenses and the explorer all use it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import fx, nn

from . import head_results
from .binding import Snapshot, fingerprint, rebind
from .cache import ActivationCache
from .config import ModelConfig
from .hook_api import HookAPIMixin, HookList, NameFilter
from .hooks import StoreCall, calling
from .inputs import model_inputs
from .interventions.weights import WeightsMixin
from .loss import lm_loss
from .tl_modules import TLModulesMixin
from .tokens import TokenMixin
from .tracer.families import Family
from .tracer.graph import release_source
from .tracer.sites import Site, layer_of, site_dims, site_rank, spec
from .tracer.specialise import Request, specialise, split_index
from .tracer.taps import TapRun, build_tap_graph, tappable

_MAX_GRAPHS = 32
_SPLIT_SUFFIXES = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")


@dataclass
class Run:
    """The result of :meth:`HookedModel.run`: inputs as run, the output, the cached sites."""

    ids: torch.Tensor
    mask: torch.Tensor
    out: torch.Tensor
    cache: dict[str, torch.Tensor] = field(default_factory=dict)


class HookedModel(HookAPIMixin, TLModulesMixin, TokenMixin, WeightsMixin):
    """An HF model with TransformerLens hook sites, cache and hook API.

    Build one with :func:`fxlens.from_pretrained` or :func:`fxlens.trace`. The HF model
    stays usable and shares its parameters with the graph.
    """

    def __init__(self, hf_model: nn.Module, tokenizer, graph: fx.GraphModule, output: str, family: Family,
                 sites: dict[str, Site], cfg: ModelConfig, compile: bool = False, capture_seconds: float = 0.0,
                 recapture: Callable[[nn.Module], HookedModel] | None = None):
        from .hooks import HookStore

        self.hf_model, self.tokenizer, self.compile = hf_model, tokenizer, compile
        self.capture_seconds = capture_seconds
        self._hooks = HookStore()
        self._lock = threading.RLock()
        self._recapture = recapture
        self.graph_from_cache = False  # set by trace(): graph and sites came from the disk cache
        self.use_split_inputs = False
        self._adopt(graph, output, family, sites, cfg)

    def _adopt(self, graph: fx.GraphModule, output: str, family: Family, sites: dict[str, Site],
               cfg: ModelConfig) -> None:
        """Take a (new) captured graph; drop everything derived from the old one."""
        self._base, self._sites, self.output_kind, self.family, self.cfg = graph, sites, output, family, cfg
        for old in (*getattr(self, "_graphs", {}).values(), getattr(self, "_taps", None)):
            release_source(old)
        self._taps: fx.GraphModule | None = None
        self._graphs: OrderedDict[Request, Callable] = OrderedDict()
        self._memo: dict = {}
        self._split_index: dict | None = None
        self.all_hook_names: list[str] = sorted(sites, key=self._site_order)
        self._bound = fingerprint(self.hf_model)
        self._snapshot = Snapshot(self.hf_model)

    def extra_hook_names(self, listed: bool = False) -> list[str]:
        """``attn.hook_result`` (hookable, not a graph site; see :mod:`fxlens.head_results`)."""
        return head_results.result_names(self, listed)

    def _site_order(self, name: str) -> tuple:
        return site_rank(name, self.cfg.n_layers)

    @property
    def hook_names(self) -> list[str]:
        """Site names in forward order. Split-input sites (``hook_attn_in``, ``hook_{q,k,v}_input``)
        recompute ln1 and the projections once per head, so, as in TransformerLens, they are
        listed (and matched by filters) only when ``use_split_inputs`` is True; by full name
        they always work."""
        if self.use_split_inputs:
            return list(self.all_hook_names)
        return [n for n in self.all_hook_names if not n.endswith(_SPLIT_SUFFIXES)]

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def sites(self) -> dict[str, Site]:
        """Site name -> where it sits in the graph."""
        return dict(self._sites)

    @property
    def base_graph(self) -> fx.GraphModule:
        """The captured graph (no sites exposed); checked against the HF model first."""
        self.ensure_fresh()
        return self._base

    # -- graphs ---------------------------------------------------------------
    def ensure_fresh(self) -> None:
        """Re-bind or re-capture the graph if the HF model changed since it was captured.

        Replaced tensors (same names, shapes, dtypes, devices) are re-bound; any other change
        (shapes, dtype/device moves, module attributes or config values the graph baked in,
        added or removed modules) re-captures the model. In-place value edits need neither.
        """
        with self._lock:
            if self._snapshot.unchanged():
                return
            now = fingerprint(self.hf_model)
            if now == self._bound:
                self._snapshot = Snapshot(self.hf_model)
                return
            if now.training:
                raise RuntimeError(f"the HF model is in training mode ({now.training[0]} and others): fxlens runs "
                                   "the eval-mode graph it captured. Call model.hf_model.eval() first.")
            if now.structure == self._bound.structure:
                self._adopt(rebind(self._base, self.hf_model), self.output_kind, self.family, self._sites, self.cfg)
                return
            new = self.retrace(self.hf_model)
            self._adopt(new._base, new.output_kind, new.family, new._sites, new.cfg)
            self.capture_seconds = new.capture_seconds

    def retrace(self, hf_model: nn.Module) -> HookedModel:
        """A new model over ``hf_model``, traced the way this one was (tokenizer, compile, class, graph cache)."""
        if self._recapture is None:
            raise RuntimeError("this model was not built by fxlens.trace / from_pretrained, so it cannot trace the "
                               "HF model again; trace it with fxlens.trace")
        return self._recapture(hf_model)

    def graph(self, req: Request) -> Callable:
        """The graph for ``req`` (built once, LRU-cached, compiled if the model is)."""
        with self._lock:
            fn = self._graphs.get(req)
            if fn is None:
                if self._tappable(req):
                    fn = TapRun(self._tap_graph(), self._sites, req.cache)
                else:
                    gm = self._base if req == Request() else self.specialised(req)
                    fn = torch.compile(gm, dynamic=True) if self.compile else gm
                self._graphs[req] = fn
                if len(self._graphs) > _MAX_GRAPHS:
                    release_source(self._graphs.popitem(last=False)[1])
            else:
                self._graphs.move_to_end(req)
            return fn

    def _tappable(self, req: Request) -> bool:
        """Cache-only requests of captured-graph sites run through the shared tap graph (uncompiled models)."""
        return (bool(req.cache) and not req.hooks and req.stop_at_layer is None and not self.compile
                and all(tappable(self._sites[n]) for n in req.cache))

    def _tap_graph(self) -> fx.GraphModule:
        if self._taps is None:
            self._taps = build_tap_graph(self._base, self._sites)
        return self._taps

    def specialised(self, req: Request) -> fx.GraphModule:
        """A new (uncompiled) graph module for ``req``: ``(input_ids, attention_mask) -> (out, *cached)``."""
        split = any(n.endswith(_SPLIT_SUFFIXES) for n in (*req.cache, *req.hooks))
        return specialise(self._base, self._sites, req, self.cfg.n_layers, self.hf_model,
                          self.split_index() if split else None)

    def split_index(self) -> dict:
        """Feature index of every q/k/v head in its projection (probed once per graph)."""
        with self._lock:
            if self._split_index is None:
                self._split_index = split_index(self._base, self._sites, self.cfg.n_layers)
            return self._split_index

    def memo(self, key, factory: Callable[[], object]):
        """A value derived from the current graph, built once (dropped when the graph is rebuilt)."""
        with self._lock:
            if key not in self._memo:
                if len(self._memo) >= 8:
                    self._memo.pop(next(iter(self._memo)))
                self._memo[key] = factory()
            return self._memo[key]

    # -- the execution entry ----------------------------------------------------
    def run(self, input, *, names: Sequence[str] = (), fwd_hooks: HookList = (), bwd_hooks: HookList = (),
            use_model_hooks: bool = True, stop_at_layer: int | None = None, attention_mask=None,
            prepend_bos: bool | None = None, padding_side: str | None = None) -> Run:
        """Run the model once: the one place every forward goes through.

        Args:
            input: text, a list of texts, or token ids ``[batch, pos]``.
            names: sites to cache (full names, checked); values are detached.
            fwd_hooks / bwd_hooks: hooks for this call only, added after the model's.
            use_model_hooks: also run the hooks visible to this thread (model-wide and contexts).
            stop_at_layer: return the residual stream entering this block instead of the output.
            attention_mask: ``[batch, pos]`` 0/1 (text input makes its own).
        """
        self.ensure_fresh()
        extra = tuple(self.hook_entries(fwd_hooks, "fwd") + self.hook_entries(bwd_hooks, "bwd"))
        names = tuple(self.resolve(list(names)))
        stop = self._stop(stop_at_layer)
        ids, mask = model_inputs(self, input, attention_mask, prepend_bos, padding_side)
        hooked = frozenset(h.site for h in ((*self._hooks.entries(), *extra) if use_model_hooks else extra))
        expand = None
        if any(map(head_results.is_result, hooked)):
            head_results.check_exact(self)
            hooked = frozenset(g for s in hooked for g in head_results.graph_sites(s))
            expand = partial(head_results.expand, W_O=lambda L: self.W_O[L], point=self._hooks.point)
        with calling(StoreCall(self._hooks, hooked, extra, use_model_hooks, expand)):
            out = self.graph(Request(cache=names, hooks=hooked, stop_at_layer=stop))(ids, mask)
        out = out if isinstance(out, tuple) else (out,)
        return Run(ids, mask, out[0], {n: v.detach() for n, v in zip(names, out[1:])})

    def _stop(self, stop_at_layer: int | None) -> int | None:
        if stop_at_layer is None:
            return None
        n = self.cfg.n_layers
        if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int) or not -n <= stop_at_layer <= n:
            raise ValueError(f"stop_at_layer must be an int in [-{n}, {n}], not {stop_at_layer!r}")
        return stop_at_layer + n if stop_at_layer < 0 else stop_at_layer

    def _finish(self, run: Run, return_type: str | None, stopped: bool, loss_per_token: bool = False):
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, not {return_type!r}")
        if return_type is None:
            return None
        if return_type == "logits" or stopped:
            return run.out
        if self.output_kind != "logits":
            raise ValueError("loss needs logits; this model returns hidden states (load a *ForCausalLM model)")
        loss = lm_loss(run.out, run.ids, run.mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (run.out, loss)

    # -- public API -----------------------------------------------------------
    def __call__(self, input, return_type: str | None = "logits", loss_per_token: bool = False, *,
                 attention_mask=None, stop_at_layer: int | None = None, prepend_bos: bool | None = None,
                 padding_side: str | None = None, **unsupported):
        """Run the model. ``input``: string, list of strings, or token ids ``[batch, pos]``.

        ``return_type``: ``"logits"``, ``"loss"``, ``"both"`` or ``None``; ``loss_per_token``
        gives the loss as ``[batch, pos - 1]``.
        """
        _refuse(unsupported)
        run = self.run(input, attention_mask=attention_mask, stop_at_layer=stop_at_layer, prepend_bos=prepend_bos,
                       padding_side=padding_side)
        return self._finish(run, return_type, stop_at_layer is not None, loss_per_token)

    forward = __call__

    def run_with_cache(self, input, names_filter: NameFilter = None, stop_at_layer: int | None = None,
                       remove_batch_dim: bool = False, return_type: str | None = "logits", *,
                       attention_mask=None, incl_bwd: bool = False, device=None, pos_slice=None,
                       reset_hooks_end: bool = True, clear_contexts: bool = False, loss_per_token: bool = False,
                       return_cache_object: bool = True, prepend_bos: bool | None = None,
                       padding_side: str | None = None, **unsupported) -> tuple:
        """Run and return ``(output, cache)``; only the sites selected by ``names_filter`` are kept.

        ``incl_bwd=True`` also runs ``output.backward()`` (the output must be a scalar, e.g.
        ``return_type="loss"``) and caches each site's gradient as ``name + "_grad"``.
        """
        _refuse(unsupported)
        stop = self._stop(stop_at_layer)
        names_filter, results = self._split_results(names_filter, stop)
        # a hooked attn.hook_result is cached after its hooks, as TL's caching hook runs after the user's
        hooked_results = sorted(set(results) & {h.site for h in self._hooks.entries()})
        results = [r for r in results if r not in hooked_results]
        names = self.resolve(names_filter)
        names_kept = set(names)
        names += [z for z in (r.replace("hook_result", "hook_z") for r in results) if z not in names]
        if stop is not None:
            late = [n for n in names if (layer_of(n) is not None and layer_of(n) >= stop)
                    or (layer_of(n) is None and n.startswith("ln_final"))]
            if late and not callable(names_filter) and names_filter is not None:
                raise ValueError(f"stop_at_layer={stop_at_layer} stops before {late[:3]}")
            names = [n for n in names if n not in late]
        grads: dict[str, torch.Tensor] = {}
        bwd = [(n, lambda g, hook: grads.__setitem__(hook.name + "_grad", g.detach())) for n in names] if incl_bwd \
            else []
        kept: dict[str, torch.Tensor] = {}
        fwd = [(r, lambda x, hook: kept.__setitem__(hook.name, x.detach())) for r in hooked_results]
        with torch.enable_grad() if incl_bwd else nullcontext():
            run = self.run(input, names=names, fwd_hooks=fwd, bwd_hooks=bwd, stop_at_layer=stop_at_layer,
                           attention_mask=attention_mask, prepend_bos=prepend_bos, padding_side=padding_side)
            out = self._finish(run, return_type, stop is not None, loss_per_token)
            if incl_bwd:
                target = out[1] if isinstance(out, tuple) else out
                if not isinstance(target, torch.Tensor) or target.numel() != 1:
                    raise ValueError("incl_bwd=True runs output.backward(): use return_type='loss' (a scalar)")
                target.backward()
        data = dict(run.cache) | kept
        if results:
            from .interventions.analysis import head_results

            z_only = ActivationCache(data, model=self)
            data.update({r: head_results(z_only, self, layer_of(r)) for r in results})
            data = {k: v for k, v in data.items() if k in names_kept or k in results or k in kept}  # z only for them
        data.update({k: grads[k] for k in sorted(grads, key=lambda k: names.index(k[:-5]))})
        if pos_slice is not None:
            data = {k: _slice_pos(k[:-5] if k.endswith("_grad") else k, v, pos_slice) for k, v in data.items()}
        if device is not None:
            data = {k: v.to(device) for k, v in data.items()}
        cache = ActivationCache(data, model=self)
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        return out, (cache if return_cache_object else dict(cache.items()))

    def _split_results(self, names_filter: NameFilter, stop: int | None) -> tuple[NameFilter, list[str]]:
        """``attn.hook_result`` names (computed from ``hook_z``; TL's ``use_attn_result``) split off the filter."""
        every = [f"blocks.{L}.attn.hook_result" for L in range(self.cfg.n_layers if stop is None else stop)]
        if names_filter is None:
            return None, every if self.cfg.use_attn_result else []
        if callable(names_filter):
            return names_filter, [r for r in every if self.cfg.use_attn_result and names_filter(r)]
        names = [names_filter] if isinstance(names_filter, str) else names_filter
        if isinstance(names, (list, tuple, set, frozenset)) and any(isinstance(n, str) and n.endswith(
                "attn.hook_result") for n in names):
            res = [n for n in names if isinstance(n, str) and n.endswith("attn.hook_result")]
            if not self.cfg.use_attn_result:
                raise KeyError(f"{res[0]} needs model.set_use_attn_result(True) (as in TransformerLens)")
            return [n for n in names if n not in res], res
        return names_filter, []

    def run_with_hooks(self, input, fwd_hooks: HookList = (), bwd_hooks: HookList = (),
                       reset_hooks_end: bool = True, clear_contexts: bool = False,
                       return_type: str | None = "logits", **kwargs):
        """Run with temporary hooks ``[(name or predicate, fn(tensor, hook))]``."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            return self(input, return_type=return_type, **kwargs)

    def site_table(self) -> list[dict]:
        """One row per site: name, shape, HF module path, how it was found."""
        return [{"name": n, "shape": spec(n).shape, "module": self._sites[n].module,
                 "found_by": self._sites[n].found_by} for n in self.all_hook_names]

    def patch(self, patches):
        """Context applying ``{site: Patch or [patches]}`` (see :mod:`fxlens.interventions.patches`)."""
        from .interventions.patches import patch_context

        return patch_context(self, patches)

    def process_weights(self, *, fold_ln: bool = True, center_writing_weights: bool | None = None,
                        center_unembed: bool = True, fold_value_biases: bool = False) -> HookedModel:
        """A copy with TransformerLens' weight processing (see :mod:`fxlens.interventions.processing`)."""
        from .interventions.processing import process_weights

        return process_weights(self, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                               center_unembed=center_unembed, fold_value_biases=fold_value_biases)

    def generate(self, input, max_new_tokens: int = 10, *, fwd_hooks=(), **hf_kwargs):
        """HF ``generate`` (KV cache) with hooks at every step (see :mod:`fxlens.interventions.generate`)."""
        from .interventions.generate import generate

        return generate(self, input, max_new_tokens, fwd_hooks=fwd_hooks, **hf_kwargs)

    # -- moving the model -------------------------------------------------------
    def to(self, *args, **kwargs) -> HookedModel:
        """Move the HF model (device and/or dtype, as ``nn.Module.to``); the graph follows on the next call."""
        self.hf_model.to(*args, **kwargs)
        self.ensure_fresh()
        return self

    def cpu(self) -> HookedModel:
        return self.to("cpu")

    def cuda(self, device: int | str | None = None) -> HookedModel:
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def half(self) -> HookedModel:
        return self.to(torch.float16)

    def float(self) -> HookedModel:
        return self.to(torch.float32)

    def bfloat16(self) -> HookedModel:
        return self.to(torch.bfloat16)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedModel({c.family}: {c.n_layers} layers, d_model={c.d_model}, heads={c.n_heads}/"
                f"{c.n_kv_heads}, {len(self.hook_names)} sites)")


def _refuse(unsupported: dict) -> None:
    if unsupported:
        raise TypeError(f"unsupported keyword(s) {sorted(unsupported)}: fxlens' forward takes return_type, "
                        "loss_per_token, attention_mask, stop_at_layer, prepend_bos and padding_side")


def _slice_pos(name: str, x: torch.Tensor, pos_slice) -> torch.Tensor:
    dims = site_dims(name)
    ax = next((i for i, d in enumerate(dims) if d in ("pos", "q_pos")), None)
    if ax is None:
        return x
    from .utils import Slice

    return Slice(pos_slice).apply(x, dim=ax)  # TL's Slice: an int drops the dim

