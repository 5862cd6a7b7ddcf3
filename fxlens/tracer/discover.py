"""Discover a decoder family's module paths from the captured graph: no hand-written rule needed.

Structure alone decides: the block list is the ``ModuleList`` with ``n_layers`` entries;
inside block 0, the attention module holds the SDPA (or softmax) op, the output
projection is the first linear after it, norms are modules holding an ``rsqrt`` or
``layer_norm`` op and are told apart by what reads them, the MLP's down projection is
the block's last linear and its activation the module holding the nonlinearity. The
result is an ordinary :class:`Family`, so ``locate`` and its checks run unchanged and
raise, naming what is missing, when the structure is not understood.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .dims import hf_dims
from .families.base import Family
from .graph import ADD_OPS, SDPA_OPS, SHAPE_OPS, SOFTMAX_OPS, ModuleIndex, follow_identity, is_op, tensor_val

aten = torch.ops.aten
_NORM_OPS = {aten.rsqrt.default, aten.layer_norm.default}
_LINEAR_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default}
_ACT_OPS = {aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
            aten.gelu_.default if hasattr(aten, "gelu_") else aten.gelu.default,
            aten.expm1.default, aten.softplus.default}  # xIELU (Apertus)

_MIXER_OPS = {aten.conv1d.default, aten.cumsum.default, aten.exp.default}


class DiscoveryError(RuntimeError):
    """The model's structure could not be mapped to sites; the message says what was not found."""


def _fail(model_type: str, what: str) -> DiscoveryError:
    return DiscoveryError(f"model_type {model_type!r} has no family rule and discovery could not find {what}; "
                          "write a rule in fxlens/tracer/families/ (module paths only).")


def discover(model: nn.Module, gm: fx.GraphModule, n_layers: int) -> Family:
    """A :class:`Family` for ``model`` inferred from its module tree and captured graph."""
    mt = model.config.model_type
    ix = ModuleIndex(gm.graph)
    names = {id(m): n for n, m in model.named_modules()}
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not lists:
        raise _fail(mt, f"a ModuleList of {n_layers} blocks")
    layers = max(lists, key=lambda n: len(ix.nodes(f"{n}.0")))
    block = f"{layers}.0"
    embed = names.get(id(model.get_input_embeddings()))
    if embed is None:
        raise _fail(mt, "the input embedding module")

    nodes = ix.nodes(block)
    core = [n for n in nodes if is_op(n, SDPA_OPS)] or [n for n in nodes if _over_positions(n)]
    if not core:
        mixers = sorted({ix.path(n) for n in nodes if is_op(n, _MIXER_OPS)})
        raise DiscoveryError(
            f"unsupported: model_type {mt!r} has no attention op in {block} (token mixer: "
            f"{mixers[0] if mixers else 'unknown'}): state-space / recurrent / convolutional layers have no "
            "attention sites, and hybrid stacks are not supported yet. Use HF forward hooks for this model.")
    if len(core) != 1:
        raise _fail(mt, f"exactly one attention op in {block} (found {len(core)})")
    attn = ix.path(core[0])
    o_proj = _next_linear(ix, core[0], attn)
    if o_proj is None:
        raise _fail(mt, f"the attention output projection after {core[0].name}")
    topk = [n for n in nodes if is_op(n, {aten.topk.default}) and not ix.inside(n, attn)]
    moe = f"{block}.{ix.path(topk[0])[len(block) + 1:].split('.')[0]}" if topk else None
    linears = [n for n in nodes if is_op(n, _LINEAR_OPS) and not ix.inside(n, attn)]
    if moe:  # experts run as grouped matmuls: the MoE module is the MLP
        outs = [o for o in ix.outputs(moe) if _is_hidden(o, model)]
        if not outs:
            raise _fail(mt, f"the output of the mixture-of-experts module {moe}")
        down = outs[0]
    elif not linears or ix.path(linears[-1]) == ix.path(o_proj):
        raise _fail(mt, f"an MLP down projection in {block}")
    else:
        down = linears[-1]
    norms = list(dict.fromkeys(ix.path(n) for n in nodes if is_op(n, _NORM_OPS) and not ix.inside(n, attn)))

    def reads(norm: str, anchor: fx.Node) -> bool:  # does ``norm`` read ``anchor`` (modulo identity ops)?
        return any(follow_identity(a) is follow_identity(anchor) or a is anchor for a in ix.inputs(norm))

    def fed_by(norm: str, pred) -> bool:
        return any(pred(u) for o in ix.outputs(norm) for u in _through_shapes(o))

    def reads_sum(norm: str, anchor: fx.Node) -> bool:  # does ``norm`` read ``anchor + residual``?
        want = follow_identity(anchor)
        return any(is_op(a, ADD_OPS) and any(isinstance(x, fx.Node) and follow_identity(x) is want for x in a.args)
                   for a in ix.inputs(norm))

    post1 = next((p for p in norms if reads_sum(p, _module_out(ix, o_proj))), None)
    post2 = next((p for p in norms if p != post1 and reads_sum(p, _module_out(ix, down))), None)
    attn_post = next((p for p in norms if reads(p, _module_out(ix, o_proj))), None)
    if post1 and post2 and attn_post is None:  # post-norm block (BERT, BART): norm(x + sublayer(x))
        act = None if moe else _act(ix, nodes, attn, down, block, mt)
        return _family(model, ix, gm, embed, layers, block, names, mt, ln1=post1, ln2=post2, attn=attn,
                       attn_out=ix.path(o_proj), act=act, mlp_out=moe or ix.path(down), post_norm=True,
                       gated=_gated(ix, moe, down, act), moe=bool(moe))
    mlp_post = next((p for p in norms if reads(p, _module_out(ix, down))), None)
    pre = [p for p in norms if p not in (attn_post, mlp_post)]
    ln1 = next((p for p in pre if fed_by(p, lambda u: ix.inside(u, attn))), None)
    ln2 = next((p for p in pre if p != ln1 and fed_by(p, lambda u: is_op(u, _LINEAR_OPS) and not ix.inside(u, attn))),
               None)
    shared = ln2 is None and ln1 is not None and fed_by(ln1, lambda u: is_op(u, _LINEAR_OPS) and not ix.inside(u, attn))
    if not pre and attn_post and mlp_post:  # x + norm(sublayer(x)) with no pre-norm (OLMo 2/3)
        act = None if moe else _act(ix, nodes, attn, down, block, mt)
        return _family(model, ix, gm, embed, layers, block, names, mt, ln1=None, ln2=None, attn=attn,
                       attn_out=ix.path(o_proj), attn_post=attn_post, act=act, mlp_out=moe or ix.path(down),
                       mlp_post=mlp_post, gated=_gated(ix, moe, down, act), moe=bool(moe))
    if ln1 is None or (ln2 is None and not shared):
        raise _fail(mt, f"the norms feeding attention and MLP in {block} (norm modules: {norms})")
    act = None if moe else _act(ix, nodes, attn, down, block, mt)
    layer_in = [a for a in ix.inputs(block) if _is_hidden(a, model)]
    parallel = shared or (bool(layer_in) and reads(ln2, layer_in[0]) and reads(ln1, layer_in[0]))
    return _family(model, ix, gm, embed, layers, block, names, mt, ln1=ln1, ln2=ln2, attn=attn,
                   attn_out=ix.path(o_proj), attn_post=attn_post, act=act, mlp_out=moe or ix.path(down),
                   mlp_post=mlp_post, parallel=parallel, gated=_gated(ix, moe, down, act), moe=bool(moe))


def _act(ix: ModuleIndex, nodes: list, attn: str, down: fx.Node, block: str, mt: str) -> str:
    """The MLP activation module: the first module outside attention holding a nonlinearity."""
    act_nodes = [n for n in nodes if is_op(n, _ACT_OPS) and not ix.inside(n, attn)]
    act = ix.path(act_nodes[0]) if act_nodes else None
    if act is None or act in (ix.path(down), block) or act == _parent(ix.path(down)):
        raise _fail(mt, f"an MLP activation module in {block} (activation ops: {[n.name for n in act_nodes]})")
    return act


def _gated(ix: ModuleIndex, moe: str | None, down: fx.Node, act: str | None) -> bool:
    """``act(gate) * up`` (a product outside the activation module) feeds the down projection."""
    down_in = [] if moe else ix.inputs(ix.path(down))
    return (bool(down_in) and is_op(down_in[0], {aten.mul.Tensor}) and not ix.inside(down_in[0], act)
            and all(isinstance(a, fx.Node) for a in down_in[0].args))


def _d_model(model: nn.Module) -> int:
    """The residual width, from the text config where the model wraps one (Fuyu)."""
    return hf_dims(getattr(model.config, "text_config", None) or model.config)[1]


def _over_positions(n: fx.Node) -> bool:
    """A softmax over key positions (attention), not over a fixed size (a MoE router's experts)."""
    v = tensor_val(n) if is_op(n, SOFTMAX_OPS) else None
    return v is not None and v.dim() >= 2 and not isinstance(v.shape[-1], int)


def _family(model, ix, gm, embed, layers, block, names, mt, *, ln1, ln2, attn, attn_out, act, mlp_out,
            attn_post=None, mlp_post=None, parallel=False, post_norm=False, gated=False, moe=False) -> Family:
    rel = lambda p: p[len(block) + 1:] if p else None  # noqa: E731
    return Family(
        name=mt, model_types=(mt,), embed=embed, layers=layers,
        ln_final=None if post_norm else _final_norm(ix, gm, layers),
        pos_embed=_pos_embed(model, ix, embed, layers, names),
        ln1=rel(ln1), ln2=rel(ln2), attn=rel(attn), attn_out=rel(attn_out), attn_post_norm=rel(attn_post),
        mlp_act=rel(act), mlp_out=rel(mlp_out), mlp_post_norm=rel(mlp_post), parallel=parallel,
        post_norm=post_norm, gated=gated, moe=moe,
    )


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0]


def _is_hidden(n: fx.Node, model: nn.Module) -> bool:
    v = n.meta.get("val")
    return isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[-1] == _d_model(model)


def _through_shapes(n: fx.Node) -> list[fx.Node]:
    """Users of ``n``, looking through reshapes and identity ops."""
    out, todo = [], list(n.users)
    while todo:
        u = todo.pop()
        if is_op(u, SHAPE_OPS):
            todo.extend(u.users)
        else:
            out.append(u)
    return out


def _next_linear(ix: ModuleIndex, start: fx.Node, attn: str) -> fx.Node | None:
    """The first linear op downstream of the attention core (the output projection)."""
    todo, seen = [start], set()
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n is not start and is_op(n, _LINEAR_OPS):
            return n
        todo.extend(n.users)
    return None


def _module_out(ix: ModuleIndex, op: fx.Node) -> fx.Node:
    """The output node of the module holding ``op`` (e.g. the view after a Conv1D addmm)."""
    outs = ix.outputs(ix.path(op))
    return outs[-1] if outs else op


def _final_norm(ix: ModuleIndex, gm: fx.GraphModule, layers: str) -> str | None:
    """The norm module read after the last block."""
    last = max(ix.order[n] for n in ix.nodes(layers))
    after = [n for n in gm.graph.nodes if ix.order[n] > last and is_op(n, _NORM_OPS)]
    return ix.path(after[0]) if after else None


def _pos_embed(model: nn.Module, ix: ModuleIndex, embed: str, layers: str, names: dict) -> str | None:
    """A learned absolute position embedding outside the blocks, if the model has one."""
    for mod in model.modules():
        path = names.get(id(mod), "")
        if (isinstance(mod, nn.Embedding) and path != embed and not path.startswith(layers + ".")
                and mod.embedding_dim == _d_model(model) and ix.nodes(path)):
            return path
    return None
