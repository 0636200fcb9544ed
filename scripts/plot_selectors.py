"""One plot of issue 23's comparison from committed results files: perplexity change against dense, and passkey
accuracy, per selector (static window, "mass", "probe", "refine", learned, oracle) at equal density, per model and
budget.

    python -m scripts.plot_selectors --out scripts/results/selectors.png

Reads the keys ``smollm2-135m_8k``, ``gemma3-270m_16k`` and ``gemma3-270m_32k`` of
``scripts/results/learned_selector.json`` (each a ``scripts/gpu_learned.py`` run; perplexity and passkey do not depend
on which of the two GPUs ran them); no GPU, no model. Each run's rows are grouped by budget (the density of the row).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

RESULTS = "scripts/results/learned_selector.json"
RUNS = {"SmolLM2 8K": "smollm2-135m_8k", "Gemma 3 16K": "gemma3-270m_16k", "Gemma 3 32K": "gemma3-270m_32k"}
ORDER = ("static", "mass", "probe (one row in 16)", "probe (one row in 4)", "refine (one row in 16)",
         "refine (one row in 4)", "learned", "oracle")


def selector_of(label: str) -> str | None:
    """The selector a ``gpu_learned`` row label names (None for dense)."""
    for name in ORDER:
        if label.startswith(name):
            return name
    return None


def groups(data: dict) -> tuple[list[tuple[float, dict[str, float]]], dict[str, float]]:
    """[(budget density, {selector: PPL change %})] of one run in row order (each budget's rows start with its static
    window) and {selector: passkey accuracy (mean over the run's lengths and depths; the first budget)}."""
    budgets: list[tuple[float, dict[str, float]]] = []
    for row in data["ppl"]:
        sel = selector_of(row["pattern"])
        if sel == "static" or (sel is not None and not budgets):
            budgets.append((row["density"], {}))
        if sel is not None:
            budgets[-1][1][sel] = row["delta_pct"]
            if sel != "static":
                budgets[-1] = (row["density"], budgets[-1][1])
    needle: dict[str, list[float]] = defaultdict(list)
    for row in data.get("needle", []):
        sel = selector_of(row["pattern"]) or "dense"
        needle[sel].append(row["accuracy"])
    return budgets, {k: sum(v) / len(v) for k, v in needle.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="scripts/results/selectors.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    if not os.path.isfile(RESULTS):
        raise SystemExit(f"{RESULTS} does not exist")
    with open(RESULTS) as f:
        runs = json.load(f)
    panels = [(name, *groups(runs[key])) for name, key in RUNS.items() if key in runs]
    if not panels:
        raise SystemExit(f"{RESULTS} holds none of the runs {list(RUNS.values())}")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    labels, x0 = [], 0
    for name, budgets, _ in panels:
        for density, row in budgets:
            for i, sel in enumerate(ORDER):
                if sel in row:
                    axes[0].bar(x0 + i * 0.1, row[sel], width=0.1, color=f"C{i}")
            labels.append((x0 + 0.35, f"{name}\n{density:.1%}"))
            x0 += 1
    handles = [matplotlib.patches.Patch(color=f"C{i}", label=sel) for i, sel in enumerate(ORDER)]
    axes[0].set_xticks([p for p, _ in labels], [t for _, t in labels], fontsize=8)
    axes[0].set_ylabel("perplexity vs dense (%)")
    axes[0].set_title("Perplexity at equal density (every sparse layer)")
    axes[0].legend(handles=handles, fontsize=8)
    for j, (_, _, needle) in enumerate(panels):
        names = ["dense", *[s for s in ORDER if s in needle]]
        axes[1].bar([j + i * 0.1 for i in range(len(names))], [needle[s] for s in names], width=0.1,
                    color=["k", *[f"C{ORDER.index(s)}" for s in names[1:]]])
    axes[1].set_xticks([j + 0.4 for j in range(len(panels))], [p[0] for p in panels])
    axes[1].set_ylabel("passkey accuracy (mean over lengths x depths)")
    axes[1].set_title("Passkey, first budget (black: dense; missing bar: 0)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
