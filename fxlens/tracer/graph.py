"""Helpers to read an exported FX graph: module paths, shapes, op classes."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch import fx

aten = torch.ops.aten

#: Ops that move or relabel data without changing values (eval-mode dropout included).
IDENTITY_OPS = {
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten.detach.default,
}

#: Ops that only reshape, split or select (values preserved, layout changes).
SHAPE_OPS = IDENTITY_OPS | {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.unbind.int,
    aten.slice.Tensor,
    aten.select.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.expand.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    operator.getitem,
}

ADD_OPS = {aten.add.Tensor, operator.add}
SDPA_OPS = {aten.scaled_dot_product_attention.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default}


def module_path(node: fx.Node) -> str:
    """The innermost HF module path of a node ('' outside any module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path.startswith("_") else path


def inside(node: fx.Node, path: str) -> bool:
    """Whether ``node`` was produced inside module ``path`` or one of its children."""
    p = module_path(node)
    return p == path or p.startswith(path + ".")


def tensor_val(node: fx.Node) -> torch.Tensor | None:
    """The fake tensor recorded for a node, if it produces a single tensor."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def is_tensor(node: object) -> bool:
    """Whether ``node`` is a graph node producing one tensor."""
    return isinstance(node, fx.Node) and tensor_val(node) is not None


def is_op(node: object, ops: Iterable) -> bool:
    """Whether ``node`` calls one of ``ops``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Positional args of ``node`` that are tensor-producing nodes (lists flattened)."""
    out: list[fx.Node] = []
    for a in node.args:
        for x in a if isinstance(a, (list, tuple)) else (a,):
            if is_tensor(x):
                out.append(x)
    return out


class ModuleIndex:
    """Module-path queries over one graph, indexed once (graphs have thousands of nodes)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self._path = {n: module_path(n) for n in graph.nodes}
        self._members: dict[str, list[fx.Node]] = {}
        for n in graph.nodes:
            if n.op != "call_function":
                continue
            parts = self._path[n].split(".") if self._path[n] else []
            for i in range(1, len(parts) + 1):
                self._members.setdefault(".".join(parts[:i]), []).append(n)

    def path(self, node: fx.Node) -> str:
        """Innermost module path of ``node``."""
        return self._path[node] if node in self._path else module_path(node)

    def inside(self, node: fx.Node, path: str) -> bool:
        """Whether ``node`` was produced inside ``path`` or one of its children."""
        p = self.path(node)
        return p == path or p.startswith(path + ".")

    def nodes(self, path: str) -> list[fx.Node]:
        """Compute nodes produced inside module ``path``, in graph order."""
        return self._members.get(path, [])

    def outputs(self, path: str) -> list[fx.Node]:
        """Tensor nodes made inside ``path`` and read outside it (the module's outputs)."""
        return [n for n in self.nodes(path) if is_tensor(n)
                and any(u.op == "output" or not self.inside(u, path) for u in n.users)]

    def inputs(self, path: str) -> list[fx.Node]:
        """Tensor nodes made outside ``path`` and read inside it (the module's inputs)."""
        seen: dict[fx.Node, None] = {}
        for n in self.nodes(path):
            for a in n.all_input_nodes:
                if a.op != "get_attr" and is_tensor(a) and not self.inside(a, path):
                    seen[a] = None
        return sorted(seen, key=self.order.__getitem__)


def getattr_path(root: object, target: str) -> object:
    """``root.a.b.c`` for ``target == "a.b.c"`` (how get_attr/call_module targets resolve)."""
    for part in target.split("."):
        root = getattr(root, part)
    return root


def follow_identity(node: fx.Node) -> fx.Node:
    """Follow single-user identity ops (dropout, dtype casts, clones) forward."""
    while len(node.users) == 1:
        (user,) = node.users
        if not is_op(user, IDENTITY_OPS) or user.args[0] is not node:
            break
        node = user
    return node


def ancestors(node: fx.Node, values_only: bool = False) -> set[fx.Node]:
    """All nodes ``node`` depends on (inclusive); ``values_only``: not through ``sym_size`` (a shape read)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            if not (values_only and n.target is torch.ops.aten.sym_size.int):
                todo.extend(n.all_input_nodes)
    return seen


def dead_code(g: fx.Graph) -> None:
    """Dead-code elimination that also drops unused SDPA calls (fx counts them impure: dropout RNG)."""
    for node in reversed(list(g.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if not node.is_impure() or is_op(node, SDPA_OPS):
            g.erase_node(node)


def release_source(fn: object) -> None:
    """Forget the generated Python source of a graph module we drop (torch.fx keeps it forever)."""
    import linecache

    from torch.fx import graph_module

    gm = getattr(fn, "_orig_mod", fn)  # a torch.compile wrapper holds the module
    code = getattr(getattr(type(gm), "forward", None), "__code__", None)
    if code is not None and isinstance(gm, fx.GraphModule):
        graph_module._loader.eval_cache.pop(code.co_filename, None)
        linecache.cache.pop(code.co_filename, None)
