"""One adapter per tool: plain HF (forward hooks), fxlens, TransformerLens' TransformerBridge, nnsight.

Every adapter loads its own copy of the same checkpoint folder (the safetensors fxlens converted from
the shipped GGUF), so tools that rewrite or wrap the model in place cannot disturb each other, and
exposes the same three operations:

- ``forward(ids, mask) -> logits``;
- ``cache(ids, mask) -> {TL site name: tensor}`` for :func:`peers.common.cache_names`;
- ``patcher(clean, corrupted, metric, cells=None) -> sweep``: prepares the clean activations (untimed)
  and returns a zero-argument ``sweep() -> [n_layers, pos]`` patching ``resid_pre`` at every
  (layer, position), or only at ``cells`` (other entries NaN).

Module paths in :data:`MODULE_SITES` are the Llama layout (SmolLM2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .common import CACHE_SITES

Metric = Callable[[torch.Tensor], torch.Tensor]
Sweep = Callable[[], torch.Tensor]
Cells = Sequence[tuple[int, int]] | None

#: TL site -> (module path inside a decoder layer, what to read), in forward order (nnsight requires it).
#: ``input``: first positional argument; ``output``: the module's output (``output[i]`` for a tuple).
MODULE_SITES: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("", "input"),
    "attn.hook_q": ("self_attn.q_proj", "output"),
    "attn.hook_k": ("self_attn.k_proj", "output"),
    "attn.hook_v": ("self_attn.v_proj", "output"),
    "attn.hook_z": ("self_attn.o_proj", "input"),
    "hook_attn_out": ("self_attn", "output[0]"),
    "attn.hook_pattern": ("self_attn", "output[1]"),
    "hook_resid_mid": ("post_attention_layernorm", "input"),
    "hook_mlp_out": ("mlp", "output"),
    "hook_resid_post": ("", "output"),
}
assert set(MODULE_SITES) == set(CACHE_SITES)


def _getpath(obj, path: str):
    return functools.reduce(getattr, path.split("."), obj) if path else obj


def load_hf(path: str, attn: str = "sdpa"):
    """The checkpoint as an HF causal LM in eval mode (fp32, CPU)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def _grid(n_layers: int, n_pos: int, cells: Cells) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    todo = [(layer, p) for layer in range(n_layers) for p in range(n_pos)] if cells is None else list(cells)
    return torch.full((n_layers, n_pos), float("nan")), todo


class HF:
    """Plain HF: ``model(...)``; cache and patching through ``register_forward(_pre)_hook``.

    Forward and patching run the default sdpa attention; the cache reads ``hook_pattern`` from the
    attention module's second output, which only eager attention returns, so it runs an eager copy.
    """

    name = "HF"

    def __init__(self, path: str, tokenizer=None, *, hf_model=None):
        self.path = path
        self._models: dict[str, torch.nn.Module] = {}
        if hf_model is not None:
            self._models[hf_model.config._attn_implementation] = hf_model

    def model(self, attn: str = "sdpa") -> torch.nn.Module:
        if attn not in self._models:
            self._models[attn] = load_hf(self.path, attn)
        return self._models[attn]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool | None = None) -> torch.Tensor:
        kw = {} if use_cache is None else {"use_cache": use_cache}
        return self.model()(input_ids=ids, attention_mask=mask, **kw).logits

    def cache(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model("eager")
        out: dict[str, torch.Tensor] = {}
        handles = []
        for layer, block in enumerate(model.model.layers):
            for site, (mod_path, what) in MODULE_SITES.items():
                name, mod = f"blocks.{layer}.{site}", _getpath(block, mod_path)
                if what == "input":
                    hook = functools.partial(lambda n, m, args: out.__setitem__(n, args[0]), name)
                    handles.append(mod.register_forward_pre_hook(hook))
                else:
                    idx = int(what[7]) if what.startswith("output[") else None
                    hook = functools.partial(
                        lambda n, i, m, args, o: out.__setitem__(n, o if i is None else o[i]), name, idx)
                    handles.append(mod.register_forward_hook(hook))
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return out

    def patcher(self, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric, cells: Cells = None) -> Sweep:
        model = self.model()
        layers = model.model.layers
        saved: dict[int, torch.Tensor] = {}
        handles = [b.register_forward_pre_hook(functools.partial(lambda i, m, a: saved.__setitem__(i, a[0]), i))
                   for i, b in enumerate(layers)]
        try:
            model(input_ids=clean, use_cache=False)
        finally:
            for h in handles:
                h.remove()

        def sweep() -> torch.Tensor:
            res, todo = _grid(len(layers), corrupted.shape[1], cells)
            for layer, p in todo:
                def patch(m, args, layer=layer, p=p):
                    hs = args[0].clone()
                    hs[:, p] = saved[layer][:, p]
                    return (hs, *args[1:])

                h = layers[layer].register_forward_pre_hook(patch)
                try:
                    logits = model(input_ids=corrupted, use_cache=False).logits
                finally:
                    h.remove()
                res[layer, p] = metric(logits[:, -1:])
            return res

        return sweep


class _TLApi:
    """Forward and cache-all through the TransformerLens API that fxlens and the bridge share."""

    model: Any

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(ids, attention_mask=mask)

    def cache(self, ids: torch.Tensor, mask: torch.Tensor):
        from .common import cache_names

        return self.model.run_with_cache(ids, names_filter=cache_names(self.model.cfg.n_layers),
                                         attention_mask=mask)[1]


class Fxlens(_TLApi):
    """fxlens over its own HF copy (sdpa); ``compile=True`` compiles every specialised graph."""

    name = "fxlens"

    def __init__(self, path: str, tokenizer=None, *, compile: bool = False, graph_cache: bool = True,
                 hf_model=None):
        import fxlens

        self.model = fxlens.trace(hf_model if hf_model is not None else load_hf(path), tokenizer,
                                  compile=compile, graph_cache=graph_cache)

    def patcher(self, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric, cells: Cells = None) -> Sweep:
        from fxlens.interventions import patching as P

        if cells is not None:
            raise ValueError("the fxlens sweep always runs every cell")
        m = self.model
        _, clean_cache = m.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        return lambda: P.get_act_patch_resid_pre(m, corrupted, clean_cache, metric, logits_at=-1, progress=False)


class Bridge(_TLApi):
    """TransformerLens 4.3 ``TransformerBridge.boot_transformers`` over its own HF copy.

    The bridge swaps in its own modules and forces eager attention (to expose ``hook_pattern``).
    """

    name = "TransformerBridge"

    def __init__(self, path: str, tokenizer=None, *, hf_model=None):
        from transformer_lens.model_bridge import TransformerBridge

        hf_model = hf_model if hf_model is not None else load_hf(path)
        self.model = TransformerBridge.boot_transformers(path, hf_model=hf_model, tokenizer=tokenizer, device="cpu")

    def patcher(self, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric, cells: Cells = None) -> Sweep:
        import transformer_lens.patching as TP

        b = self.model
        n_layers = b.cfg.n_layers
        _, clean_cache = b.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        if cells is None:
            return lambda: TP.get_act_patch_resid_pre(b, corrupted, clean_cache, metric)
        import pandas as pd

        df = pd.DataFrame(list(cells), columns=["layer", "pos"])

        def sweep() -> torch.Tensor:
            res, todo = _grid(n_layers, corrupted.shape[1], cells)
            flat = TP.get_act_patch_resid_pre(b, corrupted, clean_cache, metric, index_df=df,
                                              index_axis_names=None)
            for (layer, p), v in zip(todo, flat.flatten().tolist()):
                res[layer, p] = v
            return res

        return sweep


class NNsight:
    """nnsight 0.8 ``TransformersModel`` over its own HF copy: one ``trace`` per forward.

    Like plain HF, the cache needs an eager-attention copy for ``hook_pattern``. ``batched=True`` in
    :meth:`patcher` puts every cell in one trace as its own invoke (nnsight's batching) instead of the loop.
    """

    name = "nnsight"

    def __init__(self, path: str, tokenizer=None, *, hf_model=None):
        self.path, self.tokenizer = path, tokenizer
        self._models: dict[str, object] = {}
        if hf_model is not None:
            self.model(hf_model.config._attn_implementation, hf_model)

    def model(self, attn: str = "sdpa", hf_model=None):
        if attn not in self._models:
            from nnsight.modeling.transformers import TransformersModel

            hf_model = hf_model if hf_model is not None else load_hf(self.path, attn)
            self._models[attn] = TransformersModel(hf_model, tokenizer=self.tokenizer)
        return self._models[attn]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lm = self.model()
        with lm.trace(ids, attention_mask=mask):
            logits = lm.output.logits.save()
        return logits

    def cache(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        lm = self.model("eager")
        out: dict[str, torch.Tensor] = {}
        with lm.trace(ids, attention_mask=mask, use_cache=False):
            for layer in range(len(lm.model.layers)):
                block = lm.model.layers[layer]
                for site, (mod_path, what) in MODULE_SITES.items():
                    env = _getpath(block, mod_path)
                    if what == "input":
                        val = env.input
                    elif what == "output":
                        val = env.output
                    else:
                        val = env.output[int(what[7])]
                    out[f"blocks.{layer}.{site}"] = val.save()
        return out

    def patcher(self, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric, cells: Cells = None,
                batched: bool = False) -> Sweep:
        lm = self.model()
        n_layers = len(lm.model.layers)
        saved: list[torch.Tensor] = []
        with lm.trace(clean, use_cache=False):
            for layer in range(n_layers):
                saved.append(lm.model.layers[layer].input.save())

        def loop() -> torch.Tensor:
            res, todo = _grid(n_layers, corrupted.shape[1], cells)
            for layer, p in todo:
                with lm.trace(corrupted, use_cache=False):
                    lm.model.layers[layer].input[:, p] = saved[layer][:, p]
                    logits = lm.output.logits[:, -1:].save()
                res[layer, p] = metric(logits)
            return res

        def one_trace() -> torch.Tensor:
            res, todo = _grid(n_layers, corrupted.shape[1], cells)
            outs: list[torch.Tensor] = []
            with lm.trace() as tracer:
                for layer, p in todo:
                    with tracer.invoke(corrupted, use_cache=False):
                        lm.model.layers[layer].input[:, p] = saved[layer][:, p]
                        outs.append(lm.output.logits[:, -1:].save())
            for (layer, p), logits in zip(todo, outs):
                res[layer, p] = metric(logits)
            return res

        return one_trace if batched else loop


TOOLS = {"hf": HF, "fxlens": Fxlens, "bridge": Bridge, "nnsight": NNsight}
