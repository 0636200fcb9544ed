"""Print the resolved per-layer pattern of a model with its density at a given length.

torch, the block index and the pattern resolution are imported inside the functions that use them, so that
``import hf_sparsek.describe`` (and the ``hf-sparsek`` command line that imports it) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .patterns import SparsePattern

if TYPE_CHECKING:
    import torch


def kv_head_count(config: Any) -> int:
    """KV heads of the attention layers a config describes (``model_support.kv_heads_of``)."""
    from .model_support import kv_heads_of

    return kv_heads_of(config)


def pattern_density(pattern: SparsePattern, seq_len: int, kv_heads: int | None = None) -> float:
    """Attended pairs over causal pairs for one unpadded sequence of ``seq_len`` tokens, one call (exact, O(S/B x k);
    a ``dense_tail``'s last rows count dense), the mean
    over ``kv_heads`` KV heads (the layer's count: a pattern with ``dense_heads`` needs it, and a dense head beyond it
    is a ValueError, as at the forward; None: one past the highest dense head, or 1)."""
    from .block_index import attended_pairs, build_block_index, causal_pairs

    if kv_heads is None:
        kv_heads = max(1, 1 + max(pattern.dense_heads, default=-1))
    elif pattern.dense_heads and max(pattern.dense_heads) >= kv_heads:
        raise ValueError(f"dense_heads {list(pattern.dense_heads)} out of range for {kv_heads} KV heads")
    if pattern.is_dense:
        return 1.0
    tail = pattern.dense_tail
    if tail:  # the first rows under the pattern (their keys end with them), the last ``tail`` rows dense
        pattern = pattern.replace(dense_tail=0)
        if seq_len <= tail:
            return pattern_density(pattern, seq_len, kv_heads)
        head = seq_len - tail
        head_pairs = pattern_density(pattern, head, kv_heads) * causal_pairs(head, head, 0, 0)
        tail_pairs = causal_pairs(seq_len, seq_len, 0, 0) - causal_pairs(head, head, 0, 0)
        return (head_pairs + tail_pairs) / causal_pairs(seq_len, seq_len, 0, 0)
    if pattern.topk_blocks is not None:
        return _topk_density_bound(pattern, seq_len, kv_heads)
    index = build_block_index(pattern, batch=1, kv_heads=kv_heads, q_len=seq_len, kv_len=seq_len)
    heads = index.full_count.shape[1]
    pairs = sum(attended_pairs(index, 0, h) for h in range(heads)) / heads
    return pairs / causal_pairs(seq_len, seq_len, 0, 0)


def _topk_density_bound(pattern: SparsePattern, seq_len: int, kv_heads: int) -> float:
    """A top-k pattern's density is data dependent: count an upper bound. Per query tile, the static part's exact
    pairs plus k blocks a row, but never more than the tile's causal pairs the static part leaves (rows that are
    already dense, e.g. below ``min_sparse_len``, or early tiles with fewer than k blocks to choose, add what is
    left, not k blocks)."""
    import torch

    from .block_index import (
        attended_pairs_per_tile,
        build_block_index,
        causal_pairs,
        causal_pairs_per_tile,
        rows_per_tile,
    )

    static = pattern.replace(topk_blocks=None, selector=None, mass_threshold=None, probe_stride=None)
    index = build_block_index(static, batch=1, kv_heads=kv_heads, q_len=seq_len, kv_len=seq_len)
    causal = causal_pairs_per_tile(index)
    block = pattern.block_size
    rows_in = rows_per_tile(index)
    pairs = 0
    for h in range(1 if index.head_broadcast else kv_heads):  # a dense head's static pairs are all its causal pairs
        have = attended_pairs_per_tile(index, 0, h)
        pairs += int((have + torch.minimum(rows_in * pattern.topk_blocks * block, causal - have)).sum().item())
    return pairs / (1 if index.head_broadcast else kv_heads) / causal_pairs(seq_len, seq_len, 0, 0)


def resolved_layers(config: Any) -> list[tuple[int, str, SparsePattern]]:
    """(layer, kind, pattern) for every layer, as the attention function will resolve them
    (``model_defaults.resolve_layer_pattern``); a layer it refuses is listed as unsupported."""
    from .model_defaults import layer_kinds, model_sparsity, resolve_layer_pattern

    sparsity = model_sparsity(config)
    window = getattr(config, "sliding_window", None)
    rows = []
    for layer, kind in enumerate(layer_kinds(config)):
        try:
            pattern = resolve_layer_pattern(sparsity, layer, kind, window if kind == "sliding_attention" else None)
        except ValueError:
            rows.append((layer, f"unsupported: {kind}", SparsePattern(block_size=sparsity.default.block_size)))
            continue
        if kind == "sliding_attention":
            label = "sliding (model)"
        elif kind == "chunked_attention":
            label = f"chunked {getattr(config, 'attention_chunk_size', '?')} (model)"
        else:
            label = "full"
        rows.append((layer, label, pattern))
    return rows


def chunked_density(chunk: int, seq_len: int) -> float:
    """Pairs inside chunks of ``chunk`` tokens over causal pairs (Llama 4's chunked layers), one sequence."""
    whole, rest = divmod(seq_len, chunk)
    inside = whole * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2
    return inside / (seq_len * (seq_len + 1) // 2)


def describe(model_or_config: Any, seq_len: int = 8192) -> str:
    """A table of every layer's pattern and its density at ``seq_len``, plus the model's overall density."""
    if hasattr(model_or_config, "set_attn_implementation"):
        from .model_support import check_model

        check_model(model_or_config)
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config
    rows = resolved_layers(config)
    cache: dict[str, float] = {}
    refused: dict[str, str] = {}
    lines = [f"model_type={getattr(config, 'model_type', '?')}  seq_len={seq_len}",
             f"{'layer':>5}  {'kind':<20} {'density':>8}  pattern"]
    total = 0.0
    for layer, kind, pattern in rows:
        key = kind if kind.startswith(("chunked", "unsupported")) else repr(pattern)
        if key not in cache:
            if kind.startswith("chunked"):
                cache[key] = chunked_density(int(config.attention_chunk_size), seq_len)
            elif kind.startswith("unsupported"):
                cache[key] = float("nan")
            else:
                try:
                    cache[key] = pattern_density(pattern, seq_len, kv_head_count(config))
                except ValueError as error:  # dense_heads beyond the layer's KV heads: the forward refuses it too
                    cache[key] = float("nan")
                    refused[key] = str(error)
        total += cache[key]
        text = pattern.describe()
        if key in refused:
            text = f"refused at the first forward: {refused[key]}"
        elif kind.startswith("unsupported"):
            text = "refused at the first forward"
        elif kind.startswith("chunked"):
            text = "dense within each chunk"
        lines.append(f"{layer:>5}  {kind:<20} {cache[key]:>8.3f}  {text}")
    lines.append(f"mean density over layers: {total / max(1, len(rows)):.3f}")
    return "\n".join(lines)


def tile_grid(pattern: SparsePattern, seq_len: int, kv_head: int = 0) -> torch.Tensor:
    """(query tiles, key tiles) int8 map of one KV head's block index: 2 full tile, 1 partial tile, 0 skipped.

    Dynamic top-k blocks depend on the data and are not drawn (the static part is).
    """
    import torch

    from .block_index import build_block_index

    heads = max(kv_head, *pattern.dense_heads, 0) + 1
    index = build_block_index(pattern.replace(topk_blocks=None), batch=1, kv_heads=heads, q_len=seq_len,
                              kv_len=seq_len)
    h = 0 if index.head_broadcast else kv_head
    grid = torch.zeros(index.n_q_tiles, index.n_k_tiles, dtype=torch.int8)
    for m in range(index.n_q_tiles):
        grid[m, index.full_tiles[0, h, m, : index.full_count[0, h, m]].long()] = 2
        raw = index.part_tiles[0, h, m, : index.part_count[0, h, m]].long()
        grid[m, torch.where(raw < 0, -raw - 1, raw)] = 1
    return grid


def block_picture(pattern: SparsePattern, seq_len: int, kv_head: int = 0) -> str:
    """Text picture of a pattern's block layout: one character per (query tile, key tile).

    ``#`` full tile (no mask), ``+`` partial tile (token-exact mask inside), ``.`` skipped.
    """
    chars = ".+#"
    return "\n".join(" ".join(chars[int(x)] for x in row) for row in tile_grid(pattern, seq_len, kv_head).tolist())
