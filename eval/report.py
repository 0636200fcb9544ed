"""Markdown tables of evaluation results (the JSON holds every number; these are for people)."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def ppl_table(rows: list[dict[str, Any]]) -> str:
    """| context | pattern | PPL | vs dense | vs dense, tile-final rows | density | model density | tokens | tok/s |"""
    lines = ["| context | pattern | PPL | vs dense | vs dense, tile-final rows (no lookahead) | density (full layers) "
             "| density (all layers) | scored tokens | tokens/s |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = "n/a" if r.get("delta_pct") is None else f"{r['delta_pct']:+.2f}%"
        final = r.get("tile_final") or {}
        final_text = "n/a" if final.get("delta_pct") is None else (
            f"{final['delta_pct']:+.2f}% ± {_fmt(final['se_pct'], '.2f')} ({final['tokens']})")
        lines.append(f"| {r['context']} | {r['pattern']} | {r['ppl']:.3f} | {delta} | {final_text} | "
                     f"{r['density']:.3f} | {r['model_density']:.3f} | {r['tokens']} | "
                     f"{_fmt(r.get('tokens_per_s'), '.0f')} |")
    return "\n".join(lines)


def _needle_cell(row: dict[str, Any] | None, paired: dict[str, Any] | None = None) -> str:
    """A depth's accuracy and, where the row records it, the share of trials whose first answer token was right and
    the trials lost / gained against dense with McNemar's p."""
    if row is None:
        return "n/a"
    text = f"{row['accuracy']:.2f}"
    notes = []
    prefix = row.get("correct_prefix")
    if prefix:
        notes.append(f"first {sum(p >= 1 for p in prefix) / len(prefix):.2f}")
    if paired is not None:
        notes.append(f"-{paired['lost']} +{paired['gained']}, p {paired['p_value']:.2g}")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def needle_table(rows: list[dict[str, Any]]) -> str:
    """One row per (pattern, answer check, length), one column per depth: accuracy (and, in brackets, the share of
    trials whose first answer token, chosen by the prompt's last row, was right; against the dense pattern's trials
    on the same prompts, where the rows hold them: trials lost and gained and McNemar's exact p)."""
    from .needle import paired_with_dense

    paired = {(p["pattern"], p["answer_check"], p["length"], p["depth"]): p for p in paired_with_dense(rows)}
    depths = sorted({r["depth"] for r in rows})
    head = "| pattern | check | length | density | " + " | ".join(f"depth {d:g}" for d in depths) + " |"
    lines = [head, "|---|---|---:|---:|" + "---:|" * len(depths)]
    keys = []
    for r in rows:
        key = (r["pattern"], r.get("answer_check", "forward"), r["length"])
        if key not in keys:
            keys.append(key)
    for pattern, check, length in keys:
        cells = {r["depth"]: r for r in rows if (r["pattern"], r.get("answer_check", "forward"), r["length"])
                 == (pattern, check, length)}
        first = next(iter(cells.values()))
        vals = " | ".join(_needle_cell(cells.get(d), paired.get((pattern, cells[d].get("answer_check"), length, d))
                                       if d in cells else None) for d in depths)
        lines.append(f"| {pattern} | {check} | {length} | {first['density']:.3f} | {vals} |")
    return "\n".join(lines)


def layers_table(result: dict[str, Any], isolated: list[dict[str, Any]] | None = None) -> str:
    """Per-layer relative attention-output error (and isolated KL when measured); final-logit KL below."""
    iso = {r["layer"]: r["isolated_logit_kl"] for r in isolated or []}
    lines = [f"pattern {result['pattern']}, {result['seq_len']} tokens, final-logit KL(dense || sparse) = "
             f"{result['logit_kl']:.5f}", "",
             "| layer | kind | density | rel. error of attention output | KL with only this layer sparse |",
             "|---:|---|---:|---:|---:|"]
    for r in result["layers"]:
        kl = _fmt(iso.get(r["layer"]), ".5f")
        lines.append(f"| {r['layer']} | {r['kind']} | {r['density']:.3f} | {r['rel_error']:.4f} | {kl} |")
    return "\n".join(lines)
