"""Per-head attention inputs (``hook_attn_in``, ``hook_q_input``, ``hook_k_input``, ``hook_v_input``).

TransformerLens' split-input mode gives every head its own copy of the residual stream;
ln1 and the head's slice of the q/k/v projection then run on that copy. Here the HF
norm and projection modules are called on the ``[batch, pos, heads, d_model]`` copies
and each head keeps its own output features, found once by probing the graph.
"""

from __future__ import annotations

import torch
from torch import fx

_aten = torch.ops.aten


def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[batch, pos, d]`` -> ``[batch, pos, heads, d]`` (a copy per head)."""
    return x.unsqueeze(2).expand(-1, -1, heads, -1).clone()


def group_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Query-head copies -> one per KV head (the first query head of each group)."""
    return x[:, :, :: x.shape[2] // kv_heads]


def pick_head_features(p: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``p[b, s, h, index[h, j]]``: each head copy keeps its own features -> ``[b, s, h, d_head]``."""
    return p.gather(-1, index.expand(*p.shape[:2], *index.shape))


def probe_feature_index(gm: fx.GraphModule, probes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """For each q/k/v site, which projection output feature each ``(head, d)`` reads.

    The graph runs once on one token; then, for each site, only the shape ops between
    its projection and the site are replayed on ``arange(width)`` in place of the
    projection's output, so the site's value *is* the feature index.

    Args:
        probes: key -> ``(projection node, site node, presenter, *presenter args)``;
            the presenter maps the site node's value to ``[1, 1, heads, d_head]``.
    """
    param = next(iter(gm.parameters()), None)
    ids = torch.zeros(1, 1, dtype=torch.long, device=param.device if param is not None else "cpu")
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(ids, torch.ones_like(ids))
    base_env = dict(interp.env)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = {}
    for key, (proj, site, present, *args) in probes.items():
        chain = sorted(_between(proj, site), key=order.__getitem__)
        interp.env = dict(base_env)
        width = base_env[proj].shape[-1]
        interp.env[proj] = torch.arange(width, dtype=torch.float32).reshape(base_env[proj].shape)
        for n in chain:
            a, kw = interp.fetch_args_kwargs_from_env(n)
            interp.env[n] = getattr(interp, n.op)(n.target, a, kw)
        out[key] = present(interp.env[site], *args)[0, 0].round().long()
    return out


def _between(src: fx.Node, dst: fx.Node) -> set[fx.Node]:
    """Nodes on paths ``src -> dst`` (excluding ``src``)."""
    seen, todo, result = set(), [dst], set()
    while todo:
        n = todo.pop()
        if n in seen or n is src:
            continue
        seen.add(n)
        if _reaches(src, n):
            result.add(n)
            todo.extend(n.all_input_nodes)
    return result


def _reaches(src: fx.Node, n: fx.Node) -> bool:
    todo, seen = [n], set()
    while todo:
        x = todo.pop()
        if x is src:
            return True
        if x not in seen:
            seen.add(x)
            todo.extend(x.all_input_nodes)
    return False


SPLIT_SITES = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")


def build_split_inputs(graph: fx.Graph, nodes: dict[str, fx.Node], sites: dict, layer: int, wanted: set[str],
                       index: dict[str, torch.Tensor], attrs: dict[str, object],
                       replaced: dict[str, fx.Node]) -> dict[str, fx.Node]:
    """Rewire block ``layer`` so q/k/v are computed from per-head input copies.

    ``attrs`` receives the HF modules and index tensors the new nodes reference
    (module path -> module); ``replaced`` maps each old q/k/v node to its new node.
    Returns the new input site nodes by site name.
    """
    p = f"blocks.{layer}"
    resid = nodes[sites[f"{p}.hook_resid_pre"].node]
    ln = sites[f"{p}.hook_attn_in"].extra["ln"]
    qkv = {w: sites[f"{p}.attn.hook_{w}"] for w in "qkv"}
    first = min((nodes[s.node] for s in qkv.values()), key=lambda n: list(graph.nodes).index(n))
    made: dict[str, fx.Node] = {}
    with graph.inserting_before(first):
        shared = None
        if f"{p}.hook_attn_in" in wanted:
            shared = made[f"{p}.hook_attn_in"] = graph.call_function(repeat_heads, (resid, qkv["q"].extra["heads"]))
        for w, site in qkv.items():
            name = f"{p}.hook_{w}_input"
            heads = site.extra["heads"]
            if shared is not None:  # attn_in feeds every per-q/k/v copy (its hook runs first)
                inp = graph.call_function(group_heads, (shared, heads))
            elif name in wanted:
                inp = graph.call_function(repeat_heads, (resid, heads))
            else:
                continue
            if name in wanted:
                made[name] = inp
            normed = graph.call_module(ln, (inp,)) if ln else inp
            proj = graph.call_module(site.extra["proj_module"], (normed,))
            idx_name = f"_fxlens_idx_{layer}_{w}"
            attrs[idx_name] = index[f"{layer}.{w}"]
            picked = graph.call_function(pick_head_features, (proj, graph.get_attr(idx_name)))
            old = nodes[site.node]
            new = _to_layout(graph, picked, site.layout)
            old.replace_all_uses_with(new)
            replaced[old.name] = new
            for mod in (ln, site.extra["proj_module"]):
                if mod:
                    attrs[mod] = None  # resolved by the caller from the HF model
    return made


def _to_layout(graph: fx.Graph, x: fx.Node, layout: str) -> fx.Node:
    """``[batch, pos, heads, d_head]`` -> the node layout of the q/k/v site."""
    if layout == "heads":
        return graph.call_function(torch.flatten, (x, -2))
    if layout == "bhsd":
        return graph.call_function(torch.transpose, (x, 1, 2))
    return x
