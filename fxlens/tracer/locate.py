"""Place every TransformerLens site in a captured graph, from module paths + structure."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .chains import is_scalar_scale, is_sum_of, root, scale_of
from .families import Family
from .graph import (
    IDENTITY_OPS,
    SDPA_OPS,
    SHAPE_OPS,
    SOFTMAX_OPS,
    ModuleIndex,
    ancestors,
    follow_identity,
    is_op,
    is_tensor,
    tensor_val,
)
from .passes.attention import pos_major
from .passes.norm_scale import normalized_node
from .sites import Site

aten = torch.ops.aten
_PROJ_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
_MATMULS = {aten.matmul.default, aten.bmm.default}


class SiteError(RuntimeError):
    """Some sites could not be placed; the message names them."""


@dataclass(frozen=True)
class Shape:
    """Model dimensions needed to recognise sites."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int


class Locator:
    """Finds sites for one captured graph; collects every failure before raising."""

    def __init__(self, gm: fx.GraphModule, family: Family, shape: Shape, found_by: str = "rule"):
        self.g, self.f, self.s, self.found_by = gm.graph, family, shape, found_by
        self.ix = ModuleIndex(gm.graph)
        self._by_name = {n.name: n for n in gm.graph.nodes}
        ids = next(n for n in self.g.nodes if n.op == "placeholder" and n.name == "input_ids")
        b, s = tensor_val(ids).shape
        self._b, self._s, self._bs = str(b), str(s), str(b * s)
        self.sites: dict[str, Site] = {}
        self.missing: list[str] = []

    # -- shapes ---------------------------------------------------------------
    def labels(self, n: fx.Node) -> tuple:
        """Shape of ``n`` with batch/pos dims labelled ``B``, ``S``, ``BS``."""
        v = tensor_val(n)
        if v is None:
            return ()
        lab = {self._b: "B", self._s: "S", self._bs: "BS"}
        return tuple(lab.get(str(d), d if isinstance(d, int) else str(d)) for d in v.shape)

    def outputs(self, path: str) -> list[fx.Node]:
        """Module outputs, leaving out inputs that merely pass through (no-op casts)."""
        return [n for n in self.ix.outputs(path) if self.ix.inside(root(n), path)]

    def _hidden(self, nodes: list[fx.Node], width: int | None = None, unbatched: bool = False) -> fx.Node | None:
        width = width or self.s.d_model
        shapes = (("B", "S", width), ("BS", width), (1, "S", width)) + ((("S", width),) if unbatched else ())
        hits = [n for n in nodes if self.labels(n) in shapes]
        roots = {root(n): n for n in hits}
        return next(iter(roots.values())) if len(roots) == 1 else None

    def add(self, name: str, node: fx.Node | None, module: str, layout: str | None = None, **kw) -> None:
        """Record a site (or a miss when ``node`` is None)."""
        if node is None and "derive" not in kw:
            self.missing.append(f"{name} (looked in {module or 'graph'})")
            return
        if layout is None and node is not None:
            layout = "flat" if self.labels(node)[:1] == ("BS",) else "same"
        self.sites[name] = Site(name, node.name if node is not None else None, layout or "same", module=module,
                                found_by=self.found_by, **kw)

    def node(self, name: str) -> fx.Node | None:
        site = self.sites.get(name)
        return None if site is None or site.node is None else self._by_name[site.node]

    # -- top level ------------------------------------------------------------
    def run(self) -> dict[str, Site]:
        f = self.f
        # what the embedding adds to the residual: after scalar scales (Granite's embedding_multiplier)
        out = self._hidden(self.outputs(f.embed))
        embed = self._through_scales(out)  # W_E must include the scale (a scale inside the module is probed there)
        self.add("hook_embed", embed, f.embed, extra={"scale": scale_of(embed) / scale_of(out)})
        if f.pos_embed:
            # [pos, d_model] where the model adds it unbatched (Pegasus, Marian, Blenderbot sinusoidal tables)
            self.add("hook_pos_embed", self._hidden(self.outputs(f.pos_embed), unbatched=True), f.pos_embed)
        for layer in range(self.s.n_layers):
            self.block(layer)
        if f.ln_final:
            self.norm("ln_final", f.ln_final)
        if "hook_embed" in self.sites:  # decompose_resid needs resid_pre0 == hook_embed (+ hook_pos_embed)
            parts = [self.node(n) for n in ("hook_embed", "hook_pos_embed") if n in self.sites]
            pre0 = self.node("blocks.0.hook_resid_pre")
            self.sites["hook_embed"].extra["sums_to_resid"] = pre0 is not None and is_sum_of(pre0, parts)
        self._check_chain()
        if self.missing:
            raise SiteError(
                f"family {f.name!r}: could not place {len(self.missing)} site(s):\n  "
                + "\n  ".join(self.missing)
                + ("\nThe model's layout differs from the rule; fix the rule's module paths." if self.found_by == "rule"
                   else "\nDiscovery misread this architecture; write a rule in fxlens/tracer/families/.")
            )
        return self.sites

    def norm(self, prefix: str, path: str) -> None:
        out = self._hidden(self.outputs(path))
        self.add(f"{prefix}.hook_out", out, path)
        op = next((n for n in self.ix.nodes(path) if is_op(n, {aten.rsqrt.default, aten.layer_norm.default})), None)
        if op is None:
            self.missing.append(f"{prefix}.hook_scale, hook_normalized (no rsqrt/layer_norm op in {path})")
            return
        layout = "flat" if out is not None and self.labels(out)[:1] == ("BS",) else "same"
        self.add(f"{prefix}.hook_scale", None, path, layout=layout, derive="norm_scale", extra={"op": op.name})
        if is_op(op, {aten.rsqrt.default}):  # x * rsqrt(..) is a node already
            self.add(f"{prefix}.hook_normalized", normalized_node(op), path)
        else:
            self.add(f"{prefix}.hook_normalized", None, path, layout=layout, derive="norm_scale",
                     extra={"op": op.name})

    def block(self, L: int) -> None:
        f, p = self.f, f"blocks.{L}"
        path = f.block(L, "")
        pre = self._hidden(self.ix.inputs(path))
        self.add(f"{p}.hook_resid_pre", pre, path)
        post_src = self.ix.inputs(f.block(L, f.ln2)) if f.post_norm and f.ln2 else self.outputs(path)
        self.add(f"{p}.hook_resid_post", self._hidden(post_src), path)
        if f.ln1 is not None:
            self.norm(f"{p}.ln1", f.block(L, f.ln1))
        if f.ln2 is not None:
            self.norm(f"{p}.ln2", f.block(L, f.ln2))
        attn_out, attn_scale = self._branch_out(L, f.attn_out, f.attn_post_norm)
        moe = self._moe(L)
        mlp_rel = moe[len(f.block(L, "")) + 1:] if moe else f.mlp_out
        mlp_out, mlp_scale = self._branch_out(L, mlp_rel, f.mlp_post_norm)
        # extra["scale"]: the scalar the branch output was multiplied by (W_O / W_out must include it)
        self.add(f"{p}.hook_attn_out", attn_out, f.block(L, f.attn_out), extra={"scale": attn_scale})
        self.add(f"{p}.hook_mlp_out", mlp_out, f.block(L, mlp_rel), extra={"scale": mlp_scale})
        if not f.parallel and pre is not None and attn_out is not None:
            mid = next((u for u in attn_out.users if is_op(u, {aten.add.Tensor, operator.add})
                        and any(root(a) is root(pre) for a in u.args if isinstance(a, fx.Node))), None)
            self.add(f"{p}.hook_resid_mid", mid, path)
        if f.post_norm:  # BERT: the MLP reads ln1's output
            self.add(f"{p}.hook_mlp_in", self.node(f"{p}.ln1.hook_out"), path, extra={"scope": path})
        elif f.ln2 is not None:  # what ln2 reads (resid_mid, or resid_pre in parallel blocks), for ln2 only
            ln2 = f.block(L, f.ln2)
            self.add(f"{p}.hook_mlp_in", self._hidden(self.ix.inputs(ln2)), ln2, extra={"scope": ln2})
        self.mlp(L)
        self.attention(L)

    def _branch_out(self, L: int, proj: str, post_norm: str | None) -> tuple[fx.Node | None, float]:
        """What the branch adds to the residual: the module output, after identity ops and
        scalar scales (Granite's ``residual_multiplier``), and the product of those scales."""
        out = self._hidden(self.outputs(self.f.block(L, post_norm or proj)))
        node = self._through_scales(out)
        return node, scale_of(node) / scale_of(out)

    @staticmethod
    def _through_scales(out: fx.Node | None) -> fx.Node | None:
        """Follow a single chain of identity ops and scalar multiplies (documented multipliers)."""
        while out is not None and len(out.users) == 1:
            (user,) = out.users
            if not ((is_op(user, IDENTITY_OPS) or is_scalar_scale(user)) and user.args[0] is out):
                break
            out = user
        return out

    def _moe(self, L: int) -> str | None:
        """The mixture-of-experts module of block ``L``, if its MLP is one.

        Per layer: DeepSeek-style stacks keep the first ``first_k_dense_replace`` MLPs dense, so
        a family discovered on a dense block 0 still has MoE blocks later.
        """
        f = self.f
        if f.moe:
            return f.block(L, f.mlp_out)
        top = f.block(L, f.mlp_out.split(".")[0])
        return top if any(is_op(n, {aten.topk.default}) for n in self.ix.nodes(top)) else None

    def mlp(self, L: int) -> None:
        f, p = self.f, f"blocks.{L}.mlp"
        moe = self._moe(L)
        if moe:
            topk = next((n for n in self.ix.nodes(moe) if is_op(n, {aten.topk.default})), None)
            logits = topk.args[0] if topk is not None else None
            while logits is not None and not is_op(logits, {aten.linear.default, aten.mm.default}):
                logits = logits.args[0] if logits.args and isinstance(logits.args[0], fx.Node) else None
            self.add(f"{p}.hook_router_logits", logits, moe)
            return
        act, down = f.block(L, f.mlp_act), f.block(L, f.mlp_out)
        act_in = self.ix.inputs(act)
        pre = act_in[0] if len(act_in) == 1 else None
        width = self.labels(pre)[-1] if pre is not None else None
        self.add(f"{p}.hook_pre", pre, act)
        post = self._hidden(self.ix.inputs(down), width) if width else None
        self.add(f"{p}.hook_post", post, down)
        if f.gated and post is not None:
            act_outs = {root(n) for n in self.outputs(act)}
            others = [a for a in post.args if isinstance(a, fx.Node) and root(a) not in act_outs]
            self.add(f"{p}.hook_pre_linear", others[0] if is_op(post, {aten.mul.Tensor}) and len(others) == 1
                     else None, f.block(L, "mlp"))

    # -- attention ------------------------------------------------------------
    def attention(self, L: int) -> None:
        f, p = self.f, f"blocks.{L}.attn"
        path = f.block(L, f.attn)
        nodes = self.ix.nodes(path)
        sdpa = [n for n in nodes if is_op(n, SDPA_OPS)]
        soft = [n for n in nodes if is_op(n, SOFTMAX_OPS)]
        if len(sdpa) == 1:
            core = sdpa[0]
            q, k, v = core.args[:3]
            for name in ("hook_attn_scores", "hook_pattern", "hook_z"):
                self.add(f"{p}.{name}", None, path, layout="bhsd" if name == "hook_z" else "same",
                         derive="attention", extra={"sdpa": core.name, "pos_major": pos_major(core)})
        elif len(soft) == 1:
            scores, pattern = soft[0].args[0], follow_identity(soft[0])
            z = next((u for u in pattern.users if is_op(u, _MATMULS)), None)
            qk = self._qk(scores, path)
            if z is None or qk is None:
                self.missing.append(f"{p}.* (eager attention in {path} has no q@k / pattern@v matmuls)")
                return
            q, k = qk.args[1:3] if is_op(qk, {aten.baddbmm.default}) else qk.args[:2]
            v = z.args[1]
            self.add(f"{p}.hook_attn_scores", scores, path)
            self.add(f"{p}.hook_pattern", pattern, path)
            self.add(f"{p}.hook_z", z, path, layout="bhsd")
        else:
            self.missing.append(f"{p}.* (expected one attention op in {path}, found "
                                f"{len(sdpa)} SDPA and {len(soft)} softmax)")
            return
        self._output_gate(L, core if len(sdpa) == 1 else z, path)
        targets = {}
        for which, arg in (("q", q), ("k", k), ("v", v)):
            n = arg
            while is_op(n, SHAPE_OPS) or is_scalar_scale(n):
                n = n.args[0]
            targets[which] = (arg, n)
        if self._latent(targets, path):
            self._attention_inputs(L, targets, path)
            return
        for which, heads in (("q", self.s.n_heads), ("k", self.s.n_kv_heads), ("v", self.s.n_kv_heads)):
            arg, first = targets[which]
            others = set().union(*(ancestors(targets[o][0]) for o in targets if o != which))
            proj = first if self._is_proj(first, path) else self._nearest_proj(first, path)
            if proj is None:
                self.missing.append(f"{p}.hook_{which} (no projection feeding attention {which} in {path})")
                continue
            node = self._first_of_size(proj, ancestors(arg), others, heads * self.s.d_head)
            self.add(f"{p}.hook_{which}", node, self.ix.path(proj), layout=self._head_layout(node, heads),
                     extra={"proj": proj.name, "proj_module": self.ix.path(proj), "heads": heads})
            if first is not proj and which != "v":
                self.add(f"{p}.hook_rot_{which}", first, path, layout=self._head_layout(first, heads),
                         extra={"heads": heads})

        ln = None if f.post_norm or f.ln1 is None else f.block(L, f.ln1)
        for name, heads in (("hook_attn_in", self.s.n_heads), ("hook_q_input", self.s.n_heads),
                            ("hook_k_input", self.s.n_kv_heads), ("hook_v_input", self.s.n_kv_heads)):
            self.add(f"blocks.{L}.{name}", None, path, derive="split_input", extra={"ln": ln, "heads": heads})

    def _output_gate(self, L: int, out: fx.Node, path: str) -> None:
        """A per-head gate between attention and the output projection (Dots3's ``z * sigmoid(g_proj(x))``):
        ``hook_z`` is the gated tensor, what ``W_O`` reads, so head results still sum to ``hook_attn_out``."""
        n = out
        while len(n.users) == 1 and is_op(next(iter(n.users)), SHAPE_OPS):
            n = next(iter(n.users))
        (gate,) = n.users if len(n.users) == 1 else (None,)
        if gate is None or not is_op(gate, {aten.mul.Tensor}) or not self.ix.inside(gate, path):
            return
        other = next((a for a in gate.args if isinstance(a, fx.Node) and a is not n), None)
        lab, heads = self.labels(gate), self.s.n_heads
        if other is None or out in ancestors(other) or len(lab) != 4 or lab[:3] not in (("B", "S", heads),
                                                                                         ("B", heads, "S")):
            return
        m = gate
        while len(m.users) == 1 and is_op(next(iter(m.users)), SHAPE_OPS):
            m = next(iter(m.users))
        if not any(self.ix.inside(u, self.f.block(L, self.f.attn_out)) for u in m.users):
            return
        self.add(f"blocks.{L}.attn.hook_z", gate, path, layout="same" if lab[1] == "S" else "bhsd",
                 extra={"gated": True})

    def _latent(self, targets: dict, path: str) -> bool:
        """Multi-head latent attention (DeepSeek V2/V3 MLA): the key entering attention is a last-dim concat
        (a per-head part decompressed from a shared latent, a shared rotary part) and no projection output
        holds whole keys, so ``hook_k`` (and, alike, ``hook_q`` / ``hook_v``) can only be the attention input."""
        arg, first = targets["k"]
        if not is_op(first, {aten.cat.default}) or (first.args[1] if len(first.args) > 1 else 0) not in (-1, 3):
            return False
        proj = first if self._is_proj(first, path) else self._nearest_proj(first, path)
        others = set().union(*(ancestors(targets[o][0]) for o in "qv"))
        return proj is None or self._first_of_size(proj, ancestors(arg), others,
                                                   self.s.n_kv_heads * self.s.d_head) is None

    def _attention_inputs(self, L: int, targets: dict, path: str) -> None:
        """MLA: ``hook_q`` / ``hook_k`` / ``hook_v`` are the tensors entering attention (after rotary and the
        concat; ``hook_v`` has its own head size). There is no separate rotated tensor (no ``hook_rot_*``),
        no single ``W_Q`` / ``W_K`` / ``W_V``, and no per-head input copies (``hook_q_input`` ...): the keys
        and values of every head come from one shared latent."""
        p = f"blocks.{L}.attn"
        for which, heads in (("q", self.s.n_heads), ("k", self.s.n_kv_heads), ("v", self.s.n_kv_heads)):
            node = targets[which][0]
            while (is_op(node, SHAPE_OPS) or is_scalar_scale(node)) and self._heads_4d(node.args[0], heads) \
                    and self.labels(node.args[0])[3] == self.labels(node)[3]:
                node = node.args[0]  # back through transposes / contiguous to the earliest per-head tensor
            lab = self.labels(node)
            layout = {("B", "S", heads): "same", ("B", heads, "S"): "bhsd"}.get(lab[:3])
            if layout is None or len(lab) != 4 or not isinstance(lab[3], int):
                self.missing.append(f"{p}.hook_{which} (latent attention: the attention {which} in {path} is "
                                    f"{lab}, not [batch, pos, heads, d] or [batch, heads, pos, d])")
                continue
            self.add(f"{p}.hook_{which}", node, path, layout=layout,
                     extra={"heads": heads, "latent": True, "attention_input": True})

    def _heads_4d(self, n: object, heads: int) -> bool:
        lab = self.labels(n) if isinstance(n, fx.Node) else ()
        return len(lab) == 4 and lab[:3] in (("B", "S", heads), ("B", heads, "S")) and isinstance(lab[3], int)

    def _qk(self, scores: fx.Node, path: str) -> fx.Node | None:
        """The ``q @ k`` matmul the scores come from: along first arguments, else (masks, ALiBi's ``baddbmm``
        and casts around it) the latest matmul above the scores inside the attention module."""
        qk = scores
        while qk is not None and not is_op(qk, _MATMULS):
            qk = qk.args[0] if qk.args and isinstance(qk.args[0], fx.Node) else None
        if qk is not None:
            return qk
        ops = _MATMULS | {aten.baddbmm.default}
        qks = [a for a in ancestors(scores) if is_op(a, ops) and self.ix.inside(a, path)]
        return max(qks, key=self.ix.order.__getitem__) if qks else None

    def _is_proj(self, n: fx.Node, attn_path: str) -> bool:
        """A linear-like op in a child module of the attention, or that child's output."""
        mod = self.ix.path(n)
        if not mod.startswith(attn_path + ".") or not is_tensor(n):
            return False
        return any(is_op(a, _PROJ_OPS) for a in ancestors(n) if self.ix.path(a) == mod)

    def _nearest_proj(self, n: fx.Node, attn_path: str) -> fx.Node | None:
        order = self.ix.order
        cands = [a for a in ancestors(n) if self._is_proj(a, attn_path)
                 and not any(self._is_proj(u, attn_path) and self.ix.path(u) == self.ix.path(a) for u in a.users)]
        return max(cands, key=order.__getitem__) if cands else None

    def _first_of_size(self, start: fx.Node, allowed: set, others: set, size: int) -> fx.Node | None:
        """Earliest node on the shape-op chain from ``start`` holding exactly one of q/k/v; the earliest in a
        recognised layout (``[B, S, size]`` or split into heads) where an earlier one has extra unit dims
        (GPT-BigCode's ``[B, 1, S, size]``)."""
        todo, first, seen = [start], None, set()
        d = self.s.d_head
        while todo:
            n = todo.pop(0)
            if n in seen:
                continue
            seen.add(n)
            lab = self.labels(n)
            if lab and n not in others and _per_token(lab) == size:
                if lab in (("B", "S", size), ("BS", size), ("B", "S", size // d, d), ("B", size // d, "S", d)):
                    return n
                first = first or n
            todo += [u for u in n.users if u in allowed and (is_op(u, SHAPE_OPS) or is_scalar_scale(u))]
        return first

    def _head_layout(self, n: fx.Node | None, heads: int) -> str:
        if n is None:
            return "same"
        lab = self.labels(n)
        if lab == ("B", "S", heads, self.s.d_head):
            return "same"
        if lab == ("B", heads, "S", self.s.d_head):
            return "bhsd"
        return "heads"

    # -- checks ---------------------------------------------------------------
    def _check_chain(self) -> None:
        """Pre-norm models: resid_post of block L must be resid_pre of block L+1."""
        if self.f.post_norm:
            return
        for L in range(self.s.n_layers - 1):
            a, b = self.node(f"blocks.{L}.hook_resid_post"), self.node(f"blocks.{L + 1}.hook_resid_pre")
            if a is not None and b is not None and root(a) is not root(b):
                self.missing.append(f"blocks.{L}.hook_resid_post is not blocks.{L + 1}.hook_resid_pre "
                                    f"({a.name} vs {b.name})")


def _per_token(labels: tuple) -> int:
    n = 1
    for d in labels:
        if d in ("B", "S", "BS"):
            continue
        if not isinstance(d, int):
            return -1
        n *= d
    return n


def locate(gm: fx.GraphModule, family: Family, shape: Shape, found_by: str = "rule") -> dict[str, Site]:
    """Every site of ``family`` in ``gm``; raises ``SiteError`` naming what is missing."""
    return Locator(gm, family, shape, found_by).run()
