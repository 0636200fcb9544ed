"""PNG plots: PPL vs context length, PPL vs density, needle heat maps, a pattern's block layout.

``hf-sparsek eval`` draws them after each run; this module also redraws them from saved results::

    python -m hf_sparsek.eval.plots RESULTS.json [MORE.json ...] --out DIR --name NAME
    python -m hf_sparsek.eval.plots --layout PATTERN --seq-len 4096 --out DIR --name NAME

A results file is the JSON of ``hf-sparsek eval ppl|needle``, of ``scripts/gpu_eval.py``, or a curated file in
``scripts/results/`` that holds such runs under keys; rows of several files are merged (the first file's row wins
where two give the same pattern and size). ``--layout`` takes a preset, a JSON pattern or a JSON file
(``hf_sparsek/model_patterns/llama.json``) and draws its default pattern's tiles.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from hf_sparsek.describe import tile_grid
from hf_sparsek.patterns import SparsePattern

# Full tile, partial tile (token-exact mask inside), skipped tile: colours of the block layout picture.
LAYOUT_COLOURS = {"skipped": "white", "partial (masked inside)": "#f4a261", "full": "#264653"}
MARKERS = "osD^vP*X"


def _plt():
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("plots need matplotlib (pip install 'hf-sparsek[eval]'), or pass --no-plots") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish_ppl_axes(fig: Any, ax: Any, path: str, xlabel: str, title: str) -> str:
    """Labels, grid and a legend beside the axes (never over the points), then save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    return _save(fig, path)


def ppl_vs_context(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        pts = sorted((r["context"], r["ppl"]) for r in rows if r["pattern"] == pattern)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pattern)
    ax.set_xscale("log", base=2)
    contexts = sorted({r["context"] for r in rows})
    ax.set_xticks(contexts, [str(c) for c in contexts])
    return _finish_ppl_axes(fig, ax, path, "context length (tokens)", title or "PPL vs context length")


def ppl_vs_density(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    """One colour per pattern, one marker per context length: a legend instead of labels on the points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, pattern in enumerate(patterns):
        for j, context in enumerate(contexts):
            pts = [(r["density"], r["ppl"]) for r in rows if r["pattern"] == pattern and r["context"] == context]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", marker=MARKERS[j % len(MARKERS)],
                        color=colours[i % len(colours)], markersize=7)
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(facecolor=colours[i % len(colours)], label=p) for i, p in enumerate(patterns)]
    handles += [plt.Line2D([], [], color="grey", marker=MARKERS[j % len(MARKERS)], linestyle="none",
                           label=f"{c} tokens") for j, c in enumerate(contexts)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              frameon=False)
    ax.set_xlabel("density (attended / causal pairs, full-attention layers)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "PPL vs density", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def needle_heatmap(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    """One panel per pattern: accuracy over (depth, length)."""
    plt = _plt()
    patterns = list(dict.fromkeys(r["pattern"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(patterns), figsize=(2.6 * len(patterns) + 1.2, 3.4), squeeze=False,
                             sharey=True, layout="constrained")
    image = None
    for ax, pattern in zip(axes[0], patterns, strict=True):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for r in rows:
            if r["pattern"] == pattern:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
        image = ax.imshow(grid.float().numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("length (tokens)", fontsize=8)
        ax.set_title(pattern, fontsize=8)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not torch.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(title or "passkey retrieval accuracy", fontsize=9)
    return _save(fig, path)


def block_layout(pattern: SparsePattern, seq_len: int, path: str, title: str = "") -> str:
    """Picture of the tiles a pattern computes: full tiles, partial (masked inside) tiles, skipped tiles."""
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    grid = tile_grid(pattern, seq_len)
    fig, ax = plt.subplots(figsize=(5.6, 5), layout="constrained")
    ax.imshow(grid.float().numpy(), cmap=ListedColormap(list(LAYOUT_COLOURS.values())), vmin=0, vmax=2,
              interpolation="nearest")
    ax.set_xlabel(f"key block ({pattern.block_size} tokens)")
    ax.set_ylabel("query block")
    ax.set_title(title or f"{pattern.describe()} @ {seq_len}", fontsize=8)
    handles = [Patch(facecolor=c, edgecolor="grey", label=name) for name, c in LAYOUT_COLOURS.items()]
    ax.legend(handles=handles, fontsize=7, loc="upper right", framealpha=0.9)
    return _save(fig, path)


def _save(fig: Any, path: str) -> str:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def result_rows(data: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(perplexity rows, needle rows) of a results file in any of the shapes the module docstring names."""
    ppl: list[dict[str, Any]] = []
    needle: list[dict[str, Any]] = []
    if not isinstance(data, dict):
        return ppl, needle
    if data.get("command") in ("ppl", "needle") and isinstance(data.get("results"), list):
        (ppl if data["command"] == "ppl" else needle).extend(data["results"])
    for key, rows in (("ppl", ppl), ("needle", needle)):
        if isinstance(data.get(key), list):
            rows.extend(data[key])
    for value in data.values():
        if isinstance(value, dict):
            sub_ppl, sub_needle = result_rows(value)
            ppl.extend(sub_ppl)
            needle.extend(sub_needle)
    return ppl, needle


def _merge(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    seen: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(tuple(r[k] for k in keys), r)
    return list(seen.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Redraw the evaluation plots from saved results, or draw a layout.")
    ap.add_argument("results", nargs="*", help="results JSON files (rows are merged)")
    ap.add_argument("--out", required=True, help="folder for the PNG files")
    ap.add_argument("--name", required=True, help="file name prefix: NAME_context.png, NAME_density.png, ...")
    ap.add_argument("--title", default="", help="title prefix (default: --name)")
    ap.add_argument("--layout", help="draw this pattern's block layout instead (preset, JSON or JSON file)")
    ap.add_argument("--seq-len", type=int, default=4096, help="sequence length of the --layout picture")
    args = ap.parse_args(argv)
    title = args.title or args.name
    if args.layout:
        from hf_sparsek.model_defaults import resolve_pattern

        layout: Any = args.layout
        if os.path.isfile(layout):
            with open(layout) as f:
                layout = json.load(f)
            layout.pop("how_chosen", None)  # the per-model files' note on how their values were chosen
        pattern = resolve_pattern(layout).default
        print(block_layout(pattern, args.seq_len, os.path.join(args.out, f"{args.name}.png"),
                           f"{title}: {pattern.describe()} @ {args.seq_len} tokens"))
        return 0
    ppl: list[dict[str, Any]] = []
    needle: list[dict[str, Any]] = []
    for path in args.results:
        with open(path) as f:
            file_ppl, file_needle = result_rows(json.load(f))
        ppl.extend(file_ppl)
        needle.extend(file_needle)
    if not ppl and not needle:
        ap.error("no perplexity or needle rows in the given files")
    if ppl:
        ppl = _merge(ppl, ("pattern", "context"))
        print(ppl_vs_context(ppl, os.path.join(args.out, f"{args.name}_context.png"), f"{title}: PPL vs context"))
        print(ppl_vs_density(ppl, os.path.join(args.out, f"{args.name}_density.png"), f"{title}: PPL vs density"))
    if needle:
        needle = _merge(needle, ("pattern", "length", "depth"))
        print(needle_heatmap(needle, os.path.join(args.out, f"{args.name}_needle.png"),
                             f"{title}: passkey retrieval"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
