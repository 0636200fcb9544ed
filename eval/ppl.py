"""Perplexity over long documents at several context lengths, dense vs sparse patterns, on the same tokens.

Windows: each document (a list of token ids) is cut into windows of ``context`` tokens (one fewer when a BOS token is
prepended to every window). Every document token is scored exactly once, by the window that ends at or after it:
with ``stride == window`` the windows do not overlap; a smaller stride gives later windows more context (the tokens
already scored are then context only). The reported NLL is the token-weighted mean over all scored tokens.
``max_windows`` bounds the work to that many *full* windows per context (documents shorter than one window are
skipped then), so that every scored token really sees a long context.

Tile-final rows. Dynamic selection in a prefill chooses key tiles once per query tile (64 or 128 rows) from all of
the tile's rows, so the keys row ``t`` sees can depend on the queries of rows ``t+1 ..`` of its tile, and row
``t+1``'s query is computed from row ``t``'s target token: a teacher-forced perplexity lets the targets steer the
selection. The last row of each 128-row tile (position ``p % 128 == 127``, also the last of a 64-row tile) has no
later row in its tile, so its prediction is free of that lookahead. Each row reports, beside the perplexity over all
tokens, the change against dense on those rows only (paired on the same tokens, with its standard error): the
figure a causal use of the pattern (generation) can rely on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_sparsek.patterns import SUPPORTED_BLOCK_SIZES

from .modeling import PatternSpec, apply_pattern, density_summary, token_nll


@dataclass(frozen=True)
class Window:
    """Tokens ``doc[begin:end]`` form the window; ``doc[score_from:end]`` are scored in it."""

    doc: int
    begin: int
    end: int
    score_from: int


def make_windows(doc_lengths: list[int], window: int, stride: int | None = None, has_bos: bool = False,
                 max_windows: int | None = None) -> list[Window]:
    """Windows over documents so that every token is scored once (see the module docstring).

    Without a BOS token the first token of a document has no context and is not scored, and consecutive windows
    overlap by (at least) one token, the context of the next window's first scored token.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    out: list[Window] = []
    for d, n in enumerate(doc_lengths):
        if max_windows is not None and n < window:
            continue
        scored_to = 0 if has_bos else 1
        begin = 0
        while scored_to < n:
            end = min(begin + window, n)
            if max_windows is not None and end - begin < window:
                break  # budget mode: full windows only
            out.append(Window(d, begin, end, scored_to))
            if max_windows is not None and len(out) >= max_windows:
                return out
            scored_to = end
            if end == n:
                break
            # Without BOS, the first token of a window is context only: overlap by one token so none is lost.
            begin = min(begin + stride, scored_to - (0 if has_bos else 1))
    return out


def window_batch(docs: list[list[int]], w: Window, bos: int | None) -> tuple[torch.Tensor, int]:
    """(input ids (1, L), number of leading positions whose prediction is not scored)."""
    ids = list(docs[w.doc][w.begin : w.end])
    if bos is not None:
        ids = [bos, *ids]
    # Targets are ids[1:]; target t corresponds to doc token begin + t (with BOS) or begin + t + 1 (without).
    first_target_doc_pos = w.begin if bos is not None else w.begin + 1
    skip = w.score_from - first_target_doc_pos
    return torch.tensor([ids], dtype=torch.long), skip


TILE_ROWS = max(SUPPORTED_BLOCK_SIZES)  # rows whose last is the last of every grid's tile: free of lookahead


def evaluate_windows(model: Any, docs: list[list[int]], windows: list[Window], bos: int | None,
                     device: torch.device, desc: str = "") -> dict[str, Any]:
    """Token-weighted NLL over the scored tokens of ``windows``; PPL = exp(mean NLL); tokens/s of the forwards;
    ``tile_final_nll``: the NLL of each scored row at position ``p % TILE_ROWS == TILE_ROWS - 1`` (module docstring),
    in scoring order."""
    total_nll, total_tokens, processed, seconds = 0.0, 0, 0, 0.0
    tile_final: list[float] = []
    for w in tqdm(windows, desc=desc, leave=False, disable=len(windows) < 2):
        ids, skip = window_batch(docs, w, bos)
        ids = ids.to(device)
        _sync(device)
        start = time.perf_counter()
        nll = token_nll(model, ids)[0, skip:]
        _sync(device)
        seconds += time.perf_counter() - start
        total_nll += float(nll.double().sum())
        total_tokens += nll.numel()
        processed += ids.shape[1]
        first = (TILE_ROWS - 1 - skip) % TILE_ROWS  # row t = skip + i predicts token t + 1
        tile_final += nll[first::TILE_ROWS].double().cpu().tolist()
    if total_tokens == 0:
        raise ValueError("no tokens to score: documents are shorter than the context length")
    mean = total_nll / total_tokens
    return {"nll": mean, "ppl": math.exp(mean), "tokens": total_tokens, "windows": len(windows),
            "seconds": seconds, "tokens_per_s": processed / seconds if seconds > 0 else float("nan"),
            "tile_final_nll": tile_final}


def paired_change(nll: list[float], base: list[float]) -> dict[str, float | None]:
    """PPL change (%) of ``nll`` against ``base`` on the same tokens, and its standard error (%, from the per-token
    differences; delta method; None from a single token)."""
    if len(nll) != len(base) or not nll:
        raise ValueError(f"paired_change needs equal, non-empty token lists, got {len(nll)} and {len(base)}")
    diff = torch.tensor(nll, dtype=torch.float64) - torch.tensor(base, dtype=torch.float64)
    mean = float(diff.mean())
    se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else None
    return {"delta_pct": 100.0 * (math.exp(mean) - 1.0), "se_pct": None if se is None else 100.0 * math.exp(mean) * se}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tile_final_changes(rows: list[dict[str, Any]]) -> None:
    """In place: each row's ``tile_final_nll`` list (from :func:`evaluate_windows`) becomes ``tile_final``: tokens,
    mean NLL and the paired change against the dense row of its context (None without one)."""
    dense = {r["context"]: r["tile_final_nll"] for r in rows if r["pattern"] == "dense" and "tile_final_nll" in r}
    for r in rows:
        final = r.pop("tile_final_nll", None)
        if final is None:
            continue
        base = dense.get(r["context"])
        change = paired_change(final, base) if final and base is not None and len(base) == len(final) else None
        r["tile_final"] = {"tokens": len(final), "nll": sum(final) / len(final) if final else None,
                           "delta_pct": None if change is None else change["delta_pct"],
                           "se_pct": None if change is None else change["se_pct"]}


def run_ppl(model: Any, docs: list[list[int]], contexts: list[int], specs: list[PatternSpec], device: torch.device,
            bos: int | None, max_tokens: int | None = None, stride: int | None = None,
            keep_tile_final: bool = False) -> list[dict[str, Any]]:
    """One row per (context, pattern): PPL, change vs dense (%), the change on tile-final rows (module docstring),
    density, tokens/s; same tokens for every pattern.

    ``max_tokens`` bounds the scored tokens per (context, pattern) to ``max(1, max_tokens // context)`` full windows.
    ``keep_tile_final``: leave each row's per-token ``tile_final_nll`` list for :func:`tile_final_changes` (a caller
    that runs the patterns in separate calls pairs them afterwards).
    """
    rows: list[dict[str, Any]] = []
    config = model.config
    for context in contexts:
        chunk = context - (1 if bos is not None else 0)
        max_windows = None if max_tokens is None else max(1, max_tokens // context)
        windows = make_windows([len(d) for d in docs], chunk, None if stride is None else min(stride, chunk),
                               has_bos=bos is not None, max_windows=max_windows)
        if not windows:
            raise ValueError(f"no document has {chunk} tokens for context {context}; lower the context length")
        dense_ppl = None
        for spec in specs:
            apply_pattern(model, spec)
            result = evaluate_windows(model, docs, windows, bos, device, desc=f"ppl {context} {spec.label}")
            row = {"context": context, "pattern": spec.label, **result,
                   **density_summary(config, spec.sparsity, context)}
            if spec.sparsity is None and dense_ppl is None:
                dense_ppl = result["ppl"]
            row["delta_pct"] = None if dense_ppl is None else 100.0 * (result["ppl"] / dense_ppl - 1.0)
            rows.append(row)
            print(f"  context {context:>6}  {spec.label:<28} ppl {result['ppl']:9.3f}  "
                  f"density {row['density']:.3f}  {result['tokens_per_s']:9.1f} tok/s", flush=True)
    if not keep_tile_final:
        tile_final_changes(rows)
    return rows
