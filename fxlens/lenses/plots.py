"""Lens plots: per-layer bits/byte curves and prediction-trajectory heatmaps.

PNG via matplotlib (the ``lens`` extra: ``pip install 'fxlens[lens]'``); interactive HTML via plotly
when it is installed (``html=True`` raises if it is not).
"""

from __future__ import annotations

from pathlib import Path

from .eval import LensEval, PredictionTrajectory

_METRICS = {"bits_per_byte": "bits per byte", "ce": "cross-entropy (nats/token)", "kl": "KL to final (nats/token)"}


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("lens plots need matplotlib: pip install 'fxlens[lens]' (or pip install matplotlib)") from e
    return plt


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as e:
        raise ImportError("interactive plots need plotly: pip install plotly") from e
    return go


def plotly_available() -> bool:
    try:
        _plotly()
    except ImportError:
        return False
    return True


def plot_metric(ev: LensEval, path: str | Path, metric: str = "bits_per_byte", *, log: bool | None = None,
                title: str | None = None) -> Path:
    """Line plot of ``metric`` per layer, one line per lens; writes a PNG to ``path``."""
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {sorted(_METRICS)}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, vals in ev.metrics.items():
        ax.plot(ev.layers, vals[metric], marker="o", ms=3, label=name)
    if log if log is not None else max(max(v[metric]) for v in ev.metrics.values()) > 8:
        ax.set_yscale("log")
    ax.set_xlabel("layer (last = model output)")
    ax.set_ylabel(_METRICS[metric])
    ax.set_title(title or f"{_METRICS[metric]} per layer ({ev.n_tokens} tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _cell(text: str, width: int = 8) -> str:
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_trajectory(traj: PredictionTrajectory, path: str | Path, value: str = "entropy", *,
                    layer_stride: int = 1, title: str | None = None) -> Path:
    """Heatmap (layer x position) of ``value`` (``entropy``, ``top_probs``, ``kl_to_final``) with each cell's
    top token written in it; writes a PNG. ``layer_stride`` shows every k-th layer (the output row always)."""
    plt = _plt()
    data = getattr(traj, value)
    n = traj.n_layers
    rows = sorted(set(range(0, n + 1, layer_stride)) | {n})
    pos = len(traj.tokens)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * pos + 2), max(4, 0.32 * len(rows) + 1.5)), dpi=110)
    im = ax.imshow(data[rows].numpy(), aspect="auto", origin="lower", cmap="viridis_r" if value != "top_probs"
                   else "viridis", interpolation="nearest")
    for r, layer in enumerate(rows):
        for c in range(pos):
            ax.text(c, r, _cell(traj.top_tokens[layer][c]), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(rows)), [f"{layer}" if layer < n else "output" for layer in rows])
    ax.set_xticks(range(pos), [_cell(t, 10) for t in traj.str_tokens], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("layer")
    units = {"entropy": "entropy (bits)", "top_probs": "top-token probability", "kl_to_final": "KL to final (bits)"}
    fig.colorbar(im, ax=ax, label=units.get(value, value))
    ax.set_title(title or f"{traj.lens_name or 'lens'}: top next token per layer")
    return _save(plt, fig, path)


def trajectory_html(traj: PredictionTrajectory, path: str | Path, value: str = "entropy") -> Path:
    """Interactive plotly heatmap of ``value`` with the top token (and its probability) on hover."""
    go = _plotly()
    n = traj.n_layers
    text = [[f"{traj.top_tokens[i][j]!r} p={float(traj.top_probs[i, j]):.2f}" for j in range(len(traj.tokens))]
            for i in range(n + 1)]
    fig = go.Figure(go.Heatmap(z=getattr(traj, value).numpy(), text=text, hoverinfo="text+z",
                               x=[f"{j}:{t!r}" for j, t in enumerate(traj.str_tokens)],
                               y=[str(i) if i < n else "output" for i in range(n + 1)], colorscale="Viridis"))
    fig.update_layout(title=f"{traj.lens_name or 'lens'}: {value}", xaxis_title="position", yaxis_title="layer")
    path = Path(path)
    fig.write_html(str(path))
    return path


def metric_html(ev: LensEval, path: str | Path, metric: str = "bits_per_byte") -> Path:
    """Interactive plotly version of :func:`plot_metric`."""
    go = _plotly()
    fig = go.Figure([go.Scatter(x=ev.layers, y=v[metric], mode="lines+markers", name=k) for k, v in ev.metrics.items()])
    fig.update_layout(xaxis_title="layer", yaxis_title=_METRICS[metric])
    fig.write_html(str(path))
    return Path(path)
