"""Checks on checkpoint files before and after loading: paths, GGUF files, and the weights loaded.

Each refuses with the path and the fix rather than letting a broken file become a model that
computes with NaN, random or dropped weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

#: A parameter inside a numbered layer: ``model.layers.3.mlp...``, ``transformer.h.3...``.
_LAYER_KEY = re.compile(r"\.(\d+)\.")


def check_path(path: str, gguf_file: str | None = None) -> None:
    """Raise ``FileNotFoundError`` for a local path that does not exist (not an HF repo-id error).

    A path is local when it is absolute, starts with ``.`` or ``~``, has more than one ``/`` (a hub
    name is ``org/model``), or names a GGUF file.
    """
    p = Path(path).expanduser()
    if gguf_file:
        src = p / gguf_file
        if not src.is_file():
            raise FileNotFoundError(f"no such file: {src} (give the path of an existing .gguf file)")
        return
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: it is not an HF model folder (save one with "
                                    "model.save_pretrained(folder), or give a .gguf file)")
        return
    if p.exists():
        raise FileNotFoundError(f"{p} is a file, not a model folder (give its folder, or a .gguf file)")
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:
        raise FileNotFoundError(f"no such folder: {path} (give an existing model folder, a .gguf file, or a hub name "
                                "such as 'HuggingFaceTB/SmolLM2-135M')")


def check_gguf(src: Path) -> None:
    """Raise ``ValueError`` naming ``src`` when it is not a complete, readable GGUF file."""
    import gguf

    size = src.stat().st_size
    if size == 0:
        raise ValueError(f"{src} is empty (0 bytes), not a GGUF file: download it again")
    try:
        reader = gguf.GGUFReader(src)
        for t in reader.tensors:  # every tensor must lie inside the file
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file")
    except Exception as e:  # struct.error, reshape errors, bad magic...: all mean a broken file
        raise ValueError(f"{src} is not a complete GGUF file ({size} bytes; {type(e).__name__}: {e}): it is "
                         "truncated or corrupted; download it again") from e


def _finite(p: torch.Tensor) -> bool:
    # min and max propagate NaN and show +-inf, with no full-size boolean temporary (isfinite is slower)
    return p.numel() == 0 or all(bool(torch.isfinite(v)) for v in torch.aminmax(p.detach()))


def broken_weight_file(folder: str) -> Path | None:
    """The first ``*.safetensors`` file in ``folder`` whose header cannot be read, if any."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else ():
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except Exception:  # SafetensorError: truncated, empty, not safetensors
            return f
    return None


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf (meta parameters are skipped)."""
    return [n for n, p in model.named_parameters()
            if p.device.type != "meta" and p.is_floating_point() and not _finite(p)]


def _where(keys: list[str]) -> str:
    layers = sorted({int(m.group(1)) for k in keys if (m := _LAYER_KEY.search(k))})
    return (f"layers {layers}, " if layers else "") + f"e.g. {keys[0]}"


def check_weights(model: nn.Module, info: dict, path: str) -> None:
    """Refuse a model whose weights do not match its config, or hold NaN/inf.

    ``info`` is transformers' ``output_loading_info``: missing keys would be randomly initialised,
    unexpected keys inside numbered layers would be dropped (a config layer count that differs from
    the weights' gives both).
    """
    missing = sorted(info.get("missing_keys") or ())
    dropped = sorted(k for k in info.get("unexpected_keys") or () if _LAYER_KEY.search(k))
    if missing or dropped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing from the checkpoint (would be random; {_where(missing)})")
        if dropped:
            parts.append(f"{len(dropped)} checkpoint weights the config has no place for (would be dropped; "
                         f"{_where(dropped)})")
        n = getattr(getattr(model.config, "text_config", None) or model.config, "num_hidden_layers", None)
        raise ValueError(f"checkpoint {path} does not match its config ({n} layers in config.json): "
                         + "; ".join(parts) + ". Fix the layer count (num_hidden_layers) in config.json or use "
                         "the weights it was saved with")
    bad = nonfinite_parameters(model)
    if bad:
        raise ValueError(f"checkpoint {path} holds NaN/inf weights in {len(bad)} tensors (e.g. {bad[0]}): the file "
                         "is corrupted (a cached GGUF conversion: delete it under $FXLENS_CACHE); download it again")


__all__ = ["broken_weight_file", "check_gguf", "check_path", "check_weights", "nonfinite_parameters"]
