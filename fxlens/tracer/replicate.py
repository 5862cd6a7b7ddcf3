"""Capture cost independent of depth: export a two-period stand-in, then repeat the second period.

A decoder's blocks are one module class repeated, sometimes with a pattern (alternating sliding /
full attention: period 2). ``torch.export`` of the whole model costs time linear in depth, so
:func:`capture_by_block` exports a *stand-in*: the same model object graph with its block list cut
to the first two periods (the real modules, no weight is copied) and a config that says so. In the
captured graph, the second period's nodes (found by ``nn_module_stack``) are then instantiated for
every later period, each reading its own parameters (``layers.j.`` renamed ``layers.{j + shift}.``
in ``get_attr`` targets and module paths) and the previous period's output.

Used only where the blocks provably repeat: one class, and with period ``p`` block ``i`` has block
``i % p``'s parameter names / shapes / dtypes, scalar attributes (sliding windows, flags) and
per-layer config entries (``layer_types``, ...). The result is checked against the HF model on a
fresh, left-padded input (max-abs 0, or it is not used); every refusal gives its reason, and the
caller falls back to a full export, saying so.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import fx, nn

from .graph import getattr_path

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_PER_LAYER = ("layer_types", "sliding_window_pattern", "no_rope_layers", "swa_layers", "mlp_only_layers")


class NotReplicable(Exception):
    """This model's blocks cannot be captured once and repeated (the message says why)."""


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, blocks)``: the longest ``ModuleList`` of one module class (at least 4 blocks)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 4 and len({type(b) for b in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise NotReplicable("no list of at least 4 identical blocks")
    return best


def _signature(block: nn.Module) -> list:
    tensors = [(k, tuple(v.shape), v.dtype, v.device) for k, v in block.state_dict(keep_vars=True).items()]
    scalars = [(name, sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and k != "layer_idx"
                             and isinstance(v, (bool, int, float, str, type(None)))))
               for name, m in block.named_modules()]
    return [tensors, scalars, [type(m).__name__ for m in block.modules()]]


def period(model: nn.Module, blocks: nn.ModuleList) -> int:
    """The smallest ``p`` such that block ``i`` is structurally block ``i + p``'s twin (1 for uniform
    blocks, 2 for alternating sliding / full attention, ...); raises :class:`NotReplicable`."""
    cfg, n = model.config, len(blocks)
    per_layer = [[str(v) for v in getattr(cfg, key)] for key in _PER_LAYER
                 if isinstance(getattr(cfg, key, None), (list, tuple)) and len(getattr(cfg, key)) == n]
    sigs = [_signature(b) for b in blocks]
    rows = [(sigs[i], *(v[i] for v in per_layer)) for i in range(n)]
    for p in range(1, n // 3 + 1):  # at least three periods, or replication saves nothing
        if n % p == 0 and all(rows[i] == rows[i % p] for i in range(n)):
            return p
    raise NotReplicable("the blocks do not repeat with a period dividing the depth (parameters, attributes "
                        "or per-layer config differ)")


def _shallow(m: nn.Module) -> nn.Module:
    """A copy of ``m`` sharing its parameters and submodules, whose own submodule table can change."""
    new = copy.copy(m)
    new.__dict__["_modules"] = OrderedDict(m.__dict__["_modules"])
    return new


def stand_in(model: nn.Module, path: str, k: int = 2) -> nn.Module:
    """``model`` with the block list at ``path`` cut to its first ``k`` blocks and a config that says so."""
    cfg = copy.deepcopy(model.config)
    n = len(model.get_submodule(path))
    keys = [key for key in _LAYER_KEYS if getattr(cfg, key, None) == n]
    if not keys:
        raise NotReplicable(f"no config field gives the {n} layers ({_LAYER_KEYS})")
    for key in keys:
        setattr(cfg, key, k)
    for key in _PER_LAYER:
        v = getattr(cfg, key, None)
        if isinstance(v, list) and len(v) == n:
            setattr(cfg, key, v[:k])
    top = _shallow(model)
    parent, parts = top, path.split(".")
    for part in parts[:-1]:
        child = _shallow(getattr(parent, part))
        setattr(parent, part, child)
        parent = child
    setattr(parent, parts[-1], nn.ModuleList(list(getattr(parent, parts[-1]))[:k]))
    for m in (top, *(top.get_submodule(".".join(parts[:i])) for i in range(1, len(parts)))):
        if getattr(m, "config", None) is model.config:
            m.config = cfg
    return top


def _layer(node: fx.Node, prefix: str) -> int | None:
    """Which block ``prefix.i`` a node belongs to (``get_attr`` target or innermost module path)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [node.target] if node.op == "get_attr" else [p for p, _ in stack.values()]
    for p in paths:
        if isinstance(p, str) and p.startswith(prefix + "."):
            head = p[len(prefix) + 1:].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    return None


def _rename(s: str, prefix: str, shift: int) -> str:
    """``prefix.j...`` -> ``prefix.{j + shift}...``."""
    if not s.startswith(prefix + "."):
        return s
    head, _, rest = s[len(prefix) + 1:].partition(".")
    return f"{prefix}.{int(head) + shift}" + (f".{rest}" if rest else "") if head.isdigit() else s


def replicate(gm: fx.GraphModule, model: nn.Module, prefix: str, n: int, p: int = 1) -> fx.GraphModule:
    """``gm`` (captured from the stand-in with blocks ``0 .. 2p-1``) with blocks ``p .. 2p-1`` repeated
    as blocks ``2p .. n-1``, one period at a time."""
    nodes = list(gm.graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    where = {node: _layer(node, prefix) for node in nodes}
    lo = [x for x in nodes if where[x] is not None and where[x] < p and x.op != "get_attr"]
    hi = [x for x in nodes if where[x] is not None and p <= where[x] < 2 * p and x.op != "get_attr"]
    if len(lo) != len(hi) or any(a.target != b.target for a, b in zip(lo, hi)) or not hi:
        raise NotReplicable(f"blocks 0..{p - 1} and {p}..{2 * p - 1} were captured as different graphs")
    twin = {a: b for a, b in zip(lo, hi)}  # first period's node -> the same node of the second
    in_hi = {x for x in nodes if where[x] is not None and p <= where[x] < 2 * p}
    last = max(order[x] for x in hi)
    for x in nodes:
        for u in x.users:
            if x in twin and u not in twin and u not in in_hi:
                raise NotReplicable(f"{u.name} (outside blocks 0..{2 * p - 1}) reads block {where[x]}'s {x.name}")
            if x in in_hi and u not in in_hi and order[u] < last:
                raise NotReplicable(f"{u.name} reads block {where[x]}'s {x.name} before block {2 * p - 1} ends")

    graph, env = fx.Graph(), {}
    attrs: dict[str, object] = {}

    def attr(target: str) -> None:
        if target not in attrs:
            try:
                attrs[target] = model.get_parameter(target)
            except AttributeError:
                try:
                    attrs[target] = model.get_buffer(target)
                except AttributeError:
                    attrs[target] = getattr_path(gm, target)

    final: dict[fx.Node, fx.Node] = {}
    for i, x in enumerate(nodes):
        if x.op == "get_attr":
            attr(x.target)
        env[x] = graph.node_copy(x, lambda a: final.get(a, env[a]) if i > last else env[a])
        if i != last:
            continue
        prev = {b: env[b] for b in in_hi}  # the previous period's version of each second-period node
        for k in range(2, n // p):
            shift = (k - 1) * p
            cur: dict[fx.Node, fx.Node] = {}
            for y in (z for z in nodes if z in in_hi):
                if y.op == "get_attr":
                    t = _rename(y.target, prefix, shift)
                    attr(t)
                    cur[y] = graph.get_attr(t)
                    cur[y].meta = dict(y.meta)
                    continue

                def arg(a, cur=cur, prev=prev):
                    if a in cur:
                        return cur[a]
                    if a in twin:  # the second period reads the first: period k reads period k-1
                        return prev[twin[a]]
                    return env[a]
                cur[y] = graph.node_copy(y, arg)
                stack = y.meta.get("nn_module_stack")
                if stack:
                    cur[y].meta["nn_module_stack"] = {key: (_rename(q, prefix, shift), c)
                                                      for key, (q, c) in stack.items()}
            prev = cur
        final = prev if n > 2 * p else {}
    gm2 = fx.GraphModule(attrs, graph, class_name="CapturedModel")
    gm2.recompile()
    return gm2


def capture_by_block(model: nn.Module, capture_fn) -> tuple[object, str]:
    """``(Captured, how)`` of ``model`` from its stand-in of two periods (raises :class:`NotReplicable`)."""
    path, blocks = block_list(model)
    p = period(model, blocks)
    cap = capture_fn(stand_in(model, path, 2 * p))
    cap.gm = replicate(cap.gm, model, path, len(blocks), p)
    _check_exact(cap.gm, model)
    what = "block 1" if p == 1 else f"blocks {p}..{2 * p - 1} (period {p})"
    return cap, f"by block: {2 * p} of {len(blocks)} blocks exported, {what} repeated ({path})"


def _check_exact(gm: fx.GraphModule, model: nn.Module) -> None:
    vocab = getattr(model.config, "vocab_size", 2) or 2
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (2, 7), generator=g).to(device)  # not the export's example shape
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    with torch.no_grad():
        ours = gm(ids, mask)
        out = model(input_ids=ids, attention_mask=mask)
    ref = out.logits if hasattr(out, "logits") and out.logits is not None else out[0]
    ok = ours.shape == ref.shape and bool(((ours - ref).abs().nan_to_num(0.0).max() == 0).item()) and torch.equal(
        ours.isnan(), ref.isnan())
    if not ok:
        raise NotReplicable("the repeated graph does not reproduce the model exactly (max-abs "
                            f"{(ours - ref).abs().max().item() if ours.shape == ref.shape else 'shape'})")
