"""PNG plots: PPL vs context length, PPL vs density, needle heat maps, a pattern's block layout."""

from __future__ import annotations

import os
from typing import Any

import torch

from hf_sparsek.describe import tile_grid
from hf_sparsek.patterns import SparsePattern


def _plt():
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("plots need matplotlib (pip install 'hf-sparsek[eval]'), or pass --no-plots") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish_ppl_axes(fig: Any, ax: Any, path: str, xlabel: str, title: str) -> str:
    """Labels, grid and legend of a perplexity plot, then save it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def ppl_vs_context(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        pts = sorted((r["context"], r["ppl"]) for r in rows if r["pattern"] == pattern)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pattern)
    ax.set_xscale("log", base=2)
    return _finish_ppl_axes(fig, ax, path, "context length (tokens)", title or "PPL vs context length")


def ppl_vs_density(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for context in sorted({r["context"] for r in rows}):
        pts = sorted((r["density"], r["ppl"], r["pattern"]) for r in rows if r["context"] == context)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="none", label=f"{context} tokens")
        for d, p, name in pts:
            ax.annotate(name, (d, p), fontsize=6, xytext=(3, 3), textcoords="offset points")
    return _finish_ppl_axes(fig, ax, path, "density (attended / causal pairs, full-attention layers)",
                            title or "PPL vs density")


def needle_heatmap(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    """One panel per pattern: accuracy over (depth, length)."""
    plt = _plt()
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(patterns), figsize=(3.2 * len(patterns) + 1, 3.2), squeeze=False)
    image = None
    for ax, pattern in zip(axes[0], patterns, strict=True):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for r in rows:
            if r["pattern"] == pattern:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
        image = ax.imshow(grid.float().numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("length")
        ax.set_title(pattern, fontsize=8)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not torch.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(title or "passkey retrieval accuracy", fontsize=9)
    return _save(fig, path, tight=False)


def block_layout(pattern: SparsePattern, seq_len: int, path: str, title: str = "") -> str:
    """Picture of the tiles a pattern computes: full tiles, partial (masked inside) tiles, skipped tiles."""
    plt = _plt()
    grid = tile_grid(pattern, seq_len)
    fig, ax = plt.subplots(figsize=(5, 5))
    from matplotlib.colors import ListedColormap

    ax.imshow(grid.float().numpy(), cmap=ListedColormap(["white", "#f4a261", "#264653"]), vmin=0, vmax=2,
              interpolation="nearest")
    ax.set_xlabel(f"key block ({pattern.block_size} tokens)")
    ax.set_ylabel("query block")
    ax.set_title(title or f"{pattern.describe()} @ {seq_len}", fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: str, tight: bool = True) -> str:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
