"""On-disk cache of captured graphs and their site tables.

``torch.export`` takes ~10 s on a 30-layer model; the graph and the sites depend only
on the model's structure (config, parameter shapes, dtypes, attention implementation)
and the library versions, not on the weights. This cache stores the normalised graph
(ops, args, module paths) plus the site table, and rebuilds them in about a second.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import os
import pickle
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from torch import fx, nn

from .._version import __version__
from ..storage import cache_dir
from .graph import getattr_path
from .sites import Site

FORMAT = 3


class _Ref:
    """A reference to another node, by name, inside pickled args."""

    def __init__(self, name: str):
        self.name = name


@functools.lru_cache(maxsize=1)
def _tracer_source_hash() -> str:
    """Hash of the tracer's own code: a changed placement rule never reads stale sites."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(model: nn.Module) -> str:
    """Structure key: config, parameter/buffer shapes and dtypes, versions, tracer code."""
    parts = [_tracer_source_hash(),
        model.config.to_json_string(use_diff=False), type(model).__name__,
        str(getattr(model.config, "_attn_implementation", None)),
        json.dumps([(k, list(v.shape), str(v.dtype), str(v.device))
                    for k, v in [*model.named_parameters(), *model.named_buffers()]]),
        torch.__version__, transformers.__version__, __version__, str(FORMAT),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _target_out(node: fx.Node):
    t = node.target
    if node.op != "call_function":
        return t
    if isinstance(t, torch._ops.OpOverload):
        return ("op", t.namespace, t._schema.name.split("::")[1], t._overloadname)
    if getattr(t, "__module__", None) in ("_operator", "operator"):
        return ("operator", t.__name__)
    raise TypeError(f"cannot cache a graph calling {t!r}")


def _target_in(t):
    if not isinstance(t, tuple):
        return t
    if t[0] == "op":
        return getattr(getattr(getattr(torch.ops, t[1]), t[2]), t[3])
    return getattr(operator, t[1])


def _args_out(a):
    if isinstance(a, fx.Node):
        return _Ref(a.name)
    if isinstance(a, (list, tuple)):
        return type(a)(_args_out(x) for x in a) if isinstance(a, tuple) else [_args_out(x) for x in a]
    if isinstance(a, dict):
        return {k: _args_out(v) for k, v in a.items()}
    return a


def _args_in(a, env: dict[str, fx.Node]):
    if isinstance(a, _Ref):
        return env[a.name]
    if isinstance(a, tuple):
        return tuple(_args_in(x, env) for x in a)
    if isinstance(a, list):
        return [_args_in(x, env) for x in a]
    if isinstance(a, dict):
        return {k: _args_in(v, env) for k, v in a.items()}
    return a


def _path(model: nn.Module, key: str) -> Path:
    return cache_dir() / "graphs" / f"{type(model).__name__}-{key}.pkl"


def save(model: nn.Module, gm: fx.GraphModule, output: str, sites: dict[str, Site], extra: dict) -> None:
    """Store ``gm`` and ``sites`` for ``model``'s structure (best effort: never raises on I/O)."""
    from .graph import module_path

    try:
        nodes = [(n.op, n.name, _target_out(n), _args_out(n.args), _args_out(n.kwargs), module_path(n))
                 for n in gm.graph.nodes]
    except TypeError:
        return  # an op we cannot name: this family is simply not cached
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    constants = {n.target: getattr_path(gm, n.target) for n in gm.graph.nodes
                 if n.op == "get_attr" and n.target not in named}
    blob = {"format": FORMAT, "nodes": nodes, "output": output, "constants": constants,
            "sites": [asdict(s) for s in sites.values()], "extra": extra}
    path = _path(model, cache_key(model))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(blob, f)
        tmp.replace(path)
    except OSError:
        pass


def load(model: nn.Module) -> tuple[fx.GraphModule, str, dict[str, Site], dict] | None:
    """The cached ``(graph module, output kind, sites, extra)`` for ``model``, or ``None``."""
    path = _path(model, cache_key(model))
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f)  # our own cache file, written by save()
    except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt
        return None
    if blob.get("format") != FORMAT:
        return None
    graph, env, attrs = fx.Graph(), {}, {}
    for op, name, target, args, kwargs, mod in blob["nodes"]:
        target = _target_in(target)
        if op == "output":
            graph.output(_args_in(args, env)[0])
            continue
        n = graph.create_node(op, target, _args_in(args, env), _args_in(kwargs, env), name=name)
        n.meta["nn_module_stack"] = {mod: (mod, None)} if mod else {}
        if op == "get_attr":
            attrs[target] = blob["constants"][target] if target in blob["constants"] else getattr_path(model, target)
        env[name] = n
    gm = fx.GraphModule(attrs, graph, class_name="CapturedModel")
    sites = {s["name"]: Site(**s) for s in blob["sites"]}
    return gm, blob["output"], sites, blob["extra"]

