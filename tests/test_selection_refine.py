"""Selector "refine" (issue 22): mass candidates, then exact scores of sampled rows over candidates and static tiles.

Its PyTorch definition against a slow loop-by-loop reference of the same definition; the fused second stage (Triton
interpreter) against the PyTorch definition on awkward shapes; the pattern rules; a model through generate()."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import triton_interpreter
from transformers import LlamaConfig, LlamaForCausalLM

import hf_sparsek
from hf_sparsek import SparsePattern
from hf_sparsek.selection import select_tiles
from hf_sparsek.selection.mass import select_mass
from hf_sparsek.selection.refine import REFINE_FACTOR, candidate_pattern, select_refine

BLOCK = 64


def _inputs(batch, hq, hkv, q_len, kv_len, dim, padded, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, q_len, dim, generator=gen)
    k = torch.randn(batch, hkv, kv_len, dim, generator=gen)
    k[..., 0] += torch.linspace(-2, 2, kv_len)  # keys drift: tiles differ in a way scores can see
    q[..., 0] += 1.5
    k_seg = None
    if padded:
        k_seg = torch.zeros(batch, kv_len, dtype=torch.int32)
        k_seg[-1, : min(75, kv_len - 1)] = -1  # the last row is left padded past a whole tile
    return q, k, k_seg


def _slow_refine(q, k, pattern, q_offset, kv_offset, k_seg, stride):
    """The definition, loop by loop: mass candidates (shared), the sampled rows, each row's softmax over the causal
    real keys of its tile's candidates and static tiles, candidate mass = mean over rows and heads, top-k."""
    cands = select_mass(q, k, candidate_pattern(pattern), q_offset, kv_offset, k_seg, backend="torch")
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    kb0 = kv_offset // BLOCK
    n_q = (q_offset % BLOCK + q_len + BLOCK - 1) // BLOCK
    q_end = q_offset + q_len
    out = torch.full((batch, hkv, n_q, pattern.topk_blocks), -1, dtype=torch.int32)
    for b in range(batch):
        real = [True] * kv_len if k_seg is None else [bool(x >= 0) for x in k_seg[b]]
        rank, seen = [], 0
        for s in range(kv_len):
            rank.append(kv_offset + seen if k_seg is None else seen)
            seen += int(real[s]) if k_seg is not None else 1
        tile_keys = {}
        for s in range(kv_len):
            tile_keys.setdefault((kv_offset + s) // BLOCK - kb0, []).append(s)
        for m in range(n_q):
            qb = q_offset // BLOCK + m
            q_last = min((qb + 1) * BLOCK - 1, q_end - 1)
            rows = [t for t in range(q_len) if (q_offset + t) // BLOCK == qb
                    and ((q_offset + t) % stride == stride - 1 or t == q_len - 1)]
            if k_seg is not None and q_offset >= kv_offset:
                rows = [t for t in rows if real[q_offset + t - kv_offset]]
            static = set()
            for n, keys in tile_keys.items():
                reals = [s for s in keys if real[s]]
                if kb0 + n > qb or not reals:
                    continue
                sink_only = pattern.sink_tokens and all(rank[s] < pattern.sink_tokens for s in reals)
                k_first = max((kb0 + n) * BLOCK, kv_offset)
                in_window = pattern.window is not None and q_last - k_first < pattern.window
                if sink_only or in_window:
                    static.add(n)
            for h in range(hkv):
                cand = [int(n) for n in cands[b, h, m] if n >= 0]
                allowed = [s for n in sorted(static | set(cand)) for s in tile_keys.get(n, []) if real[s]]
                mass = {n: 0.0 for n in cand}
                for t in rows:
                    pos = q_offset + t
                    keys = [s for s in allowed if kv_offset + s <= pos]
                    for g in range(group):
                        if not keys:
                            continue
                        scores = torch.stack([q[b, h * group + g, t].double() @ k[b, h, s].double() for s in keys])
                        probs = torch.softmax(scores / math.sqrt(dim), 0)
                        for s, p in zip(keys, probs, strict=True):
                            n = (kv_offset + s) // BLOCK - kb0
                            if n in mass:
                                mass[n] += float(p)
                norm = max(1, len(rows) * group)
                ranked = sorted(cand, key=lambda n: (-mass[n] / norm, n))[: pattern.topk_blocks]
                out[b, h, m, : len(ranked)] = torch.tensor(ranked, dtype=torch.int32)
    return out


SLOW_CASES = [  # batch, hq, hkv, q_len, kv_len, q_offset, padded, sink, window, topk, stride
    ("prefill-GQA", 1, 4, 2, 300, 300, 0, 0, 4, 64, 2, 16),
    ("pad-sink70-stride8", 2, 4, 2, 290, 290, 0, 1, 70, 100, 2, 8),
    ("chunk-at200-nowindow", 1, 2, 1, 120, 320, 200, 0, 0, None, 3, 16),
]


@pytest.mark.parametrize("case", SLOW_CASES, ids=[c[0] for c in SLOW_CASES])
def test_definition_equals_slow_reference(case):
    _, batch, hq, hkv, q_len, kv_len, q_offset, padded, sink, window, topk, stride = case
    q, k, k_seg = _inputs(batch, hq, hkv, q_len, kv_len, 8, padded, len(case[0]))
    pattern = SparsePattern(block_size=BLOCK, sink_tokens=sink, window=window, topk_blocks=topk, selector="refine",
                            probe_stride=stride)
    kv_offset = q_offset + q_len - kv_len
    got = select_refine(q, k, pattern, q_offset, kv_offset, k_seg, backend="torch")
    want = _slow_refine(q, k, pattern, q_offset, kv_offset, k_seg, stride)
    assert torch.equal(got, want)
    assert (got >= 0).any()


# --- the fused second stage equals the PyTorch definition (Triton CPU interpreter) ---------------------------------
KERNEL_CASES = [  # batch, hq, hkv, q_len, kv_len, q_offset, padded, sink, window, topk, dim, stride
    ("GQA-window", 1, 4, 2, 300, 300, 0, 0, 4, 64, 2, 16, 16),
    ("pad-group3", 2, 6, 2, 333, 333, 0, 1, 70, 100, 3, 16, 16),
    ("MQA-nowindow-nosink", 1, 4, 1, 200, 200, 0, 0, 0, None, 2, 16, 16),
    ("chunk37-at520", 1, 4, 2, 37, 560, 520, 0, 70, 100, 2, 16, 16),
    ("decode-pad-MQA", 2, 3, 1, 1, 390, 389, 1, 8, 128, 2, 16, 16),
    ("decode4-sink150", 1, 4, 2, 4, 700, 696, 0, 150, 64, 3, 64, 16),
    ("sliding-kv100", 1, 2, 2, 150, 300, 250, 0, 8, 100, 3, 16, 8),
    ("headdim128-stride32", 1, 4, 2, 260, 260, 0, 0, 4, 64, 2, 128, 32),
    ("all-sink", 1, 2, 1, 140, 140, 0, 0, 200, None, 2, 16, 16),
    ("headdim256-MQA", 1, 4, 1, 300, 300, 0, 0, 64, 128, 3, 256, 16),  # Gemma 3's shape
]


@pytest.fixture
def interpret():
    with triton_interpreter("selection", "probe", "refine"):
        yield


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_triton_kernel_matches_definition(case, interpret):
    _, batch, hq, hkv, q_len, kv_len, q_offset, padded, sink, window, topk, dim, stride = case
    q, k, k_seg = _inputs(batch, hq, hkv, q_len, kv_len, dim, padded, len(case[0]) + 1)
    pattern = SparsePattern(block_size=BLOCK, sink_tokens=sink, window=window, topk_blocks=topk, selector="refine",
                            probe_stride=stride)
    kv_offset = q_offset + q_len - kv_len
    got = select_refine(q, k, pattern, q_offset, kv_offset, k_seg, backend="triton")
    want = select_refine(q, k, pattern, q_offset, kv_offset, k_seg, backend="torch")
    assert got.shape == want.shape == (batch, hkv, (q_offset % BLOCK + q_len + BLOCK - 1) // BLOCK, topk)
    assert torch.equal(got, want)


def test_triton_kernel_bf16_selects_as_float32(interpret):
    """bfloat16 queries and keys (padding, GQA, chunked prefill): the kernels choose the tiles they choose for the
    same values in float32 (the interpreter's ``tl.dot`` misreads bf16 tiles; the launch hands it float32 copies)."""
    q, k, k_seg = _inputs(2, 4, 2, 150, 400, 64, True, 21)
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    pattern = SparsePattern(block_size=BLOCK, sink_tokens=64, window=64, topk_blocks=2, selector="refine")
    got = select_refine(q, k, pattern, 250, 0, k_seg, backend="triton")
    assert torch.equal(got, select_refine(q.float(), k.float(), pattern, 250, 0, k_seg, backend="triton"))


# --- what a user sees ------------------------------------------------------------------------------------------------
def test_pattern_rules():
    p = SparsePattern(block_size=BLOCK, window=64, topk_blocks=3, selector="refine", probe_stride=8)
    assert p.resolved_selector == "refine" and SparsePattern.from_dict(p.to_dict()) == p
    assert candidate_pattern(p).topk_blocks == REFINE_FACTOR * 3 and candidate_pattern(p).selector == "mass"
    assert p.replace(selector="mass").probe_stride is None
    with pytest.raises(ValueError, match="mass_threshold"):
        SparsePattern(block_size=BLOCK, window=64, topk_blocks=3, selector="refine", mass_threshold=0.9)
    with pytest.raises(ValueError, match="probe_stride"):
        SparsePattern(block_size=BLOCK, window=64, topk_blocks=3, selector="mass", probe_stride=8)


def test_select_tiles_dispatches_and_the_exact_stage_overrules_the_bound():
    """Tile 2 holds a key the last tile's sampled last row attends strongly; tile 4 a key along the tile's mean
    query, which the mass bound (mean query) ranks first. Refine, choosing among mass's candidates by the sampled
    rows' exact scores, keeps tile 2, as the probe does; "mass" keeps tile 4."""
    q, k, _ = _inputs(1, 2, 1, 512, 512, 16, 0, 3)
    pattern = SparsePattern(block_size=BLOCK, sink_tokens=0, window=64, topk_blocks=1, selector="refine")
    tiles = select_tiles(q, k, pattern, 0, 0, None)
    assert tiles.shape == (1, 1, 8, 1) and torch.equal(tiles, select_refine(q, k, pattern, 0, 0, None))
    k2 = k.clone()
    k2[0, 0, 130] = q[0, 0, 511] * 4
    k2[0, 0, 270] = q[0, :, 448:512].mean((0, 1)) * 10
    assert select_mass(q, k2, pattern.replace(selector="mass"), 0, 0, None, backend="torch")[0, 0, -1, 0] == 4
    assert select_refine(q, k2, pattern, 0, 0, None)[0, 0, -1, 0] == 2


def test_generate_runs_with_refine_and_matches_the_reference_kernels(interpret):
    """A tiny Llama with every layer under "refine": generate() with the dynamic cache; the Triton path (interpreter)
    gives the tokens of the PyTorch reference."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)  # head dim 64
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sparsek")
    hf_sparsek.set_pattern(model, {"block_size": BLOCK, "sink_tokens": 4, "window": 64, "topk_blocks": 2,
                                   "selector": "refine"})
    ids = torch.randint(1, 64, (2, 300), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :40], mask[1, :40] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with hf_sparsek.settings(backend="reference"):
        want = model.generate(ids, **kwargs)
    with hf_sparsek.settings(backend="triton"):
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
