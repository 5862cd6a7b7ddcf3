"""Capture an unmodified HF model as an FX graph with ``torch.export``."""

from __future__ import annotations

import inspect
import logging
import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.export import Dim

from .graph import getattr_path

log = logging.getLogger("fxlens.capture")


class CaptureError(RuntimeError):
    """``torch.export`` could not capture the model."""


@dataclass
class Captured:
    """A captured model: ``gm(input_ids, attention_mask) -> output tensor``.

    Attributes:
        gm: the graph module; its parameters are the HF model's own tensors.
        output: what the single output is, ``"logits"`` or ``"hidden"``.
        seconds: wall time spent in ``torch.export``.
        mode: ``"dynamic"`` (named batch/seq dims) or ``"auto"`` (``Dim.AUTO``: the family's
            code constrains the sequence length, e.g. ``seq > 1``, and export inferred the range).
    """

    gm: fx.GraphModule
    output: str
    seconds: float
    mode: str = "dynamic"
    how: str = "full export"


def _example_inputs(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = getattr(model.config, "vocab_size", 2) or 2
    # batch >= 2 and seq >= 2, or export specialises those dims to constants. A prime
    # length keeps pos recognisable where a family's code specialises it (Gemma 2 eager).
    ids = torch.arange(2 * 11, device=device).reshape(2, 11) % vocab
    return ids, torch.ones_like(ids)


def capture(model: nn.Module, by_block: bool = True) -> Captured:
    """Export ``model`` with dynamic batch and sequence and normalise the graph.

    ``by_block``: export a two-block stand-in and repeat block 1 per layer where the blocks are
    provably alike and the result reproduces the model exactly (:mod:`fxlens.tracer.replicate`);
    otherwise (and with ``FXLENS_BY_BLOCK=0``) the whole model is exported, and ``how`` says why.

    Only arguments ``forward`` names are passed (``use_cache=False`` where it is one; else
    ``config.use_cache`` is off while exporting). When named dims violate a constraint the
    family's code puts on the length, export is retried with ``Dim.AUTO`` (``mode="auto"``,
    with a warning); a graph specialised to one length is refused.

    The normalised graph takes ``(input_ids, attention_mask)`` and returns one tensor:
    logits for ``*ForCausalLM`` models, the last hidden state for base models.
    Raises ``CaptureError`` with the reason when export fails.
    """
    if by_block and os.environ.get("FXLENS_BY_BLOCK", "1") != "0":
        from .replicate import NotReplicable, capture_by_block

        t0 = time.perf_counter()
        try:
            cap, how = capture_by_block(model, lambda m: capture(m, by_block=False))
        except (NotReplicable, CaptureError) as e:
            log.info("%s: full export (%s)", type(model).__name__, e)
            cap = capture(model, by_block=False)
            cap.how = f"full export ({e})"
            return cap
        cap.seconds, cap.how = time.perf_counter() - t0, how
        log.info("%s: %s, %.1f s", type(model).__name__, how, cap.seconds)
        return cap
    device = next(model.parameters()).device
    ids, mask = _example_inputs(model, device)
    n_ctx = _n_ctx(model.config)
    params = inspect.signature(model.forward).parameters
    kwargs: dict = {"input_ids": ids, "attention_mask": mask}
    cache_arg = "use_cache" in params and (getattr(model.config, "use_cache", None) is not None
                                          or hasattr(model, "generate"))
    if cache_arg:
        kwargs["use_cache"] = False
    t0 = time.perf_counter()
    ep, mode, errors = None, "dynamic", []
    for mode in ("dynamic", "auto"):
        try:
            ep = _export(model, kwargs, _shapes(mode, n_ctx, cache_arg))
            break
        except Exception as e:  # noqa: BLE001 - retried or re-raised with context below
            errors.append(f"{mode}: {type(e).__name__}: {e}".replace("\n", " ")[:400])
            if "Constraints violated" not in str(e) and "speciali" not in str(e):
                break  # not a shape-constraint failure: Dim.AUTO would fail the same way
    if ep is None:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: " + " | ".join(errors) + "\n"
            "Try: attn_implementation='sdpa' or 'eager', fp32 weights, and a transformers "
            "version that supports torch.export for this family.")
    seconds = time.perf_counter() - t0
    if mode == "auto":
        _check_dynamic(ep, type(model).__name__)
        warnings.warn(f"{type(model).__name__}: captured with Dim.AUTO (its code constrains the sequence length; "
                      f"named dynamic dims failed: {errors[0][:200]})", stacklevel=2)
    gm, output = _normalise(ep.module())
    return Captured(gm, output, seconds, mode)


def _shapes(mode: str, n_ctx: int | None, cache_arg: bool) -> dict:
    if mode == "auto":
        dims = {0: Dim.AUTO, 1: Dim.AUTO}
        shapes: dict = {"input_ids": dims, "attention_mask": dims}
    else:
        seq = Dim("seq", max=n_ctx) if n_ctx else Dim("seq")
        shapes = {"input_ids": {0: Dim("batch"), 1: seq}, "attention_mask": {0: Dim("batch"), 1: seq}}
    if cache_arg:
        shapes["use_cache"] = None
    return shapes


def _export(model: nn.Module, kwargs: dict, shapes: dict):
    """``torch.export`` under ``no_grad``; ``config.use_cache`` off while exporting when forward has no such arg."""
    cfg, old = model.config, getattr(model.config, "use_cache", None)
    if "use_cache" not in kwargs and old:
        cfg.use_cache = False
    try:
        with torch.no_grad():
            return torch.export.export(model, (), kwargs=kwargs, dynamic_shapes=shapes, strict=False)
    finally:
        if "use_cache" not in kwargs and old:
            cfg.use_cache = old


def _check_dynamic(ep, name: str) -> None:
    """Refuse a graph whose batch or sequence length export specialised to a constant."""
    ph = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "input_ids")
    static = [i for i, d in enumerate(ph.meta["val"].shape) if isinstance(d, int)]
    if static:
        raise CaptureError(
            f"torch.export specialised {name}'s input dims {static} to constants (shape "
            f"{tuple(ph.meta['val'].shape)}): the family's code branches on the sequence length, so one graph "
            "cannot serve every length. Per-length capture is not supported yet; use HF hooks for this family.")


def _n_ctx(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 2:
            return v
    return None


def _normalise(exported: fx.GraphModule) -> tuple[fx.GraphModule, str]:
    """Copy the exported graph into a plain ``(input_ids, attention_mask) -> out`` graph."""
    src = exported.graph
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, object] = {}
    out_spec = exported._out_spec
    for node in src.nodes:
        if node.op == "placeholder":
            if node.name in ("input_ids", "attention_mask"):
                env[node] = graph.placeholder(node.name)
                env[node].meta = dict(node.meta)
            continue
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        if node.op == "output":
            flat = node.args[0]
            keys = list(getattr(out_spec, "context", None) or [])
            idx = keys.index("logits") if "logits" in keys else 0
            kind = "logits" if "logits" in keys else "hidden"
            graph.output(env[flat[idx]])
            break
        if node.op == "get_attr":
            attrs[node.target] = getattr_path(exported, node.target)
        env[node] = graph.node_copy(node, lambda n: env[n])
    _drop_noops(graph)
    _filled_by_slices(graph)
    _out_of_place(graph)
    gm = fx.GraphModule(attrs, graph, class_name="CapturedModel")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, kind
_aten = torch.ops.aten
_CASTS = {_aten.to.dtype, _aten.to.dtype_layout, _aten.to.device, _aten.type_as.default}
_NOOPS = {_aten.dropout.default, _aten.alias.default, _aten.detach.default}


def _drop_noops(graph: fx.Graph) -> None:
    """Remove metadata asserts, eval dropout and casts to the same dtype/device.

    Such nodes alias their input in eager mode; export records the alias as a separate
    node that later code may read in place of the original (e.g. the residual read back
    from inside a norm module). Removing them makes every value a single node.
    """
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target is _aten._assert_tensor_metadata.default:
            graph.erase_node(n)
            continue
        src = n.args[0] if n.args else None
        out, inp = n.meta.get("val"), getattr(src, "meta", {}).get("val")
        same = (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)
                and out.dtype == inp.dtype and out.device == inp.device and out.shape == inp.shape)
        if (n.target in _CASTS and same) or (n.target in _NOOPS and same and not _training_dropout(n)):
            n.replace_all_uses_with(src)
            graph.erase_node(n)


def _out_of_place(graph: fx.Graph) -> None:
    """Rewrite in-place ops on intermediate values (GIT's ``embeddings += positions``, CTRL's ``*= sqrt(d)``)
    out of place, later readers taking the new value: otherwise a site on the mutated node (``hook_embed``)
    would hold the value after the mutation in a cache and see its hook's output mutated."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in list(graph.nodes):
        name = getattr(getattr(n.target, "overloadpacket", None), "__name__", "")
        if n.op != "call_function" or not name.endswith("_") or name.startswith("_") or not n.args:
            continue
        x = n.args[0]
        pure = getattr(getattr(_aten, name[:-1], None), n.target._overloadname, None)
        if pure is None or not isinstance(x, fx.Node) or x.op != "call_function" or x.target in _VIEWS:
            continue  # parameters, inputs and views are left alone (their mutation reaches other tensors)
        with graph.inserting_before(n):
            new = graph.call_function(pure, n.args, n.kwargs)
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        for u in [u for u in x.users if u is not new and order.get(u, len(order)) > order[n]]:
            u.replace_input_with(x, new)
        graph.erase_node(n)


_EMPTY = {_aten.new_empty.default, _aten.empty.memory_format, _aten.new_zeros.default, _aten.zeros.default}


def _filled_by_slices(graph: fx.Graph) -> None:
    """``x = new_empty(..); x[.., :a].copy_(p); x[.., a:].copy_(r)`` becomes ``x = cat([p, r], -1)``.

    MLA keys are built this way (DeepSeek V2/V3's ``expand_kv``): the buffer node holds no value until
    the copies run, so a site on it would cache or hook an empty tensor. The rewrite applies only when
    the slices tile one dim exactly, every copy has the slice's shape and dtype, and nothing else reads
    the buffer before the last copy.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for x in [n for n in graph.nodes if n.op == "call_function" and n.target in _EMPTY]:
        v = x.meta.get("val")
        slices = [u for u in x.users if u.target is _aten.slice.Tensor and u.args[0] is x]
        if not isinstance(v, torch.Tensor) or len(slices) < 2:
            continue
        parts = []
        for s in slices:
            dim, start, end, step = (list(s.args[1:]) + [0, 0, None, 1][len(s.args) - 1:])[:4]
            copies = list(s.users)
            if (step != 1 or len(copies) != 1 or copies[0].target is not _aten.copy_.default
                    or copies[0].args[0] is not s):
                break
            src, sv = copies[0].args[1], s.meta.get("val")
            srcv = getattr(src, "meta", {}).get("val")
            if not (isinstance(srcv, torch.Tensor) and isinstance(sv, torch.Tensor) and srcv.dtype == v.dtype
                    and str(tuple(srcv.shape)) == str(tuple(sv.shape)) and not copies[0].users):
                break
            parts.append((dim % v.dim(), start, end, src, s, copies[0]))
        else:
            parts.sort(key=lambda p: p[1])
            size = v.shape[parts[0][0]]
            bounds = [p[1] for p in parts] + [size]
            ends = [min(p[2], size) if isinstance(p[2], int) else p[2] for p in parts]
            if len({p[0] for p in parts}) != 1 or bounds[0] != 0 or any(
                    str(e) != str(b) for e, b in zip(ends, bounds[1:])):
                continue
            last = max((p[5] for p in parts), key=order.__getitem__)
            readers = [u for u in x.users if u not in slices]
            if any(order[u] < order[last] for u in readers):
                continue
            with graph.inserting_after(last):
                cat = graph.call_function(_aten.cat.default, ([p[3] for p in parts], parts[0][0]))
            cat.meta = dict(x.meta)
            for u in readers:
                u.replace_input_with(x, cat)
            for _, _, _, _, s, c in parts:
                graph.erase_node(c)
                graph.erase_node(s)
            graph.erase_node(x)


_VIEWS = {_aten.view.default, _aten.slice.Tensor, _aten.select.int, _aten.transpose.int, _aten.permute.default,
          _aten.expand.default, _aten.unsqueeze.default, _aten.squeeze.dim, _aten.alias.default,
          _aten._unsafe_view.default, _aten.as_strided.default, _aten.t.default, _aten.diagonal.default}


def _training_dropout(n: fx.Node) -> bool:
    return n.target is _aten.dropout.default and bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("train"))
