"""``HookedModel``: the TransformerLens API over a captured, specialised HF graph."""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn

from .cache import ActivationCache
from .config import ModelConfig
from .interventions.hooks import HookFn, HookRegistry, active
from .interventions.weights import WeightsMixin
from .loss import lm_loss
from .tokens import TokenMixin
from .tracer.families import Family
from .tracer.sites import Site, layer_of, site_rank, spec
from .tracer.specialise import Request, specialise, split_index

NameFilter = str | Iterable[str] | Callable[[str], bool] | None
_MAX_GRAPHS = 32
_SPLIT_SUFFIXES = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")


class HookedModel(TokenMixin, WeightsMixin):
    """An HF model with TransformerLens hook sites, cache and hook API.

    Build one with :func:`fxlens.from_pretrained` or :func:`fxlens.trace`. The HF model
    stays usable and shares its parameters with the graph.
    """

    def __init__(self, hf_model: nn.Module, tokenizer, graph: fx.GraphModule, output: str, family: Family,
                 sites: dict[str, Site], cfg: ModelConfig, compile: bool = False, capture_seconds: float = 0.0):
        self.hf_model, self.tokenizer, self.cfg, self.family = hf_model, tokenizer, cfg, family
        self.output_kind, self.compile, self.capture_seconds = output, compile, capture_seconds
        self._base, self._sites = graph, sites
        self._graphs: OrderedDict[Request, Callable] = OrderedDict()
        self._registry = HookRegistry()
        self._split_index: dict | None = None
        self.graph_from_cache = False  # set by trace(): graph and sites came from the disk cache
        self.last_attention_mask: torch.Tensor | None = None
        self.all_hook_names: list[str] = sorted(sites, key=self._site_order)
        self.use_split_inputs = False

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

    # -- names ----------------------------------------------------------------
    def resolve(self, names: NameFilter) -> list[str]:
        """Site names selected by a name, a list of names or a predicate (``None``: all)."""
        if names is None:
            return list(self.hook_names)
        if callable(names):
            return [n for n in self.hook_names if names(n)]
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in self._sites:
                close = difflib.get_close_matches(n, self.all_hook_names, n=5, cutoff=0.5)
                raise KeyError(f"unknown site {n!r} for this {self.cfg.family} model; closest: {close}")
        return sorted(set(names), key=self.all_hook_names.index)

    # -- graphs ---------------------------------------------------------------
    def _graph(self, req: Request) -> Callable:
        fn = self._graphs.get(req)
        if fn is None:
            gm = self._base if req == Request() else self._specialise(req)
            fn = torch.compile(gm, dynamic=True) if self.compile else gm
            self._graphs[req] = fn
            if len(self._graphs) > _MAX_GRAPHS:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(req)
        return fn

    def _specialise(self, req: Request) -> fx.GraphModule:
        split = any(n.endswith(_SPLIT_SUFFIXES) for n in (*req.cache, *req.hooks))
        if split and self._split_index is None:
            self._split_index = split_index(self._base, self._sites, self.cfg.n_layers)
        return specialise(self._base, self._sites, req, self.cfg.n_layers, self.hf_model, self._split_index)

    def _inputs(self, input, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(input, (str, list)) and not (isinstance(input, list) and input and isinstance(input[0], int)):
            ids = self.to_tokens(input)
            mask = self.last_attention_mask if attention_mask is None else attention_mask
        else:
            ids = torch.as_tensor(input, device=self.device)
            ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"empty or malformed input: token tensor of shape {tuple(ids.shape)}")
        if self.cfg.n_ctx and ids.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"input has {ids.shape[1]} tokens; this model's context is {self.cfg.n_ctx}. "
                             "Truncate the input or split it into chunks.")
        return ids.to(self.device), mask.to(self.device)

    def _run(self, input, req: Request, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor, list]:
        ids, mask = self._inputs(input, attention_mask)
        if req.stop_at_layer is not None and not 0 <= req.stop_at_layer <= self.cfg.n_layers:
            raise ValueError(f"stop_at_layer must be in [-{self.cfg.n_layers}, {self.cfg.n_layers}]")
        with torch.no_grad(), active(self._registry):
            out = self._graph(req)(ids, mask)
        out = out if isinstance(out, tuple) else (out,)
        return ids, out[0], list(out[1:])

    def _stop(self, stop_at_layer: int | None) -> int | None:
        return stop_at_layer + self.cfg.n_layers if stop_at_layer is not None and stop_at_layer < 0 else stop_at_layer

    def _finish(self, ids: torch.Tensor, out: torch.Tensor, return_type: str | None, stopped: bool,
                mask: torch.Tensor | None = None):
        if return_type is None:
            return None
        if return_type not in ("logits", "loss", "both"):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, not {return_type!r}")
        if return_type == "logits" or stopped:
            return out
        if self.output_kind != "logits":
            raise ValueError("loss needs logits; this model returns hidden states (load a *ForCausalLM model)")
        loss = lm_loss(out, ids, mask)
        return loss if return_type == "loss" else (out, loss)

    def _mask_for(self, input, attention_mask):
        if attention_mask is not None:
            return attention_mask
        return self.last_attention_mask if isinstance(input, (str, list)) else None

    # -- public API -----------------------------------------------------------
    def __call__(self, input, return_type: str | None = "logits", *, attention_mask=None,
                 stop_at_layer: int | None = None):
        """Run the model. ``input``: string, list of strings, or token ids ``[batch, pos]``."""
        req = Request(hooks=self._registry.names(), stop_at_layer=self._stop(stop_at_layer))
        ids, out, _ = self._run(input, req, attention_mask)
        return self._finish(ids, out, return_type, stop_at_layer is not None, self._mask_for(input, attention_mask))

    forward = __call__

    def run_with_cache(self, input, names_filter: NameFilter = None, stop_at_layer: int | None = None,
                       remove_batch_dim: bool = False, return_type: str | None = "logits", *,
                       attention_mask=None) -> tuple[torch.Tensor, ActivationCache]:
        """Run and return ``(output, cache)``; only the sites selected by ``names_filter`` are kept."""
        stop = self._stop(stop_at_layer)
        names = self.resolve(names_filter)
        if stop is not None:
            late = [n for n in names if (layer_of(n) is not None and layer_of(n) >= stop)
                    or (layer_of(n) is None and n.startswith("ln_final"))]
            if late and not callable(names_filter) and names_filter is not None:
                raise ValueError(f"stop_at_layer={stop_at_layer} stops before {late[:3]}")
            names = [n for n in names if n not in late]
        req = Request(cache=tuple(names), hooks=self._registry.names(), stop_at_layer=stop)
        ids, out, vals = self._run(input, req, attention_mask)
        cache = ActivationCache(dict(zip(names, vals)), model=self)
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        return self._finish(ids, out, return_type, stop is not None, self._mask_for(input, attention_mask)), cache

    def run_with_hooks(self, input, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = (),
                       reset_hooks_end: bool = True, return_type: str | None = "logits", **kwargs):
        """Run with temporary hooks ``[(name or predicate, fn(tensor, hook))]``."""
        with self.hooks(fwd_hooks, reset_hooks_end=reset_hooks_end):
            return self(input, return_type=return_type, **kwargs)

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = (),
              reset_hooks_end: bool = True) -> Iterator[HookedModel]:
        """Context in which ``fwd_hooks`` are active."""
        try:
            for name, fn in fwd_hooks:
                for site in self.resolve(name if callable(name) else [name]):
                    self._registry.add(site, fn, temporary=reset_hooks_end)
            yield self
        finally:
            if reset_hooks_end:
                self._registry.remove_temporary()

    def add_hook(self, name: str | Callable[[str], bool], fn: HookFn) -> None:
        """Add a persistent hook (removed by :meth:`reset_hooks`)."""
        for site in self.resolve(name if callable(name) else [name]):
            self._registry.add(site, fn, temporary=False)

    def reset_hooks(self) -> None:
        """Remove every hook."""
        self._registry.clear()

    def site_table(self) -> list[dict]:
        """One row per site: name, shape, HF module path, how it was found."""
        return [{"name": n, "shape": spec(n).shape, "module": self._sites[n].module,
                 "found_by": self._sites[n].found_by} for n in self.all_hook_names]

    def patch(self, patches):
        """Context applying ``{site: Patch or [patches]}`` (see :mod:`fxlens.interventions.patches`)."""
        from .interventions.patches import patch_context

        return patch_context(self, patches)

    def process_weights(self, *, fold_ln: bool = True, center_writing_weights: bool | None = None,
                        center_unembed: bool = True) -> HookedModel:
        """A copy with TransformerLens' weight processing (see :mod:`fxlens.interventions.processing`)."""
        from .interventions.processing import process_weights

        return process_weights(self, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                               center_unembed=center_unembed)

    def generate(self, input, max_new_tokens: int = 10, *, fwd_hooks=(), **hf_kwargs):
        """HF ``generate`` (KV cache) with hooks at every step (see :mod:`fxlens.interventions.generate`)."""
        from .interventions.generate import generate

        return generate(self, input, max_new_tokens, fwd_hooks=fwd_hooks, **hf_kwargs)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedModel({c.family}: {c.n_layers} layers, d_model={c.d_model}, heads={c.n_heads}/"
                f"{c.n_kv_heads}, {len(self.hook_names)} sites)")

