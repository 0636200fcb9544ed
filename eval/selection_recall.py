"""Selection recall: how much of the true attention mass a block selection covers, beside an oracle at its budget.

Everything here is exact and slow (eval only): the dense causal softmax of every query row is computed in chunks of
query tiles (memory O(chunk x kv_len)), in float32 or float64.

* :func:`block_attention_mass`: per (batch, KV head, query tile), the share of attention each key tile receives,
  summed over the tile's query rows and the group's query heads, normalised so each query tile's row sums to 1.
* :func:`coverage`: the mean over query rows (and the group's query heads) of the mass a row puts on the keys a
  block index lets it attend, token-exact (partial tiles count only their allowed pairs).
* :func:`oracle_index`: the ceiling for block selection: the mandatory tiles (sink, window, local blocks) plus, per
  query tile, the key tiles with the most *true* mass. With whole tiles the coverage is additive over tiles, so
  choosing by mass is optimal for the budget.
* :func:`capture_qk` / :func:`selection_recall`: record q and k of every layer of a real model through a registered
  attention function ("sparsek_probe", transformers' sdpa underneath) and compare patterns with the oracle.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from hf_sparsek.block_index import BlockIndex, attended_pairs, build_block_index, causal_pairs, element_mask
from hf_sparsek.ops import build_index_for, per_query_head_pattern
from hf_sparsek.patterns import SparsePattern
from hf_sparsek.selection.oracle import exact_tile_mass

PROBE_NAME = "sparsek_probe"
PROBE_SPARSE_NAME = "sparsek_probe_sparse"
_ROWS_PER_CHUNK = 1 << 21  # query rows x kv_len x heads per chunk (bounds the float probabilities held at once)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (batch, heads, length, dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, hq, q_len, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return batch, hq, hkv, q_len, k.shape[2]


def _offsets(q_len: int, kv_len: int, q_offset: int | None, kv_offset: int) -> tuple[int, int]:
    q_offset = kv_offset + kv_len - q_len if q_offset is None else q_offset
    if q_offset < 0 or kv_offset < 0:
        raise ValueError(f"offsets must be >= 0, got q_offset={q_offset}, kv_offset={kv_offset}")
    if q_offset + q_len > kv_offset + kv_len:
        raise ValueError(f"queries end at {q_offset + q_len} but keys end at {kv_offset + kv_len}: every query needs "
                         "its own key")
    return q_offset, kv_offset


def _group_probs(
    q: torch.Tensor, k: torch.Tensor, block: int, scale: float | None, q_offset: int, kv_offset: int,
    dtype: torch.dtype,
) -> Iterator[tuple[int, int, int, int, torch.Tensor]]:
    """Yield (first tile, last tile + 1, first row, last row + 1, probs) per chunk of query tiles.

    ``probs``: (B, Hkv, rows, kv_len) causal softmax probabilities summed over the query heads of each KV group.
    """
    batch, hq, hkv, q_len, kv_len = _check_qk(q, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    shift = q_offset % block
    n_q = (shift + q_len + block - 1) // block
    tiles = max(1, _ROWS_PER_CHUNK // max(1, block * kv_len * hq * batch))
    kf = k.to(dtype).repeat_interleave(hq // hkv, dim=1)
    k_abs = kv_offset + torch.arange(kv_len, device=q.device)
    for m0 in range(0, n_q, tiles):
        m1 = min(n_q, m0 + tiles)
        r0, r1 = max(0, m0 * block - shift), min(q_len, m1 * block - shift)
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, r0:r1].to(dtype), kf) * scale
        q_abs = q_offset + torch.arange(r0, r1, device=q.device)
        scores = scores.masked_fill(k_abs.view(1, -1) > q_abs.view(-1, 1), float("-inf"))
        probs = scores.softmax(-1).view(batch, hkv, hq // hkv, r1 - r0, kv_len).sum(2)
        yield m0, m1, r0, r1, probs


def _pool_rows(x: torch.Tensor, m0: int, m1: int, r0: int, block: int, shift: int) -> torch.Tensor:
    """Sum (B, H, rows, ...) over the rows of each query tile m0..m1-1 -> (B, H, m1 - m0, ...)."""
    front = shift if m0 == 0 else 0
    back = (m1 - m0) * block - front - x.shape[2]
    pad = [0, 0] * (x.dim() - 3) + [front, back]
    x = torch.nn.functional.pad(x, pad)
    return x.view(*x.shape[:2], m1 - m0, block, *x.shape[3:]).sum(3)


def _rows_per_tile(m0: int, m1: int, r0: int, r1: int, block: int, shift: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(r0, r1, device=device) + shift  # position of each row on the tile grid of the chunk
    return torch.bincount(rows // block - m0, minlength=m1 - m0)


def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    q_offset: int | None = None,
    kv_offset: int = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """(B, Hkv, n_q_tiles, n_k_tiles): the exact attention mass each key tile receives per query tile.

    q (B, Hq, q_len, D), k (B, Hkv, kv_len, D); causal, queries at absolute ``q_offset + t`` (default: the last
    q_len positions), keys at ``kv_offset + s``; tiles on the absolute grid as in ``hf_sparsek.block_index``. Summed
    over the tile's rows and the group's query heads, then divided by their number, so each query tile sums to 1.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    _, hq, hkv, q_len, kv_len = _check_qk(q, k)
    q_offset, kv_offset = _offsets(q_len, kv_len, q_offset, kv_offset)
    return exact_tile_mass(q, k, block_size, q_offset, kv_offset, None, scale, dtype=dtype)


def _tile_state(index: BlockIndex, m0: int, m1: int) -> torch.Tensor:
    """(Bi, Hi, m1 - m0, n_k_tiles) int8: 0 not visited, 1 full, 2 partial (token rules), 3 partial block-selected."""
    n_b, n_h = index.full_count.shape[:2]
    state = torch.zeros(n_b, n_h, m1 - m0, index.n_k_tiles + 1, dtype=torch.int8, device=index.full_count.device)
    for count, tiles, full in ((index.full_count, index.full_tiles, True), (index.part_count, index.part_tiles, False)):
        raw = tiles[:, :, m0:m1].long()
        present = torch.arange(raw.shape[-1], device=raw.device) < count[:, :, m0:m1].long().unsqueeze(-1)
        tile = torch.where(raw < 0, -raw - 1, raw)
        value = torch.full_like(raw, 1) if full else torch.where(raw < 0, 3, 2)
        tile = torch.where(present, tile, index.n_k_tiles)  # absent entries land in a dump column
        state.scatter_(-1, tile, value.to(torch.int8))
    return state[..., : index.n_k_tiles]


def _allowed_rows(index: BlockIndex, m0: int, r0: int, r1: int) -> torch.Tensor:
    """(Bi', Hi, r1 - r0, kv_len) boolean: the pairs the index attends for query rows r0..r1-1 (token-exact)."""
    block = index.block_size
    device = index.full_count.device
    m1 = (r1 - 1 + index.q_shift) // block + 1
    state = _tile_state(index, m0, m1)
    q_abs = index.q_offset + torch.arange(r0, r1, device=device)
    k_abs = index.kv_offset + torch.arange(index.kv_len, device=device)
    row_tile = (q_abs // block - index.q_offset // block - m0).view(1, 1, -1, 1)
    key_tile = (k_abs // block - index.kv_offset // block).view(1, 1, 1, -1)
    n_b = state.shape[0] if index.k_seg is None else index.k_seg.shape[0]
    state = state.expand(n_b, -1, -1, -1)
    per_pair = state[:, :, row_tile.view(-1)][..., key_tile.view(-1)]  # (n_b, Hi, rows, kv_len)
    batch_rows = torch.arange(n_b, device=device).view(-1, 1, 1, 1) if index.k_seg is not None else None
    qa, ka = q_abs.view(1, 1, -1, 1), k_abs.view(1, 1, 1, -1)
    token = element_mask(index, qa, ka, batch_rows, torch.tensor(False, device=device))
    selected = element_mask(index, qa, ka, batch_rows, torch.tensor(True, device=device))
    return (per_pair == 1) | ((per_pair == 2) & token) | ((per_pair == 3) & selected)


def coverage(
    q: torch.Tensor,
    k: torch.Tensor,
    index: BlockIndex,
    scale: float | None = None,
    per_tile: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Fraction of the true attention mass on the pairs ``index`` attends: (B, Hkv), or (B, Hkv, n_q_tiles).

    Mean over query rows and the group's query heads of each row's mass on its allowed keys (over the whole call,
    or per query tile with ``per_tile``). Token-exact: partial tiles count only their allowed pairs.
    """
    batch, hq, hkv, q_len, kv_len = _check_qk(q, k)
    if (index.q_len, index.kv_len) != (q_len, kv_len):
        raise ValueError(f"index is for q_len={index.q_len}, kv_len={index.kv_len}; q/k have {q_len}, {kv_len}")
    if index.full_count.shape[1] not in (1, hkv) or index.full_count.shape[0] not in (1, batch):
        raise ValueError(f"index batch/head dims {tuple(index.full_count.shape[:2])} do not fit ({batch}, {hkv})")
    block = index.block_size
    tiles_out, total = [], torch.zeros(batch, hkv, dtype=dtype, device=q.device)
    for m0, m1, r0, r1, probs in _group_probs(q, k, block, scale, index.q_offset, index.kv_offset, dtype):
        allowed = _allowed_rows(index, m0, r0, r1)
        covered = (probs * allowed).sum(-1)  # (B, Hkv, rows)
        total += covered.sum(-1)
        if per_tile:
            rows = _rows_per_tile(m0, m1, r0, r1, block, index.q_shift, q.device)
            pooled = _pool_rows(covered.unsqueeze(-1), m0, m1, r0, block, index.q_shift).squeeze(-1)
            tiles_out.append(pooled / (rows.to(dtype) * (hq // hkv)))
    if per_tile:
        return torch.cat(tiles_out, dim=2)
    return total / (q_len * (hq // hkv))


def attended_fraction(index: BlockIndex) -> torch.Tensor:
    """(Bi, Hi) float64: attended (query, key) pairs over causal pairs, exact (the budget a selection used)."""
    causal = max(1, causal_pairs(index.q_len, index.kv_len, index.q_offset, index.kv_offset))
    n_b, n_h = index.full_count.shape[:2]
    if index.k_seg is not None:
        n_b = index.k_seg.shape[0]
    return torch.tensor([[attended_pairs(index, b, h) / causal for h in range(n_h)] for b in range(n_b)],
                        dtype=torch.float64)


def _visited(index: BlockIndex) -> torch.Tensor:
    """(Bi, Hi, n_q_tiles, n_k_tiles) boolean: tiles the index lists (full or partial)."""
    return _tile_state(index, 0, index.n_q_tiles) > 0


def oracle_index(
    q: torch.Tensor,
    k: torch.Tensor,
    pattern_budget_tiles: int | torch.Tensor,
    block_size: int,
    sink_tokens: int = 0,
    window: int | None = None,
    local_blocks: int = 0,
    scale: float | None = None,
    q_offset: int | None = None,
    kv_offset: int = 0,
    mass: torch.Tensor | None = None,
) -> BlockIndex:
    """The oracle selection as a block index: mandatory tiles plus the ``pattern_budget_tiles`` with most true mass.

    Mandatory: the tiles the static part (``sink_tokens``, ``window``) visits and the ``local_blocks`` most recent
    causal tiles (the diagonal first). They are listed block-selected (whole tiles: a visited tile costs the same
    either way). Then per (batch, KV head, query tile) the budget (an int, or a tensor broadcastable to
    (B, Hkv, n_q_tiles)) of further causal tiles with the largest :func:`block_attention_mass` (pass ``mass`` to
    reuse one). Because tile masses add up, no other choice of that many extra tiles covers more.
    """
    batch, _, hkv, q_len, kv_len = _check_qk(q, k)
    q_offset, kv_offset = _offsets(q_len, kv_len, q_offset, kv_offset)
    if local_blocks < 0:
        raise ValueError(f"local_blocks must be >= 0, got {local_blocks}")
    budget = torch.as_tensor(pattern_budget_tiles, device=q.device)
    if budget.is_floating_point() or (budget < 0).any():
        raise ValueError(f"pattern_budget_tiles must be integers >= 0, got {pattern_budget_tiles!r}")
    if mass is None:
        mass = block_attention_mass(q, k, block_size, scale, q_offset, kv_offset)
    n_q, n_k = mass.shape[2:]
    static = SparsePattern(block_size, sink_tokens, window, topk_blocks=1)
    empty = torch.full((1, 1, n_q, 1), -1, dtype=torch.int32, device=q.device)
    base = build_block_index(static, batch=1, kv_heads=1, q_len=q_len, kv_len=kv_len, q_offset=q_offset,
                             kv_offset=kv_offset, topk_tiles=empty, device=q.device)
    mandatory = _visited(base)  # (1, 1, n_q, n_k)
    qb = q_offset // block_size + torch.arange(n_q, device=q.device)
    kb = kv_offset // block_size + torch.arange(n_k, device=q.device)
    causal = kb.view(1, -1) <= qb.view(-1, 1)
    lag = qb.view(-1, 1) - kb.view(1, -1)
    mandatory = (mandatory | ((lag >= 0) & (lag < local_blocks))) & causal
    mandatory = mandatory.expand(batch, hkv, n_q, n_k)
    score = mass.masked_fill(mandatory | ~causal, -1.0)
    budget = budget.expand(batch, hkv, n_q).long()
    width = int(budget.max().item()) if budget.numel() else 0
    width = min(width, n_k)
    chosen = torch.zeros(batch, hkv, n_q, n_k + 1, dtype=torch.bool, device=q.device)  # last column: dump
    if width:
        values, tiles = torch.topk(score, width, dim=-1)
        keep = (values >= 0) & (torch.arange(width, device=q.device) < budget.unsqueeze(-1))
        chosen.scatter_(-1, torch.where(keep, tiles, n_k), True)
    selected = mandatory | chosen[..., :n_k]
    n_sel = int(selected.sum(-1).max().item())
    order = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices[..., : max(1, n_sel)]
    topk = torch.where(torch.gather(selected, -1, order), order, -1).to(torch.int32)
    pattern = SparsePattern(block_size, sink_tokens, window, topk_blocks=max(1, topk.shape[-1]))
    return build_block_index(pattern, batch=batch, kv_heads=hkv, q_len=q_len, kv_len=kv_len, q_offset=q_offset,
                             kv_offset=kv_offset, topk_tiles=topk, device=q.device)


def tiles_per_query_tile(index: BlockIndex) -> torch.Tensor:
    """(Bi, Hi, n_q_tiles) int64: how many key tiles the index visits per query tile (the tile budget)."""
    return index.full_count.long() + index.part_count.long()


# --- real models: record q and k of every layer, then compare each pattern with the oracle -------------------------

_recording: list[tuple[int, torch.Tensor, torch.Tensor, float | None]] | None = None


def _record(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> None:
    """Append (layer, q, k, scaling) to the recording in progress: q and k arrive after RoPE, k with KV heads."""
    if _recording is not None:
        layer = getattr(module, "layer_idx", None)
        _recording.append((len(_recording) if layer is None else int(layer), query.detach(), key.detach(),
                           kwargs.get("scaling")))


def _probe_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' sdpa, recording (layer, q, k, scaling) first."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _record(module, query, key, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _probe_sparse_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """hf_sparsek's attention (the model's stored pattern), recording (layer, q, k, scaling) first."""
    from hf_sparsek.integration import sparsek_attention_forward

    _record(module, query, key, kwargs)
    return sparsek_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_probe() -> None:
    """Register "sparsek_probe" (sdpa) and "sparsek_probe_sparse" (hf_sparsek's attention and mask) with
    transformers' public interfaces; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from hf_sparsek.integration import sparsek_mask

    AttentionInterface.register(PROBE_NAME, _probe_attention)
    AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)
    AttentionInterface.register(PROBE_SPARSE_NAME, _probe_sparse_attention)
    AttentionMaskInterface.register(PROBE_SPARSE_NAME, sparsek_mask)


@torch.inference_mode()
def capture_qk(model: Any, ids: torch.Tensor, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = torch.float32, sparse: bool = False
               ) -> dict[int, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """{layer: (q, k, scaling)} of one forward of ``ids`` on ``device`` (the CPU by default) in ``dtype`` (float32
    by default; None: the model's); the model's attention is restored. ``sparse``: the forward runs hf_sparsek's
    attention with the model's stored pattern (``config.sparsek``), so each layer's q and k are those the sparse
    model computes; else dense sdpa."""
    global _recording
    register_probe()
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_SPARSE_NAME if sparse else PROBE_NAME)
    _recording = []
    try:
        model(input_ids=ids, use_cache=False)
        records = _recording
    finally:
        _recording = None
        model.set_attn_implementation(previous)
    if not records:
        raise ValueError(f"{type(model).__name__} never called its attention function; cannot capture q and k")
    return {layer: (q.to(device, dtype or q.dtype), k.to(device, dtype or k.dtype), scale)
            for layer, q, k, scale in records}


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean())


@torch.inference_mode()
def selection_recall(model: Any, ids: torch.Tensor, specs: list, local_blocks: int = 2) -> list[dict[str, Any]]:
    """Per (layer, pattern): coverage of each KV head, beside the oracle at the same tile budget.

    The oracle keeps the sink block, the ``local_blocks`` most recent blocks and, per query tile, as many further
    tiles (chosen by true mass) as the pattern visits beyond those, so both visit the same number of tiles. The
    model's own sliding-window layers are skipped (their true attention is not the full causal softmax). A
    ``per_query_head`` pattern is measured as the op runs it, one key head per query head (its rows list one value
    per query head), with its oracle choosing per query head too.
    """
    from hf_sparsek.model_defaults import layer_kinds, resolve_layer_pattern

    from .modeling import text_config

    config = text_config(model)
    kinds = layer_kinds(config)
    captured = capture_qk(model, ids)
    rows = []
    for layer, (q, k, scale) in sorted(captured.items()):
        kind = kinds[layer] if layer < len(kinds) else None
        if kind == "sliding_attention":
            continue
        masses: dict[tuple[int, int], torch.Tensor] = {}
        for spec in specs:
            if spec.sparsity is None:
                continue
            pattern = resolve_layer_pattern(spec.sparsity, layer, kind, None)
            if q.shape[2] <= pattern.min_sparse_len:
                pattern = SparsePattern(block_size=pattern.block_size)
            block = pattern.block_size
            keys = k  # per_query_head: one key head per query head, as the op runs it (and the oracle likewise)
            group = q.shape[1] // k.shape[1]
            if pattern.per_query_head and group > 1:
                keys = k.repeat_interleave(group, dim=1)
                pattern = per_query_head_pattern(pattern, k.shape[1], group)
            index = build_index_for(q, keys, pattern)  # what sparsek runs, top-k selector included
            if (block, keys.shape[1]) not in masses:
                masses[block, keys.shape[1]] = block_attention_mass(q, keys, block, scale, dtype=torch.float32)
            mass = masses[block, keys.shape[1]]
            floor = oracle_index(q, keys, 0, block, sink_tokens=block, local_blocks=local_blocks, scale=scale,
                                 mass=mass)
            budget = (tiles_per_query_tile(index) - tiles_per_query_tile(floor)).clamp(min=0)
            oracle = oracle_index(q, keys, budget, block, sink_tokens=block, local_blocks=local_blocks, scale=scale,
                                  mass=mass)
            cov = coverage(q, keys, index, scale, dtype=torch.float32)[0]
            ora = coverage(q, keys, oracle, scale, dtype=torch.float32)[0]
            hkv = keys.shape[1]
            dens = attended_fraction(index)[0].expand(hkv)
            ora_dens = attended_fraction(oracle)[0].expand(hkv)
            rows.append({
                "layer": layer, "kind": kind or "full_attention", "pattern": spec.label, "block_size": block,
                "coverage": [float(x) for x in cov], "oracle_coverage": [float(x) for x in ora],
                "density": [float(x) for x in dens], "oracle_density": [float(x) for x in ora_dens],
                "mean_tiles": _mean(tiles_per_query_tile(index)),
                "oracle_mean_tiles": _mean(tiles_per_query_tile(oracle)),
            })
    return rows


def recall_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per layer and pattern, the coverage of every KV head beside the oracle's, and the densities."""

    def heads(values: list[float]) -> str:
        return " / ".join(f"{v:.3f}" for v in values)

    lines = ["| layer | pattern | density | coverage per KV head | oracle coverage per KV head | oracle density |",
             "|---:|---|---:|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['pattern']} | {_avg(r['density']):.3f} | {heads(r['coverage'])} | "
                     f"{heads(r['oracle_coverage'])} | {_avg(r['oracle_density']):.3f} |")
    return "\n".join(lines)


def _avg(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def recall_plot(rows: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Per layer: mean coverage over KV heads of each pattern (solid) and of its oracle (dashed, same colour)."""
    from .plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    for i, pattern in enumerate(dict.fromkeys(r["pattern"] for r in rows)):
        sel = [r for r in rows if r["pattern"] == pattern]
        layers = [r["layer"] for r in sel]
        colour = f"C{i}"
        ax.plot(layers, [_avg(r["coverage"]) for r in sel], marker="o", color=colour, label=f"{pattern}")
        ax.plot(layers, [_avg(r["oracle_coverage"]) for r in sel], marker="x", linestyle="--", color=colour,
                label=f"oracle at the budget of {pattern}")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass covered (mean over KV heads)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "selection recall per layer", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    return _save(fig, path)
