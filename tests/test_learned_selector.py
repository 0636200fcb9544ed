"""The learned block selector (issue 23): its tiles against a slow reference of its own definition, the decode
store against recomputing, generate() with a cache against one uncached forward, and a tiny model whose scorer
distils (loss falls), saves and reloads through from_pretrained with identical logits (CPU, tiny)."""

from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_sparsek
from hf_sparsek.learned import (
    SCORER_FILE,
    DistillConfig,
    LearnedSelector,
    attach_selector,
    distill,
    load_selector,
    save_selector,
)
from hf_sparsek.learned.features import key_tile_features
from hf_sparsek.learned.scorer import distance_buckets

BLOCK = 64


def _perturbed(selector: LearnedSelector, seed: int = 0) -> LearnedSelector:
    """Every parameter moved off its initial value, so each term of the scorer matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in selector.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return selector


# ------------------------------------------------------------------------------------------- slow reference
def _reference_tiles(selector, layer, q, k, topk, sink, window, q_offset, kv_offset, valid):
    """The selector's definition, loop by loop: lagged mean queries, [mean, max, min] keys, the competing tiles,
    the scorer's formula per (query tile, key tile), the k best (lower tile first among equals)."""
    scorer = selector.scorer(layer)
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    key_pos = [kv_offset + s for s in range(kv_len)]
    q_pos = [q_offset + t for t in range(q_len)]
    qb_list = sorted({p // BLOCK for p in q_pos})
    kb_list = sorted({p // BLOCK for p in key_pos})
    width = min(topk, len(kb_list))
    out = torch.full((batch, hkv, len(qb_list), width + (window is None)), -1, dtype=torch.int32)
    for b in range(batch):
        real = [True] * kv_len if valid is None else [bool(x) for x in valid[b]]
        rank, seen = [], 0
        for s in range(kv_len):
            rank.append((kv_offset + s) if valid is None else seen - 1 + int(real[s]))
            seen += int(real[s])
        for h in range(hkv):
            def qmean(tile, b=b, h=h, real=real):
                rows = [t for t in range(q_len) if q_pos[t] // BLOCK == tile
                        and real[q_pos[t] - kv_offset]]
                if not rows:
                    return torch.zeros(dim)
                return torch.stack([q[b, h * group + g, t] for t in rows for g in range(group)]).mean(0)

            def kfeat(tile, b=b, h=h, real=real):
                keys = [k[b, h, s] for s in range(kv_len) if key_pos[s] // BLOCK == tile and real[s]]
                if not keys:
                    return torch.zeros(3 * dim)
                x = torch.stack(keys)
                return torch.cat([x.mean(0), x.amax(0), x.amin(0)])

            for m, qb in enumerate(qb_list):
                qf = qmean(qb if m == 0 or selector.query_rows == "own" else qb - 1)
                # tiles the window keeps whole for the tile's last row do not compete; its edge tile does
                limit = qb if window is None else min(qb, math.floor((qb * BLOCK + BLOCK - 1 - window) / BLOCK) + 1)
                scored = []
                for kb in kb_list:
                    members = [s for s in range(kv_len) if key_pos[s] // BLOCK == kb]
                    if not kb < limit or not any(real[s] for s in members):
                        continue
                    if kb == kb_list[0] and kv_offset % BLOCK:
                        continue
                    if sink and all(rank[s] < sink for s in members if real[s]):  # kept whole by the sink
                        continue
                    kf = kfeat(kb)
                    logit = float(scorer.u[h] @ kf)
                    if scorer.mode == "query":
                        logit += float((scorer.wq[h] @ qf) @ (scorer.wk[h] @ kf)) * math.exp(float(scorer.log_scale[h]))
                    bucket = int(distance_buckets(torch.tensor([qb]), torch.tensor([kb]), scorer.buckets))
                    scored.append((-(logit + float(scorer.bias[h, bucket])), kb))
                for j, (_, kb) in enumerate(sorted(scored)[:width]):
                    out[b, h, m, j] = kb
                if window is None:
                    out[b, h, m, -1] = qb
    return out


CASES = [  # batch, q heads, kv heads, q_len, kv_len, q_offset, padded rows, sink, window, topk, mode
    ("B1-T300-Hq4-Hk2", 1, 4, 2, 300, 300, 0, 0, 4, 64, 2, "query"),
    ("B1-T257-MQA-nowindow", 1, 4, 1, 257, 257, 0, 0, 0, None, 2, "query"),
    ("B1-chunk37-at520-Hq2-Hk2", 1, 2, 2, 37, 560, 520, 0, 70, 100, 2, "query"),
    ("B1-decode-at399-key", 1, 4, 2, 1, 400, 399, 0, 4, 64, 3, "key"),
    ("B2-T333-pad-GQA", 2, 6, 2, 333, 333, 0, 1, 4, 64, 2, "query"),
    ("B2-decode-pad-MQA", 2, 3, 1, 1, 390, 389, 1, 8, 128, 2, "query"),
]


def _case_inputs(batch: int, hq: int, hkv: int, q_len: int, kv_len: int, padded: int, seed: int, dim: int = 8
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q, k (keys drifting along the sequence, so tiles differ in a way scores can see) and the valid mask (the
    second row left padded past a whole tile) of one awkward-shape case."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, q_len, dim, generator=gen)
    k = torch.randn(batch, hkv, kv_len, dim, generator=gen)
    k[..., 0] += torch.linspace(-2, 2, kv_len)
    valid = None
    if padded:
        valid = torch.ones(batch, kv_len, dtype=torch.bool)
        valid[1, :75] = False
    return q, k, valid


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tiles_equal_slow_reference(case):
    _, batch, hq, hkv, q_len, kv_len, q_offset, padded, sink, window, topk, mode = case
    dim = 8
    q, k, valid = _case_inputs(batch, hq, hkv, q_len, kv_len, padded, len(case[0]))
    selector = _perturbed(LearnedSelector([0], hkv, dim, BLOCK, mode), seed=len(case[0]))
    fast = selector.select(0, q, k, topk, sink, window, q_offset, 0, valid, use_store=False)
    with torch.no_grad():
        slow = _reference_tiles(selector, 0, q, k, topk, sink, window, q_offset, 0, valid)
    assert torch.equal(fast, slow)
    assert (fast >= 0).any()  # something was chosen


# ------------------------------------------------------------------------------------------- the Triton path
@pytest.fixture
def interpret():
    """TRITON_INTERPRET=1 for the learned selector's kernels (CPU)."""
    from conftest import triton_interpreter

    with triton_interpreter("selection", "learned_selection"):  # the learned kernels call selection's helpers
        yield


FUSED_CASES = [  # batch, q heads, kv heads, q_len, kv_len, q_offset, kv_offset, padded, sink, window, topk, mode
    ("chunk250-at77", 1, 4, 2, 250, 327, 77, 0, 0, 4, 64, 2, "query"),
    ("sliding-kv100-q250", 1, 2, 1, 150, 300, 250, 100, 0, 8, 100, 3, "query"),
    ("pad-group3-sink70", 2, 6, 2, 300, 300, 0, 0, 1, 70, 100, 3, "query"),
    ("key-untrained-ties-topk9", 1, 2, 2, 400, 400, 0, 0, 0, 4, 64, 9, "key-untrained"),
    ("nowindow-MQA", 2, 4, 1, 260, 260, 0, 0, 1, 0, None, 2, "query"),
    ("key-mode-chunk", 1, 4, 2, 190, 390, 200, 0, 0, 4, 64, 2, "key"),
    # 46 key tiles: top-5 inserts into the running top-k chunk by chunk; top-40 merges 64 slots from two chunks
    ("many-tiles-topk5", 2, 4, 2, 300, 2900, 2600, 0, 1, 4, 64, 5, "query"),
    ("many-tiles-topk40", 1, 2, 1, 300, 2900, 2600, 0, 0, 4, 64, 40, "key"),
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=[c[0] for c in FUSED_CASES])
def test_triton_path_equals_slow_reference(case, interpret):
    """The pooling and fused top-k kernels (interpreter) choose the definition's tiles on awkward shapes: chunks at
    unaligned offsets, a cache whose first tile the call cuts, padding, group 3, a sink over a whole tile, all-equal
    scores (the lower tiles win), a budget above the competing tiles, no window."""
    _, batch, hq, hkv, q_len, kv_len, q_offset, kv_offset, padded, sink, window, topk, mode = case
    dim = 8
    q, k, valid = _case_inputs(batch, hq, hkv, q_len, kv_len, padded, len(case[0]) + 7)
    selector = LearnedSelector([0], hkv, dim, BLOCK, mode.split("-")[0])
    if not mode.endswith("untrained"):
        _perturbed(selector, seed=len(case[0]))
    fast = selector.select(0, q, k, topk, sink, window, q_offset, kv_offset, valid, use_store=False,
                           backend="triton")
    with torch.no_grad():
        slow = _reference_tiles(selector, 0, q, k, topk, sink, window, q_offset, kv_offset, valid)
    assert torch.equal(fast, slow)
    assert (fast >= 0).any()
    if mode == "key-untrained":  # every score equal: each query tile keeps its earliest competing tiles, in order
        row = fast[0, 0, -1].tolist()  # last query tile (6): tiles 0-5 compete (the window keeps 5's successor)
        assert row == [0, 1, 2, 3, 4, 5, -1]  # width: min(budget, key tiles)


def test_triton_decode_shapes_through_the_fused_kernel(interpret, monkeypatch):
    """Decode calls (one query tile) go through the fused kernel below ``SHORT_MIN_KEY_TILES`` key tiles and score
    in PyTorch above it; both choose what the PyTorch backend chooses, with padding and a longer cache, and the
    decode store keeps the same key features with either backend."""
    import hf_sparsek.learned.selector as selector_module

    gen = torch.Generator().manual_seed(11)
    batch, hq, hkv, dim, total = 2, 6, 2, 8, 700
    q = torch.randn(batch, hq, total, dim, generator=gen)
    k = torch.randn(batch, hkv, total, dim, generator=gen)
    valid = torch.ones(batch, total, dtype=torch.bool)
    valid[0, :90] = False
    selector = _perturbed(LearnedSelector([1], hkv, dim, BLOCK), seed=3)
    args = dict(topk=3, sink_tokens=4, window=64, kv_offset=0)
    for long_from in (256, 5):  # 11 key tiles: the fused kernel; then the PyTorch scoring from 5 key tiles on
        monkeypatch.setattr(selector_module, "SHORT_MIN_KEY_TILES", long_from)
        for end in (641, 700):
            qs, ks, vs = q[:, :, end - 1:end], k[:, :, :end], valid[:, :end]
            fused = selector.select(1, qs, ks, q_offset=end - 1, valid=vs, use_store=False, backend="triton",
                                    **args)
            torch_path = selector.select(1, qs, ks, q_offset=end - 1, valid=vs, use_store=False, backend="torch",
                                         **args)
            assert torch.equal(fused, torch_path), end
            assert (fused >= 0).all()
    selector.select(1, q[:, :, :640], k[:, :, :640], q_offset=0, valid=valid[:, :640], backend="triton", **args)
    stored = selector.stores[1].key_features
    torch.testing.assert_close(stored, key_tile_features(k[:, :, :640], valid[:, :640], 0, BLOCK))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_does_not_change_the_choice(backend, interpret):
    """A training run's bf16 autocast around the model: the selector still scores in float32 (the fused kernel takes
    float32 projections; under autocast they came out bf16 and the GPU compile failed) and chooses the same tiles."""
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(1, 4, 300, 16, generator=gen)
    k = torch.randn(1, 2, 300, 16, generator=gen)
    selector = _perturbed(LearnedSelector([0], 2, 16, BLOCK), seed=4)
    args = dict(topk=2, sink_tokens=4, window=64, q_offset=0, kv_offset=0, valid=None, use_store=False,
                backend=backend)
    plain = selector.select(0, q, k, **args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = selector.select(0, q, k, **args)
    assert torch.equal(plain, mixed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [64, 80, 128, 256])
def test_triton_pooling_and_gate_widths(dtype, dim, interpret):
    """Pooling reads q / k in their own dtype (bf16: no float copy) and equals the float PyTorch features; head dims
    64 / 80 / 128 / 256 (80 is zero-padded to the gate's width) choose the PyTorch path's tiles."""
    from hf_sparsek.learned.features import query_tile_sums

    gen = torch.Generator().manual_seed(dim)
    batch, hq, hkv, length, offset = 2, 8, 2, 200, 30
    q = torch.randn(batch, hq, length, dim, generator=gen).to(dtype)
    k = torch.randn(batch, hkv, length + offset, dim, generator=gen).to(dtype)
    valid = torch.ones(batch, length + offset, dtype=torch.bool)
    valid[1, :100] = False
    q_valid = valid[:, offset:]
    for use_triton in (False, True):
        feats = key_tile_features(k, valid, 0, BLOCK, use_triton)
        sums, counts = query_tile_sums(q, q_valid, offset, BLOCK, hkv, use_triton)
        if not use_triton:
            want_feats, want_sums, want_counts = feats, sums, counts
    torch.testing.assert_close(feats, want_feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(counts, want_counts, rtol=0, atol=0)
    selector = _perturbed(LearnedSelector([0], hkv, dim, BLOCK), seed=dim)
    got = selector.select(0, q, k, 4, 4, 64, offset, 0, valid, use_store=False, backend="triton")
    want = selector.select(0, q, k, 4, 4, 64, offset, 0, valid, use_store=False, backend="torch")
    assert torch.equal(got, want)


@pytest.mark.parametrize("dim", [80, 128])
def test_triton_pooling_split_over_the_head_dim(dim, interpret):
    """The CUDA launch pools each (tile, head) with several programs, each a share of the head dim: the same features
    and counts as one program per tile (padding, an offset, a group of 4); a split that leaves shares under 16
    columns is refused."""
    from hf_sparsek.kernels.learned_selection import pool_tiles

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 230, dim, generator=gen).to(torch.bfloat16)
    seg = torch.zeros(2, 230, dtype=torch.int32)
    seg[1, :90] = -1
    for stats, heads in ((True, 8), (False, 2)):
        want = pool_tiles(x, 40, BLOCK, seg, 0, key_stats=stats, out_heads=heads, d_split=1)
        for split in (2, 4):
            got = pool_tiles(x, 40, BLOCK, seg, 0, key_stats=stats, out_heads=heads, d_split=split)
            assert torch.equal(got[0], want[0]) and (stats or torch.equal(got[1], want[1]))
    with pytest.raises(ValueError, match="d_split"):
        pool_tiles(x, 0, BLOCK, None, 0, key_stats=True, out_heads=8, d_split=16)


@pytest.mark.parametrize("mode", ["query", "key"])
def test_kernel_inputs_equal_the_scorer_and_follow_its_parameters(mode):
    """The fused kernel's factors (the gate folded onto the keys: qbar . (s Wq^T Wk kfeat) + u . kfeat) give the
    scorer's logits without the bias, at a padded gate width (head dim 80 -> 128), and the cached folded weights
    follow every change of the parameters: an in-place step, ``load_state_dict``."""
    from hf_sparsek.kernels.learned_selection import gate_width

    gen = torch.Generator().manual_seed(21)
    dim, width = 80, gate_width(80)
    scorer = _perturbed(LearnedSelector([0], 2, dim, BLOCK, mode), seed=6).scorer(0)
    q_feat = torch.randn(2, 2, 5, dim, generator=gen)
    k_feat = torch.randn(2, 2, 7, 3 * dim, generator=gen)
    qb, kb = torch.arange(5) + 3, torch.arange(7)

    def check():
        with torch.no_grad():
            qp, kp, const = scorer.kernel_inputs(q_feat, k_feat, width)
            want = scorer(q_feat, k_feat, qb, kb) - scorer.bias[:, distance_buckets(qb, kb)].unsqueeze(0)
        got = const.unsqueeze(2).expand_as(want)
        if mode == "query":
            assert qp.shape[-1] == kp.shape[-1] == width and qp.stride(-1) == kp.stride(-1) == 1
            got = got + qp @ kp.transpose(-1, -2)
        else:
            assert qp is None and kp is None
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    check()
    with torch.no_grad():
        for p in scorer.parameters():
            p.mul_(-0.5)  # an optimizer's in-place step
    check()
    other = _perturbed(LearnedSelector([0], 2, dim, BLOCK, mode), seed=8).scorer(0)
    scorer.load_state_dict(other.state_dict())
    check()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_selector_made_under_inference_mode(backend, interpret):
    """A scorer loaded inside ``torch.inference_mode`` (a model's first call there loads it lazily) has inference
    tensors without version counters: the fused path still runs (its folded weights are not cached then) and
    chooses the PyTorch path's tiles, also after its parameters change in place."""
    gen = torch.Generator().manual_seed(23)
    q = torch.randn(1, 4, 300, 16, generator=gen)
    k = torch.randn(1, 2, 300, 16, generator=gen)
    args = dict(topk=2, sink_tokens=4, window=64, q_offset=0, kv_offset=0, valid=None, use_store=False)
    with torch.inference_mode():
        selector = _perturbed(LearnedSelector([0], 2, 16, BLOCK), seed=4)
        assert selector.scorer(0).wq.is_inference()
        for _ in range(2):
            got = selector.select(0, q, k, backend=backend, **args)
            assert torch.equal(got, selector.select(0, q, k, backend="torch", **args))
            _perturbed(selector, seed=5)


def test_bad_backend_is_refused():
    selector = LearnedSelector([0], 1, 8, BLOCK)
    q, k = torch.randn(1, 1, 70, 8), torch.randn(1, 1, 70, 8)
    with pytest.raises(ValueError, match="backend must be"):
        selector.select(0, q, k, 2, 0, 64, 0, 0, None, backend="cuda")


def test_untrained_query_scorer_ranks_like_mean_pool():
    """Identity initialisation: the untrained query scorer's logits are (previous tile's mean query) . (mean key) /
    sqrt(D), the training-free mean-pool score, with no bias."""
    selector = LearnedSelector([0], 2, 16, BLOCK)
    gen = torch.Generator().manual_seed(3)
    q_feat, k_feat = torch.randn(1, 2, 3, 16, generator=gen), torch.randn(1, 2, 5, 48, generator=gen)
    logits = selector.scorer(0)(q_feat, k_feat, torch.arange(3), torch.arange(5))
    want = torch.einsum("bhmd,bhnd->bhmn", q_feat, k_feat[..., :16]) / 4.0
    torch.testing.assert_close(logits, want)


# ------------------------------------------------------------------------------------------- the decode store
def test_store_incremental_equals_scratch():
    gen = torch.Generator().manual_seed(5)
    batch, hq, hkv, dim, total = 2, 4, 2, 8, 200
    q_all = torch.randn(batch, hq, total, dim, generator=gen)
    k_all = torch.randn(batch, hkv, total, dim, generator=gen)
    valid = torch.ones(batch, total, dtype=torch.bool)
    valid[0, :9] = False
    selector = _perturbed(LearnedSelector([1], hkv, dim, BLOCK))
    args = dict(topk=2, sink_tokens=4, window=64)

    def step(lo: int, hi: int) -> torch.Tensor:
        return selector.select(1, q_all[:, :, lo:hi], k_all[:, :, :hi], q_offset=lo, kv_offset=0,
                               valid=valid[:, :hi], **args)

    # One long call over every row: the tiles each query tile gets when nothing is cut.
    whole = selector.select(1, q_all, k_all, q_offset=0, kv_offset=0, valid=valid, use_store=False, **args)
    step(0, 120)  # prefill
    store = selector.stores[1]
    for end in range(121, total + 1):
        tiles = step(end - 1, end)
        scratch = selector.select(1, q_all[:, :, :end], k_all[:, :, :end], q_offset=0, kv_offset=0,
                                  valid=valid[:, :end], use_store=False, **args)
        assert torch.equal(tiles[:, :, -1], scratch[:, :, -1]), end  # the store = recomputing from scratch
        # ... and the row decoded now gets the tiles the long call gives its tile (rows after it do not matter)
        assert torch.equal(tiles[:, :, -1], whole[:, :, (end - 1) // BLOCK]), end
        complete = end // BLOCK
        want = key_tile_features(k_all[:, :, : complete * BLOCK], valid[:, : complete * BLOCK], 0, BLOCK)
        torch.testing.assert_close(store.key_features, want, rtol=0, atol=0)
    assert store.recomputed == 0
    # The cache shrinks (a new, shorter prompt of the same batch): features are recomputed from the keys.
    other = torch.randn(batch, hkv, 150, dim, generator=gen)
    selector.select(1, q_all[:, :, :150], other, q_offset=0, kv_offset=0, valid=valid[:, :150], **args)
    assert store.recomputed == 1
    torch.testing.assert_close(store.key_features, key_tile_features(other[:, :, :128], valid[:, :128], 0, BLOCK))
    # Longer, but different keys (the earlier sequence again): the fingerprint catches it.
    selector.select(1, q_all[:, :, 149:151], k_all[:, :, :151], q_offset=149, kv_offset=0, valid=valid[:, :151],
                    **args)
    assert store.recomputed >= 2
    torch.testing.assert_close(store.key_features, key_tile_features(k_all[:, :, :128], valid[:, :128], 0, BLOCK))



def test_first_layer_store_follows_rows_swapped_inside_a_tile():
    """A first layer's keys depend on their token and position only: after a beam-search-like swap of two rows that
    differ inside a tile but not at its last key, the fingerprints match. Layer 0 therefore pools its key tiles from
    the keys on every call (``fingerprints_identify_history``) and chooses what recomputing from scratch chooses."""
    gen = torch.Generator().manual_seed(8)
    hq, hkv, dim, total = 4, 2, 8, 260
    q_row = torch.randn(1, hq, total, dim, generator=gen)
    k_row = torch.randn(1, hkv, total, dim, generator=gen)
    q_all, k_all = q_row.repeat(2, 1, 1, 1), k_row.repeat(2, 1, 1, 1)
    pull = q_row[0, :: hq // hkv, 130:].mean(1)  # (Hkv, D): where the later queries point
    k_all[0, :, 70:120] += 4 * pull[:, None]  # tile 1 strongly relevant in row 0 only; its last key (127) shared
    k_all[1, :, 70:120] -= 4 * pull[:, None]
    selector = _perturbed(LearnedSelector([0], hkv, dim, BLOCK))
    args = dict(topk=1, sink_tokens=0, window=64, kv_offset=0, valid=None)
    selector.select(0, q_all[:, :, :250], k_all[:, :, :250], q_offset=0, **args)  # prefill: tiles 0-2 complete
    swap = torch.tensor([1, 0])
    qs, ks = q_all[swap], k_all[swap]
    tiles = selector.select(0, qs[:, :, 250:251], ks[:, :, :251], q_offset=250, **args)
    scratch = selector.select(0, qs[:, :, :251], ks[:, :, :251], q_offset=0, use_store=False, **args)
    assert torch.equal(tiles[:, :, -1], scratch[:, :, -1])
    assert not torch.equal(scratch[0, :, -1], scratch[1, :, -1])  # the rows choose differently: a real check


OWN_CASES = [  # (case from CASES or FUSED_CASES, backend, whether the previous tile's rows choose other tiles there)
    (CASES[0], "torch", True), (CASES[2], "torch", False), (CASES[4], "torch", True), (CASES[5], "torch", False),
    (FUSED_CASES[0], "triton", True), (FUSED_CASES[2], "triton", False), (FUSED_CASES[4], "triton", False),
    (FUSED_CASES[6], "triton", True),
]


@pytest.mark.parametrize("case,backend,differs", OWN_CASES, ids=[f"{c[0]}-{b}" for c, b, _ in OWN_CASES])
def test_own_query_rows_equal_slow_reference(case, backend, differs, request):
    """``query_rows="own"``: each query tile's feature is the mean of its own rows in the call (both backends, the
    definition's loops): chunks at unaligned offsets, padding, group 3, MQA without a window, decode."""
    if backend == "triton":
        request.getfixturevalue("interpret")
        _, batch, hq, hkv, q_len, kv_len, q_offset, kv_offset, padded, sink, window, topk, mode = case
    else:
        _, batch, hq, hkv, q_len, kv_len, q_offset, padded, sink, window, topk, mode = case
        kv_offset = 0
    dim = 8
    q, k, valid = _case_inputs(batch, hq, hkv, q_len, kv_len, padded, len(case[0]) + 3)
    selector = _perturbed(LearnedSelector([0], hkv, dim, BLOCK, mode.split("-")[0], query_rows="own"), seed=9)
    fast = selector.select(0, q, k, topk, sink, window, q_offset, kv_offset, valid, use_store=False, backend=backend)
    with torch.no_grad():
        slow = _reference_tiles(selector, 0, q, k, topk, sink, window, q_offset, kv_offset, valid)
        lagged = LearnedSelector([0], hkv, dim, BLOCK, mode.split("-")[0])
        lagged.load_state_dict(selector.state_dict())
        previous = lagged.select(0, q, k, topk, sink, window, q_offset, kv_offset, valid, use_store=False,
                                 backend=backend)
    assert torch.equal(fast, slow)
    assert (fast >= 0).any()
    assert torch.equal(fast, previous) != differs  # the option is not ignored (where the rows matter)


def test_own_query_rows_decode_reads_the_tile_so_far():
    """With the store, a decode step under ``query_rows="own"`` pools every row of its tile up to itself (rows of
    earlier calls included): its tiles equal those a call over exactly those rows gives its last tile, and the
    option survives saving and loading; a file without it loads as ``previous``."""
    gen = torch.Generator().manual_seed(15)
    batch, hq, hkv, dim, total = 2, 4, 2, 8, 230
    q_all = torch.randn(batch, hq, total, dim, generator=gen)
    k_all = torch.randn(batch, hkv, total, dim, generator=gen)
    valid = torch.ones(batch, total, dtype=torch.bool)
    valid[0, :9] = False
    selector = _perturbed(LearnedSelector([0], hkv, dim, BLOCK, query_rows="own"), seed=2)
    args = dict(topk=2, sink_tokens=4, window=64, kv_offset=0)
    selector.select(0, q_all[:, :, :150], k_all[:, :, :150], q_offset=0, valid=valid[:, :150], **args)
    for end in range(151, total + 1):
        tiles = selector.select(0, q_all[:, :, end - 1:end], k_all[:, :, :end], q_offset=end - 1,
                                valid=valid[:, :end], **args)
        start = (end - 1) // BLOCK * BLOCK
        so_far = selector.select(0, q_all[:, :, start:end], k_all[:, :, :end], q_offset=start,
                                 valid=valid[:, :end], use_store=False, **args)
        assert torch.equal(tiles[:, :, -1], so_far[:, :, -1]), end
    assert selector.stores[0].recomputed == 0


def test_query_rows_saved_and_checked(tmp_path):
    selector = _perturbed(LearnedSelector([0, 2], 2, 8, 64, query_rows="own"))
    save_selector(selector, tmp_path)
    assert load_selector(tmp_path).query_rows == "own"
    with pytest.raises(ValueError, match="query_rows"):
        LearnedSelector([0], 2, 8, 64, query_rows="next")
    with pytest.raises(ValueError, match="query_rows"):
        DistillConfig(model="x", output_dir="y", query_rows="both")


def test_store_on_the_device_equals_scratch(interpret):
    """The Triton store (reuse decided on the device, no host read) keeps what recomputing from the keys gives,
    through prefill, decode steps across tile boundaries, a cache swapped for other keys of the same shape (the
    fingerprint catches it on the device) and a batch row whose fingerprint alone changed."""
    gen = torch.Generator().manual_seed(6)
    batch, hq, hkv, dim, total = 2, 4, 2, 8, 200
    q_all = torch.randn(batch, hq, total, dim, generator=gen).to(torch.bfloat16)
    k_all = torch.randn(batch, hkv, total, dim, generator=gen).to(torch.bfloat16)
    valid = torch.ones(batch, total, dtype=torch.bool)
    valid[0, :9] = False
    selector = _perturbed(LearnedSelector([1], hkv, dim, BLOCK))
    args = dict(topk=2, sink_tokens=4, window=64, kv_offset=0, backend="triton")

    def step(k: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return selector.select(1, q_all[:, :, lo:hi], k[:, :, :hi], q_offset=lo, valid=valid[:, :hi], **args)

    def scratch(k: torch.Tensor, end: int) -> torch.Tensor:
        return selector.select(1, q_all[:, :, :end], k[:, :, :end], q_offset=0, valid=valid[:, :end],
                               use_store=False, **args)

    step(k_all, 0, 120)
    store = selector.stores[1]
    for end in [*range(121, 132), *range(190, total)]:
        if end == 190:
            step(k_all, 131, 189)  # a chunk brings the cache to 189
        tiles = step(k_all, end - 1, end)
        assert torch.equal(tiles[:, :, -1], scratch(k_all, end)[:, :, -1]), end
        complete = end // BLOCK
        want = key_tile_features(k_all[:, :, : complete * BLOCK], valid[:, : complete * BLOCK], 0, BLOCK)
        torch.testing.assert_close(store.key_features, want, rtol=1e-6, atol=1e-6)
        assert bool(store.reused.all())
    other = k_all.clone()
    other[1] = torch.randn(hkv, total, dim, generator=gen).to(torch.bfloat16)  # row 1 now holds other keys
    step(other, total - 1, total)  # the next decode step, over the swapped cache
    assert store.reused.tolist() == [[True, True], [False, False]]
    torch.testing.assert_close(store.key_features, key_tile_features(other[:, :, :192], valid[:, :192], 0, BLOCK),
                               rtol=1e-6, atol=1e-6)
    assert store.recomputed == 0  # the host never had to know


# ------------------------------------------------------------------------------------------- the model paths
PATTERN = {"block_size": BLOCK, "sink_tokens": 0, "window": 64, "topk_blocks": 2}


def _tiny(seed: int = 0, sharpen: float = 1.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # peaked attention: block masses that differ, something to distil
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return model.eval()


def _distil_inputs(tmp_path, seed: int, docs_seed: int) -> list[list[int]]:
    """A sharpened tiny model saved as ``tmp_path / "base"`` and three random 450-token documents written to
    ``tmp_path / "docs.json"`` (distillation's inputs); returns the documents."""
    model = _tiny(seed, sharpen=4.0)
    model.save_pretrained(tmp_path / "base")
    gen = torch.Generator().manual_seed(docs_seed)
    docs = [torch.randint(3, 48, (450,), generator=gen).tolist() for _ in range(3)]
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    return docs


def _learned_model(pattern: dict) -> LlamaForCausalLM:
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked attention: selections that differ between rows
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    model.set_attn_implementation("sparsek")
    hf_sparsek.set_pattern(model, {**pattern, "selector": "learned"})
    attach_selector(model, _perturbed(LearnedSelector.for_model(model, BLOCK), seed=2))
    return model


def test_beam_search_and_alternating_caches_equal_uncached_forwards():
    """The decode store's query state follows the cache's rows: a beam search (which reorders them every step) scores
    each step as one uncached forward does, and so does a generation continued from its cache after another
    conversation ran on the same model (the store once continued from the other one's rows), or after a scoring
    call without a cache."""
    model = _learned_model({"block_size": BLOCK, "sink_tokens": 16, "window": 64, "topk_blocks": 2})
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(3, 120, (1, 240), generator=gen)
    out = model.generate(input_ids=a, max_new_tokens=100, min_new_tokens=100, do_sample=False, num_beams=3,
                         num_return_sequences=3, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                         length_penalty=0.0)
    scores = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    with torch.no_grad():
        full = model(input_ids=out.sequences, use_cache=False).logits[:, 239:-1].log_softmax(-1)
    torch.testing.assert_close(scores, full.gather(-1, out.sequences[:, 240:, None])[..., 0], rtol=1e-4, atol=1e-4)
    model = _learned_model({"block_size": BLOCK, "sink_tokens": 0, "window": 64, "topk_blocks": 1})
    a, b = (torch.randint(3, 120, (1, 230), generator=gen) for _ in range(2))
    args = dict(do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    first = model.generate(input_ids=a, max_new_tokens=20, min_new_tokens=20, **args)
    model.generate(input_ids=b, max_new_tokens=20, min_new_tokens=20, **args)  # the same lengths as a's
    with torch.no_grad():
        model(input_ids=first.sequences, use_cache=False)  # scoring the text so far
    more = model.generate(input_ids=first.sequences, past_key_values=first.past_key_values, max_new_tokens=40,
                          min_new_tokens=40, output_logits=True, **args)
    with torch.no_grad():
        full = model(input_ids=more.sequences, use_cache=False).logits[:, 249:-1]
    torch.testing.assert_close(torch.stack(more.logits, 1), full, rtol=1e-4, atol=1e-4)


def test_generate_with_cache_equals_uncached_forward():
    """Batch 2, the second row left padded: every decode step's logits equal one uncached forward's."""
    padded = True
    model = _tiny(1, sharpen=3.0)
    model.set_attn_implementation("sparsek")
    hf_sparsek.set_pattern(model, {**PATTERN, "selector": "learned"})
    attach_selector(model, _perturbed(LearnedSelector.for_model(model, BLOCK), seed=2))
    gen = torch.Generator().manual_seed(4)
    prompt, new = 244, 20  # decode crosses the tile boundary at 256: a new query tile, a new complete key tile
    ids = torch.randint(3, 48, (2 if padded else 1, prompt), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :70], mask[1, :70] = 0, 0
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    steps = torch.stack(out.logits, dim=1)  # (B, new, vocab)
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
    with torch.no_grad():
        full = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions,
                     use_cache=False).logits
    torch.testing.assert_close(steps, full[:, prompt - 1 : -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("prompt,new,window,cache", [(20, 120, 32, "dynamic"), (63, 140, 64, "static")],
                         ids=["short-prompt", "static-cache"])
def test_generate_across_tiles_equals_uncached_forward(backend, prompt, new, window, cache, monkeypatch):
    """Cached generate() equals one uncached forward per step, on the PyTorch store and the device-side (Triton,
    interpreter) store: a prompt of fewer tokens than one tile (no complete key tile yet: the store holds none),
    and a static cache, whose every slot the layers see from the prefill on (a tile counts as complete only once
    written; kept from unwritten slots, tile 1 scored stale until the fingerprint moved)."""
    from conftest import triton_interpreter

    model = _tiny(3, sharpen=3.0)
    model.set_attn_implementation("sparsek")
    hf_sparsek.set_pattern(model, {**PATTERN, "window": window, "topk_blocks": 1, "selector": "learned"})
    selector = _perturbed(LearnedSelector.for_model(model, BLOCK), seed=5)
    if backend == "triton":  # the GPU's path on the CPU: the selector's "auto" picks Triton as on CUDA
        original = selector.select
        monkeypatch.setattr(selector, "select", lambda *a, **kw: original(*a, **{**kw, "backend": "triton"}))
    attach_selector(model, selector)
    ids = torch.randint(3, 48, (1, prompt), generator=torch.Generator().manual_seed(8))
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    modules = ("selection", "learned_selection", "selection_store")
    with triton_interpreter(*modules) if backend == "triton" else nullcontext():
        out = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
        with torch.no_grad():
            full = model(input_ids=out.sequences, use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, prompt - 1 : -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["falcon", "deepseek_v3", "gemma3_text", "qwen3"])
def test_generate_across_architectures(model_type):
    """A fresh selector sized from the config (Falcon's single KV head, DeepSeek's latent attention with its own
    query / key head dim, Gemma 3's sliding layers, Qwen 3's q/k norms): cached generate() with left padding equals
    one uncached forward per step."""
    from scripts.arch_sweep import tiny_config

    config = tiny_config(model_type)
    config.vocab_size = 100
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    try:
        model.set_attn_implementation("sparsek")
        hf_sparsek.set_pattern(model, {"block_size": BLOCK, "sink_tokens": 4, "window": 64, "topk_blocks": 2,
                                       "selector": "learned"})
    except ValueError as err:  # transformers 5.17's Falcon computes attention in its own code: refused, by name
        assert "attention interface" in str(err)
        pytest.skip(f"{model_type} on this transformers: {err}")
    attach_selector(model, _perturbed(LearnedSelector.for_model(model, BLOCK), seed=2))
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 100, (2, 200), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :70], mask[1, :70] = 0, 0
    new = 8
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(input_ids=out.sequences, attention_mask=full_mask,
                     position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, 199:-1], rtol=1e-4, atol=1e-4)


def test_distil_save_reload_and_missing_scorer(tmp_path):
    docs = _distil_inputs(tmp_path, 2, 6)
    config = DistillConfig(model=str(tmp_path / "base"), output_dir=str(tmp_path / "run"),
                           train_data=str(tmp_path / "docs.json"), heldout_docs=1, seq_len=448, train_windows=2,
                           eval_windows=1, steps=40, lr=2e-2, log_every=5, save_every=20, cpu=True,
                           compare_library=False,
                           pattern={**PATTERN, "window": 128})
    result = distill(config)
    losses = result.metrics["losses"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # the scorer learns
    log = [json.loads(line) for line in (tmp_path / "run" / "distill_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(5, 45, 5))
    cov = result.metrics["heldout"]["coverage"]
    assert cov["static"] <= cov["learned"] <= cov["oracle"] + 1e-9

    final = tmp_path / "run" / "final"
    reloaded = AutoModelForCausalLM.from_pretrained(final, attn_implementation="sparsek").eval()
    assert reloaded.config.sparsek["default"]["selector"] == "learned"
    trained = result.model
    trained.set_attn_implementation("sparsek")
    hf_sparsek.set_pattern(trained, reloaded.config.sparsek)
    ids = torch.tensor([docs[-1][:400]])  # 7 query tiles; the last chooses 2 of 5 competing tiles
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained(ids).logits, rtol=0, atol=0)
        # the scorer matters: an untrained one gives other logits
        attach_selector(trained, LearnedSelector.for_model(trained, BLOCK, layers=[0, 1]))
        assert not torch.equal(reloaded(ids).logits, trained(ids).logits)
    assert torch.equal(load_selector(final).scorer(0).wq, result.selector.scorer(0).wq)
    assert reloaded.generate(ids[:, :255], max_new_tokens=3, do_sample=False).shape == (1, 258)

    # Resume: a second call continues from the checkpoint's step.
    more = distill(DistillConfig(**{**config.__dict__, "steps": 45, "resume": True, "eval_windows": 0,
                                    "save_model": False}))
    assert len(more.metrics["losses"]) == 5

    # A model whose pattern names selector "learned" but has no scorer: a clear error.
    bare = tmp_path / "bare"
    shutil.copytree(final, bare)
    (bare / SCORER_FILE).unlink()
    broken = AutoModelForCausalLM.from_pretrained(bare, attn_implementation="sparsek")
    with pytest.raises(ValueError, match="no learned scorer was found"):
        broken(ids)


def test_distil_own_query_rows_reloads_and_generates(tmp_path):
    """``hf-sparsek distill --query-rows own``: the scorer trains on each tile's own rows, is saved with the option,
    and the reloaded model selects as the trained one and generates with its cache."""
    docs = _distil_inputs(tmp_path, 3, 7)
    result = distill(DistillConfig(model=str(tmp_path / "base"), output_dir=str(tmp_path / "run"),
                                   train_data=str(tmp_path / "docs.json"), heldout_docs=1, seq_len=448,
                                   train_windows=2, eval_windows=1, steps=20, lr=2e-2, cpu=True,
                                   compare_library=False, query_rows="own", pattern={**PATTERN, "window": 128}))
    losses = result.metrics["losses"]
    assert sum(losses[-5:]) < sum(losses[:5])
    final = tmp_path / "run" / "final"
    assert load_selector(final).query_rows == "own"
    reloaded = AutoModelForCausalLM.from_pretrained(final, attn_implementation="sparsek").eval()
    trained = result.model
    trained.set_attn_implementation("sparsek")
    hf_sparsek.set_pattern(trained, reloaded.config.sparsek)
    ids = torch.tensor([docs[-1][:400]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained(ids).logits, rtol=0, atol=0)
    assert reloaded.generate(ids[:, :255], max_new_tokens=3, do_sample=False).shape == (1, 258)


def test_distil_heldout_oracle_bounds_every_selector_and_resume_checks_the_config(tmp_path):
    """The held-out coverage counts every chosen tile (query tiles with fewer competing tiles than the budget pad
    with -1, which once overwrote tile 0's pick): the oracle covers at least what the learned scorer and the
    training-free selectors cover; a target stride beyond the query tiles runs; resuming with another scorer shape
    or query-row option is refused by name."""
    _distil_inputs(tmp_path, 4, 9)
    config = DistillConfig(model=str(tmp_path / "base"), output_dir=str(tmp_path / "run"),
                           train_data=str(tmp_path / "docs.json"), heldout_docs=1, seq_len=448, train_windows=2,
                           eval_windows=1, steps=4, lr=2e-2, cpu=True, save_every=2, save_model=False,
                           query_tile_stride=50, pattern={**PATTERN, "window": 64, "topk_blocks": 3})
    cov = distill(config).metrics["heldout"]["coverage"]
    for name in ("learned", "untrained", "mass", "meanpool"):
        assert cov[name] <= cov["oracle"] + 1e-6, (name, cov)
    with pytest.raises(ValueError, match="--resume"):
        distill(DistillConfig(**{**config.__dict__, "steps": 6, "resume": True, "query_rows": "own",
                                 "eval_windows": 0}))


def test_distil_from_a_given_scorer(tmp_path):
    """``init_scorer`` starts from a trained scorer (re-fitting it after a LoRA fine-tune): its first loss is the
    trained one's, not the untrained one's; a scorer of another mode or shape is refused, naming both."""
    _distil_inputs(tmp_path, 4, 9)
    base = dict(model=str(tmp_path / "base"), train_data=str(tmp_path / "docs.json"), heldout_docs=1, seq_len=448,
                train_windows=2, eval_windows=0, lr=2e-2, log_every=5, save_every=100, cpu=True,
                compare_library=False, save_model=False, pattern={**PATTERN, "window": 128})
    first = distill(DistillConfig(output_dir=str(tmp_path / "a"), steps=40, **{**base, "save_model": True}))
    first = first.metrics["losses"]
    # from the distilled model's final/ with no pattern given: its own (window 128), its scorer as the start
    warm = distill(DistillConfig(output_dir=str(tmp_path / "b"), steps=5, init_scorer=str(tmp_path / "a" / "final"),
                                 **{**base, "model": str(tmp_path / "a" / "final"), "pattern": None})).metrics
    assert warm["pattern"]["default"]["window"] == 128 and warm["pattern"]["default"]["selector"] == "learned"
    warm = warm["losses"]
    assert warm[0] < 0.7 * first[0] and abs(warm[0] - first[-1]) < 0.5 * (first[0] - first[-1])
    with pytest.raises(ValueError, match="was made for"):
        distill(DistillConfig(output_dir=str(tmp_path / "c"), steps=1, mode="key", init_scorer=str(tmp_path / "a"),
                              **base))


def test_save_load_roundtrip_and_bad_file(tmp_path):
    selector = _perturbed(LearnedSelector([0, 3], 2, 8, 128, "key"))
    save_selector(selector, tmp_path)
    loaded = load_selector(tmp_path)
    assert loaded.meta() == selector.meta()
    for a, b in zip(selector.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no learned scorer"):
        load_selector(tmp_path / "missing")
    with pytest.raises(ValueError, match="mode"):
        LearnedSelector([0], 2, 8, 64, "random")
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(model="x", output_dir="y", steps=0)


@pytest.mark.parametrize("length", [256, 200], ids=["T256", "T200"])
def test_block_mass_rows_equals_eval_definition(length):
    from hf_sparsek.eval.selection_recall import block_attention_mass

    from hf_sparsek.learned.distill import block_mass_rows

    gen = torch.Generator().manual_seed(length)
    q, k = torch.randn(1, 6, length, 8, generator=gen) * 2, torch.randn(1, 2, length, 8, generator=gen) * 2
    want = block_attention_mass(q, k, BLOCK, 0.3, dtype=torch.float64).float()
    tiles = torch.tensor([0, 2, 3])
    got = block_mass_rows(q, k, BLOCK, 0.3, tiles, tiles_per_chunk=2)
    torch.testing.assert_close(got, want[:, :, tiles], rtol=1e-5, atol=1e-6)
    # The gain (mass the static part leaves): per query tile, 1 - the static index's token-exact coverage.
    from hf_sparsek.eval.selection_recall import coverage

    from hf_sparsek.ops import build_index_for

    static = hf_sparsek.SparsePattern(block_size=BLOCK, sink_tokens=5, window=70)
    gain = block_mass_rows(q, k, BLOCK, 0.3, tiles, sink_tokens=5, window=70)
    covered = coverage(q, k, build_index_for(q, k, static), 0.3, per_tile=True).float()
    torch.testing.assert_close(gain.sum(-1), 1 - covered[:, :, tiles], rtol=1e-4, atol=1e-5)
    assert (gain[:, :, 1, 2] == 0).all()  # the window keeps all of tile 2 for query tile 2 (its diagonal)
    assert (gain[:, :, 2, 2] > 0).all()  # but not for query tile 3


def test_distill_command_options_make_the_config():
    import argparse

    from hf_sparsek.learned import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--output-dir", "o", "--mode", "key", "--steps", "7",
                              "--query-tile-stride", "2", "--no-save-model", "--resume"])
    config = cli.config_from_args(args)
    assert (config.mode, config.steps, config.query_tile_stride, config.save_model, config.resume) == (
        "key", 7, 2, False, True)
    assert config.seq_len == DistillConfig(model="m", output_dir="o").seq_len


def test_windows_start_with_the_bos_when_given():
    """Models trained with a BOS (Gemma) see it first in every distillation window; seq_len counts it."""
    from hf_sparsek.learned import cli
    from hf_sparsek.learned.distill import _windows

    docs = [list(range(10, 30)), list(range(100, 107))]
    assert _windows(docs, 8) == [list(range(10, 18)), list(range(18, 26))]
    assert _windows(docs, 8, bos=2) == [[2, *range(10, 17)], [2, *range(17, 24)], [2, *range(100, 107)]]
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--output-dir", "o", "--bos-token-id", "2"])
    assert cli.config_from_args(args).bos_token_id == 2
    with pytest.raises(ValueError, match="bos_token_id"):
        DistillConfig(model="m", output_dir="o", bos_token_id=-1)


def test_distill_command_reports_a_resumed_finished_run(monkeypatch, capsys):
    """``distill --resume`` on a run that already reached its steps trains nothing: the summary says so (no loss)
    instead of failing on the empty loss list."""
    import importlib
    import types

    from hf_sparsek.cli import build_parser
    from hf_sparsek.learned import cli as learned_cli

    distill_module = importlib.import_module("hf_sparsek.learned.distill")  # the package exports the function

    done = {"losses": [], "train_seconds": 0.0, "capture_seconds": 0.0}
    monkeypatch.setattr(distill_module, "distill", lambda config: types.SimpleNamespace(metrics=done))
    args = build_parser().parse_args(["distill", "--model", "m", "--train-data", "t.json", "--output-dir", "o",
                                      "--resume"])
    assert learned_cli.run(args) == 0
    assert json.loads(capsys.readouterr().out)["final_loss"] is None
