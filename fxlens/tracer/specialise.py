"""Build the graph for one hook signature: cached sites become outputs, hooked sites call hooks.

A signature is which sites are cached, which run Python hooks, and where to stop. The
bare graph (no sites) is the captured graph itself: no overhead against HF.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..hooks import run_hook
from .graph import dead_code, getattr_path, inside
from .passes.attention import expand_sdpa
from .passes.norm_scale import expose_norm
from .passes.split_inputs import SPLIT_SITES, build_split_inputs, probe_feature_index
from .sites import Site, layer_of, site_rank


@dataclass(frozen=True)
class Request:
    """A hook signature. ``cache`` keeps its order: it is the order of the outputs."""

    cache: tuple[str, ...] = ()
    hooks: frozenset[str] = frozenset()
    stop_at_layer: int | None = None


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[.., heads*d_head]`` -> ``[.., heads, d_head]``."""
    return x.unflatten(-1, (heads, -1))


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[.., heads, d_head]`` -> ``[.., heads*d_head]``."""
    return x.flatten(-2)


def swap_head_pos(x: torch.Tensor) -> torch.Tensor:
    """``[batch, head, pos, d]`` <-> ``[batch, pos, head, d]``."""
    return x.transpose(1, 2)


def unflatten_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[batch*pos, ..]`` -> ``[batch, pos, ..]`` using the token tensor's shape."""
    return x.unflatten(0, (ids.shape[0], ids.shape[1]))


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, ..]`` -> ``[batch*pos, ..]``."""
    return x.flatten(0, 1)


def _present(graph: fx.Graph, x: fx.Node, site: Site, ids: fx.Node) -> tuple[fx.Node, object]:
    """Insert the view that gives the site's shape; returns (view, inverse function)."""
    if site.layout == "heads":
        return graph.call_function(split_heads, (x, site.extra["heads"])), merge_heads
    if site.layout == "bhsd":
        return graph.call_function(swap_head_pos, (x,)), swap_head_pos
    if site.layout == "flat":
        return graph.call_function(unflatten_rows, (x, ids)), flatten_rows
    return x, None


def _sort_key(name: str, pos: dict, node: fx.Node, n_layers: int) -> tuple:
    return pos[node], *site_rank(name, n_layers)


def split_index(base: fx.GraphModule, sites: dict[str, Site], n_layers: int) -> dict[str, torch.Tensor]:
    """Feature index of every q/k/v head (for split-input sites), probed once per model."""
    nodes = {n.name: n for n in base.graph.nodes}
    probes = {}
    for L in range(n_layers):
        for w in "qkv":
            s = sites[f"blocks.{L}.attn.hook_{w}"]
            if "proj" not in s.extra:  # latent attention: no projection holds this site's features
                continue
            fn, args = {"heads": (split_heads, (s.extra["heads"],)), "bhsd": (swap_head_pos, ()),
                        "same": (lambda x: x, ())}[s.layout]
            probes[f"{L}.{w}"] = (nodes[s.extra["proj"]], nodes[s.node], fn, *args)
    return probe_feature_index(base, probes)


def specialise(base: fx.GraphModule, sites: dict[str, Site], req: Request, n_layers: int,
               modules: object = None, index: dict | None = None) -> fx.GraphModule:
    """A new graph module for ``req``: ``(input_ids, attention_mask) -> (out, *cached)``.

    ``modules`` (the HF model) and ``index`` (from :func:`split_index`) are needed only
    for split-input sites.
    """
    graph = fx.Graph()
    out = graph.graph_copy(base.graph, {})
    nodes = {n.name: n for n in graph.nodes}
    ids = nodes["input_ids"]
    wanted = set(req.cache) | set(req.hooks)
    stop_site = None
    if req.stop_at_layer is not None:
        stop_site = (f"blocks.{req.stop_at_layer}.hook_resid_pre" if req.stop_at_layer < n_layers
                     else f"blocks.{n_layers - 1}.hook_resid_post")
        wanted.add(stop_site)

    # 1. create derived sites (attention internals, norm scales) where asked
    value: dict[str, fx.Node] = {}
    replaced: dict[str, fx.Node] = {}
    attrs: dict[str, object] = {}
    split_layers = sorted({layer_of(n) for n in wanted if n.rsplit(".", 1)[-1] in SPLIT_SITES})
    for L in split_layers:
        p = f"blocks.{L}"
        all_split = f"{p}.hook_attn_in" in wanted or all(f"{p}.hook_{w}_input" in wanted for w in "qkv")
        ln1 = sorted(n for n in req.hooks if n.startswith(f"{p}.ln1."))  # caching them is fine
        if all_split and ln1:
            raise ValueError(f"{ln1} cannot be used with split inputs in block {L}: when q, k and v all read "
                             "per-head copies, ln1 runs on those copies and the shared ln1 output is never "
                             "computed. Hook ln1 and the split-input sites in separate runs.")
        if index is None or modules is None:
            raise ValueError("split-input sites need the HF model and the probed feature index")
        value.update(build_split_inputs(graph, nodes, sites, L, wanted, index, attrs, replaced))
    expanded: dict[str, dict[str, fx.Node]] = {}
    normed: dict[str, dict[str, fx.Node]] = {}
    for name in sorted(wanted):
        site = sites[name]
        if site.derive == "attention":
            key = site.extra["sdpa"]
            if key not in expanded:
                expanded[key] = expand_sdpa(graph, nodes[key], site.extra.get("pos_major", False))
            value[name] = expanded[key][name.rsplit(".", 1)[1]]
        elif site.derive == "norm_scale":  # hook_scale, and hook_normalized of a fused layer_norm
            key = site.extra["op"]
            if key not in normed:
                normed[key], new = expose_norm(graph, nodes[key])
                if new is not None:
                    replaced[key] = new
            value[name] = normed[key][name.rsplit(".", 1)[1]]
    out = replaced.get(out.name, out)
    for name in wanted - value.keys():
        node_name = sites[name].node
        value[name] = replaced.get(node_name) or nodes[node_name]

    # 2. insert views, hook calls and cache outputs in graph order
    pos = {n: i for i, n in enumerate(graph.nodes)}
    current: dict[fx.Node, fx.Node] = {}
    presented: dict[str, fx.Node] = {}
    hook_nodes: dict[str, fx.Node] = {}
    cache_views: set[fx.Node] = set()
    for name in sorted(wanted, key=lambda n: _sort_key(n, pos, value[n], n_layers)):
        site, base_node = sites[name], value[name]
        x = current.get(base_node, base_node)
        with graph.inserting_before(x.next):
            view, inverse = _present(graph, x, site, ids)
            if name not in req.hooks:
                presented[name] = view
                cache_views.add(view)
                continue
            # A scoped site (hook_mlp_in) shares its tensor with another site (hook_resid_mid): its hook
            # gets a copy, as in TransformerLens, so an in-place edit changes only what it would return.
            arg = graph.call_function(torch.clone, (view,)) if site.extra.get("scope") else view
            hooked = hook_nodes[name] = graph.call_function(run_hook, (name, arg))
            back = graph.call_function(inverse, (hooked,)) if inverse else hooked
        scope = site.extra.get("scope")
        keep = cache_views | {n for n in (view, arg, hooked, back) if n is not x}
        x.replace_all_uses_with(
            back, delete_user_cb=lambda u: u not in keep and (scope is None or inside(u, scope)))
        if scope is None:
            current[base_node] = back
        presented[name] = hooked

    main = presented[stop_site] if stop_site else current.get(out, out)
    if stop_site and sites[stop_site].layout != "same":
        raise ValueError(f"stop_at_layer needs {stop_site} in [batch, pos, d_model] layout")
    graph.output((main, *(presented[n] for n in req.cache)))
    root = {n.target: getattr_path(base, n.target) for n in graph.nodes if n.op == "get_attr" and n.target not in attrs}
    root.update({k: (v if v is not None else modules.get_submodule(k)) for k, v in attrs.items()})
    dead_code(graph)  # before building the module: drops later blocks' attention under stop_at_layer
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name="SpecialisedModel")
    alive = set(gm.graph.nodes)
    dropped = [n for n, h in hook_nodes.items() if h not in alive and not _after_stop(n, req.stop_at_layer)]
    if dropped:
        raise RuntimeError(f"hooks on {dropped} would never run: nothing reads those sites in this graph "
                           "(a site placement bug; please report it with the model type)")
    return gm


def _after_stop(name: str, stop: int | None) -> bool:
    """Whether ``name`` is computed only after ``stop_at_layer`` (so its hook rightly never runs)."""
    if stop is None:
        return False
    layer = layer_of(name)
    return name.startswith("ln_final") if layer is None else layer >= stop
