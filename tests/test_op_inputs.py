"""What ``sparse_attention`` / ``build_index_for`` do with the inputs a user can pass: dynamic top-k at any batch,
offsets, prebuilt indexes, mask dtypes, empty batches and rows with nothing to attend -- on the reference and on
the Triton kernels in the CPU interpreter (set up as in tests/test_kernels_interpret.py).

Top-k is checked against its token-exact definition: a slow per-tile re-implementation of the selector gives the
chosen key blocks, and the expected mask is ``token rules | (causal & valid & key block chosen for the query's
block)``; attention must equal dense masked softmax on that mask.
"""

from __future__ import annotations

import pytest
import torch
from conftest import dense_masked_attention

from hf_sparsek import (
    PRESETS,
    BlockLayout,
    SparsePattern,
    build_block_index,
    build_index_for,
    exact_token_mask,
    sparse_attention,
)
from hf_sparsek.selection import select_meanpool

TOPK_PATTERNS = {
    "top1": SparsePattern(block_size=64, topk_blocks=1, selector="meanpool"),
    "sink2-win30-top2": SparsePattern(block_size=64, sink_tokens=2, window=30, topk_blocks=2, selector="meanpool"),
}
# batch, q heads, kv heads, q_len, kv_len, q_offset (None: the last q_len positions), kv_offset, left padding
TOPK_CASES = [
    (1, 2, 2, 130, 130, None, 0, False),
    (2, 1, 1, 64, 64, None, 0, False),  # the reported crash: batch 2 without padding
    (3, 4, 2, 130, 130, None, 0, False),
    (2, 4, 2, 130, 130, None, 0, True),
    (3, 4, 1, 63, 63, None, 0, True),
    (2, 4, 2, 40, 200, None, 0, False),  # chunked prefill
    (3, 4, 2, 1, 201, None, 0, True),  # decode
    (2, 2, 1, 10, 50, 190, 150, False),  # sliding cache: keys start mid-block
]


def _case_id(case) -> str:
    b, hq, hk, lq, lk, qo, ko, padded = case
    offsets = "" if qo is None else f"-qoff{qo}-kvoff{ko}"
    return f"B{b}-Tq{lq}-Tk{lk}-Hq{hq}-Hk{hk}{offsets}{'-padded' if padded else ''}"


def _padding(batch: int, kv_len: int) -> torch.Tensor:
    """Left padding: row 0 unpadded, row 1 loses 20 keys, row 2 loses 70 (more than a block)."""
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    for b, n in zip(range(1, batch), (20, 70), strict=False):
        mask[b, : min(n, kv_len - 1)] = False
    return mask


def _slow_topk(q, k, pattern, q_offset, kv_offset, valid):
    """The selector's definition, one (batch, KV head, query block) at a time: {(b, h, abs q block): abs k blocks}.

    Score of (query block, key block) = mean query of the block over its rows in this call and over the KV head's
    query heads, dotted with the mean of the key block's real keys; causal key blocks with a real key compete.
    """
    block, top = pattern.block_size, pattern.topk_blocks
    batch, hq, q_len, _ = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    q_blk = (q_offset + torch.arange(q_len)) // block
    k_blk = (kv_offset + torch.arange(kv_len)) // block
    chosen = {}
    for b in range(batch):
        for h in range(hkv):
            for qb in sorted(set(q_blk.tolist())):
                q_mean = q[b, h * group : (h + 1) * group, q_blk == qb].double().mean((0, 1))
                scores = {}
                for kb in sorted(set(k_blk.tolist())):
                    cols = (k_blk == kb) & valid[b]
                    if kb <= qb and bool(cols.any()):
                        scores[kb] = float(q_mean @ k[b, h, cols].double().mean(0))
                chosen[b, h, qb] = set(sorted(scores, key=scores.get, reverse=True)[:top])
    return chosen


def _topk_mask(pattern, chosen, batch, hkv, q_len, kv_len, q_offset, kv_offset, attention_mask):
    """Token-exact top-k mask (batch, hkv, q_len, kv_len): token rules, or a causal real key in a chosen block."""
    block = pattern.block_size
    shape = (batch, hkv, q_len, kv_len)
    kw = dict(q_offset=q_offset, kv_offset=kv_offset, kv_heads=hkv, attention_mask=attention_mask)
    causal = exact_token_mask(SparsePattern(block_size=block), q_len, kv_len, **kw).expand(shape)
    static = pattern.replace(topk_blocks=None)
    token = torch.zeros(shape, dtype=torch.bool)
    if not static.is_dense:
        token = exact_token_mask(static, q_len, kv_len, **kw).expand(shape)
    q_blk = (q_offset + torch.arange(q_len)) // block
    k_blk = (kv_offset + torch.arange(kv_len)) // block
    picked = torch.zeros(shape, dtype=torch.bool)
    for (b, h, qb), kbs in chosen.items():
        for kb in kbs:
            picked[b, h] |= (q_blk == qb).view(-1, 1) & (k_blk == kb).view(1, -1)
    return token | (causal & picked)


def _topk_setup(case, pattern, dtype=torch.float64, dim=16):
    """Random inputs of one case, its padding mask, offsets and the expected token-exact mask."""
    b, hq, hk, lq, lk, q_offset, kv_offset, padded = case
    q = torch.randn(b, hq, lq, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, lk, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hk, lk, dim, dtype=dtype, requires_grad=True)
    mask = _padding(b, lk) if padded else None
    abs_q = kv_offset + lk - lq if q_offset is None else q_offset
    valid = torch.ones(b, lk, dtype=torch.bool) if mask is None else mask
    chosen = _slow_topk(q.detach(), k.detach(), pattern, abs_q, kv_offset, valid)
    expected = _topk_mask(pattern, chosen, b, hk, lq, lk, abs_q, kv_offset, mask)
    offsets = dict(q_offset=q_offset, kv_offset=kv_offset, attention_mask=mask)
    return (q, k, v), offsets, chosen, expected


def _check_attention(out, q, k, v, expected, scale, atol):
    """Forward and gradients equal dense fp64 masked softmax on ``expected``; rows without keys are zeros."""
    ref = dense_masked_attention(q, k, v, expected, scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=atol, atol=atol)
    empty = ~expected.any(-1).repeat_interleave(q.shape[1] // k.shape[1], 1)  # (B, Hq, Lq)
    assert torch.equal(out.detach()[empty], torch.zeros_like(out.detach()[empty]))
    grad = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == out.dtype and torch.isfinite(g).all()
        assert float((g.double() - w.double()).norm() / w.double().norm().clamp_min(1.0)) < 2 * atol


@pytest.mark.parametrize("case", TOPK_CASES, ids=[_case_id(c) for c in TOPK_CASES])
@pytest.mark.parametrize("name", list(TOPK_PATTERNS))
def test_topk_matches_token_exact_definition(name, case):
    """Selected tiles, the index's token mask and the reference output all follow the definition, at any batch."""
    pattern = TOPK_PATTERNS[name]
    (q, k, v), offsets, chosen, expected = _topk_setup(case, pattern)
    kv_offset = offsets["kv_offset"]
    q_offset = kv_offset + k.shape[2] - q.shape[2] if offsets["q_offset"] is None else offsets["q_offset"]
    index = build_index_for(q, k, pattern, **offsets)
    k_seg = None if offsets["attention_mask"] is None else torch.where(offsets["attention_mask"], 0, -1)
    tiles = select_meanpool(q, k, pattern, q_offset, kv_offset, k_seg)
    qb0, kb0 = q_offset // pattern.block_size, kv_offset // pattern.block_size
    got = {(b, h, qb0 + m): {kb0 + n for n in tiles[b, h, m].tolist() if n >= 0}
           for b in range(tiles.shape[0]) for h in range(tiles.shape[1]) for m in range(tiles.shape[2])}
    assert got == chosen
    assert torch.equal(index.token_mask().expand_as(expected), expected)
    out = sparse_attention(q, k, v, pattern, backend="reference", **offsets)
    _check_attention(out, q, k, v, expected, q.shape[-1] ** -0.5, atol=1e-9)


def test_topk_padding_only_rows_are_zero_with_finite_gradients():
    """Left-padded query rows see no key: zeros (not NaN) and finite gradients, with top-k selecting tiles."""
    pattern = TOPK_PATTERNS["sink2-win30-top2"]
    q, k, v = (torch.randn(2, 4, 150, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k, v = k[:, :2].detach().requires_grad_(), v[:, :2].detach().requires_grad_()
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[1, :90] = False
    out = sparse_attention(q, k, v, pattern, attention_mask=mask, backend="reference")
    assert torch.equal(out[1, :, :90], torch.zeros_like(out[1, :, :90]))
    assert not out.isnan().any() and bool(out[1, :, 90:].abs().sum(-1).gt(0).all())
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1, :, :90], torch.zeros_like(q.grad[1, :, :90]))


# ---- offsets and prebuilt indexes ---------------------------------------------------------------------------------


@pytest.fixture
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 so that backend='triton' accepts CPU tensors (the input checks run before any launch)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kwargs,message", [
    ({"q_offset": -1}, "q_offset=-1"),
    ({"kv_offset": -3}, "kv_offset=-3"),
    ({"q_offset": -5, "kv_offset": 0}, "q_offset=-5"),
    ({"q_offset": 2.5}, "q_offset=2.5"),
    ({"kv_offset": 1.0}, "kv_offset=1.0"),
], ids=["q-neg", "kv-neg", "q-neg-kv0", "q-float", "kv-float"])
def test_bad_offsets_raise(kwargs, message, backend, interpreter):
    q, k, v = (torch.randn(1, 2, 64, 64) for _ in range(3))
    with pytest.raises(ValueError, match=message):
        sparse_attention(q[:, :, :10], k, v, SparsePattern(block_size=64, window=8), backend=backend, **kwargs)
    with pytest.raises(ValueError, match=message):
        build_index_for(q[:, :, :10], k, SparsePattern(block_size=64, window=8), **kwargs)


def test_build_block_index_rejects_negative_offsets():
    with pytest.raises(ValueError, match="q_offset=-2"):
        build_block_index(SparsePattern(block_size=64), batch=1, kv_heads=1, q_len=4, kv_len=8, q_offset=-2)
    with pytest.raises(ValueError, match="kv_offset=-1"):
        build_block_index(SparsePattern(block_size=64), batch=1, kv_heads=1, q_len=4, kv_len=8, kv_offset=-1)


def test_build_block_index_rejects_topk_tiles_of_another_shape():
    pattern = SparsePattern(block_size=64, topk_blocks=1)
    tiles = torch.randint(0, 3, (2, 1, 3, 1), dtype=torch.int32)  # batch 2, 3 query tiles
    with pytest.raises(ValueError, match="topk_tiles"):
        build_block_index(pattern, batch=3, kv_heads=1, q_len=130, kv_len=130, topk_tiles=tiles)
    with pytest.raises(ValueError, match="topk_tiles"):
        build_block_index(pattern, batch=2, kv_heads=1, q_len=64, kv_len=64, topk_tiles=tiles)


def _index_mismatches():
    """(what the index was built for, what the call passes, expected message) for prebuilt-index checks."""
    win = SparsePattern(block_size=64, window=8)
    pad = torch.ones(2, 70, dtype=torch.bool)
    pad[1, :5] = False
    return {
        "q_len": (dict(lq=70), dict(lq=69), "q_len"),
        "kv_len": (dict(lq=10, lk=70), dict(lq=10, lk=80), "kv_len"),
        "q_offset": (dict(lq=10, q_offset=60), dict(lq=10, q_offset=50), "q_offset"),
        "kv_offset": (dict(lq=10, q_offset=90, kv_offset=40), dict(lq=10, q_offset=90, kv_offset=30), "kv_offset"),
        "block_size": (dict(pattern=win), dict(pattern=win.replace(block_size=128)), "block_size"),
        "window": (dict(pattern=win), dict(pattern=win.replace(window=9)), "window"),
        "batch": (dict(mask=pad), dict(batch=3, mask=torch.ones(3, 70, dtype=torch.bool)), "batch"),
        "kv_heads": (dict(pattern=SparsePattern(block_size=64, dense_heads=(1,)), hk=2),
                     dict(pattern=SparsePattern(block_size=64, dense_heads=(1,)), hk=1), "heads"),
        "mask-missing": (dict(), dict(mask=pad), "attention_mask"),
        "mask-extra": (dict(mask=pad), dict(), "attention_mask"),
    }


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", list(_index_mismatches()))
def test_prebuilt_index_that_disagrees_raises(name, backend, interpreter):
    """An index built for other shapes, offsets, pattern or padding is rejected, not read out of bounds."""
    built, called, message = _index_mismatches()[name]

    def inputs(batch=2, lq=70, lk=70, hk=2, **_):
        return torch.randn(batch, 2, lq, 64), torch.randn(batch, hk, lk, 64), torch.randn(batch, hk, lk, 64)

    default = SparsePattern(block_size=64, window=8)
    q, k, _ = inputs(**built)
    offsets = {key: built[key] for key in ("q_offset", "kv_offset") if key in built}
    index = build_index_for(q, k, built.get("pattern", default), attention_mask=built.get("mask"), **offsets)
    q, k, v = inputs(**called)
    offsets = {key: called[key] for key in ("q_offset", "kv_offset") if key in called}
    with pytest.raises(ValueError, match=message):
        sparse_attention(q, k, v, called.get("pattern", default), attention_mask=called.get("mask"), index=index,
                         backend=backend, **offsets)


def test_prebuilt_index_that_agrees_gives_the_same_result():
    """The checks accept the index sparse_attention would build itself: same output bit for bit."""
    pattern = SparsePattern(block_size=64, sink_tokens=4, window=30)
    q, k, v = torch.randn(2, 4, 40, 32), torch.randn(2, 2, 130, 32), torch.randn(2, 2, 130, 32)
    mask = torch.ones(2, 130, dtype=torch.bool)
    mask[0, :33] = False
    index = build_index_for(q, k, pattern, attention_mask=mask)
    with_index = sparse_attention(q, k, v, pattern, attention_mask=mask, index=index)
    assert torch.equal(with_index, sparse_attention(q, k, v, pattern, attention_mask=mask))
    assert torch.equal(sparse_attention(q, k, v, index=index, attention_mask=mask), with_index)  # pattern optional


# ---- mask dtypes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_floating_attention_mask_raises_with_the_conversion(dtype):
    """An additive 0 / -inf mask must not be read as booleans (that inverts the padding)."""
    q, k, v = (torch.randn(2, 2, 70, 16) for _ in range(3))
    additive = torch.zeros(2, 70, dtype=dtype)
    additive[1, :10] = float("-inf")
    for call in (lambda: sparse_attention(q, k, v, attention_mask=additive),
                 lambda: build_index_for(q, k, SparsePattern(), attention_mask=additive)):
        with pytest.raises(ValueError, match=r"attention_mask == 0"):
            call()


def test_floating_segment_ids_raise():
    q, k, v = (torch.randn(1, 2, 70, 16) for _ in range(3))
    with pytest.raises(ValueError, match="segment_ids"):
        sparse_attention(q, k, v, segment_ids=torch.zeros(1, 70))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_attention_mask_equals_boolean(dtype):
    """HF hands over int64 0/1 masks: 1 = real token, exactly like True."""
    pattern = SparsePattern(block_size=64, sink_tokens=2, window=20)
    q, k, v = (torch.randn(2, 2, 90, 16) for _ in range(3))
    mask = torch.ones(2, 90, dtype=torch.bool)
    mask[0, :25] = False
    got = sparse_attention(q, k, v, pattern, attention_mask=mask.to(dtype))
    assert torch.equal(got, sparse_attention(q, k, v, pattern, attention_mask=mask))
    assert torch.equal(got[0, :, :25], torch.zeros_like(got[0, :, :25]))


# ---- empty inputs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", ["sink2-win30", "top1"])
def test_batch_zero_reference_returns_empty_and_differentiates(name, padded):
    pattern = {"sink2-win30": SparsePattern(block_size=64, sink_tokens=2, window=30), "top1": TOPK_PATTERNS["top1"]}
    q = torch.randn(0, 4, 70, 16, requires_grad=True)
    k, v = (torch.randn(0, 2, 70, 16, requires_grad=True) for _ in range(2))
    mask = torch.ones(0, 70, dtype=torch.bool) if padded else None
    out = sparse_attention(q, k, v, pattern[name], attention_mask=mask, backend="reference")
    assert out.shape == (0, 4, 70, 16) and out.dtype == q.dtype
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("q_len,kv_len", [(0, 70), (0, 0), (5, 0)])
def test_empty_sequences_raise(q_len, kv_len, backend, interpreter):
    q, k, v = torch.randn(1, 2, q_len, 64), torch.randn(1, 2, kv_len, 64), torch.randn(1, 2, kv_len, 64)
    with pytest.raises(ValueError, match="at least one"):
        sparse_attention(q, k, v, SparsePattern(block_size=64, window=8), backend=backend)


# ---- the Triton kernels in the interpreter ------------------------------------------------------------------------


@pytest.fixture
def kernels(monkeypatch):
    """The Triton kernels re-decorated in interpreter mode, as tests/test_kernels_interpret.py sets them up."""
    pytest.importorskip("triton")
    module = pytest.importorskip("test_kernels_interpret")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return module


INTERPRET_TOPK_CASES = [
    (2, 4, 2, 130, 130, None, 0, False),
    (3, 4, 2, 130, 130, None, 0, True),
    (2, 4, 1, 40, 200, None, 0, True),  # chunked prefill with padding
    (2, 2, 1, 10, 50, 190, 150, False),  # sliding cache offsets
]


@pytest.mark.parametrize("case", INTERPRET_TOPK_CASES, ids=[_case_id(c) for c in INTERPRET_TOPK_CASES])
def test_topk_triton_matches_token_exact_definition(case, kernels):
    pattern = TOPK_PATTERNS["sink2-win30-top2"]
    (q, k, v), offsets, _, expected = _topk_setup(case, pattern, dtype=torch.float32, dim=64)
    out = sparse_attention(q, k, v, pattern, backend="triton", **offsets)
    _check_attention(out, q, k, v, expected, 64**-0.5, atol=2e-5)


def test_topk_triton_reported_case(kernels):
    """The user's call: batch 2, one head, 64 tokens, top-1, no padding."""
    pattern = TOPK_PATTERNS["top1"]
    (q, k, v), offsets, _, expected = _topk_setup(TOPK_CASES[1], pattern, dtype=torch.float32, dim=64)
    out = sparse_attention(q, k, v, pattern, backend="triton", **offsets)
    _check_attention(out, q, k, v, expected, 64**-0.5, atol=2e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_batch_zero_triton_returns_empty_and_differentiates(padded, kernels):
    q = torch.randn(0, 4, 70, 64, requires_grad=True)
    k, v = (torch.randn(0, 2, 70, 64, requires_grad=True) for _ in range(2))
    mask = torch.ones(0, 70, dtype=torch.bool) if padded else None
    out = sparse_attention(q, k, v, TOPK_PATTERNS["sink2-win30-top2"], attention_mask=mask, backend="triton")
    assert out.shape == (0, 4, 70, 64)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("pattern", [
    *PRESETS.values(),
    SparsePattern(block_size=64, sink_tokens=3, window=48, dense_heads=(0, 2), min_sparse_len=128, topk_blocks=5),
    SparsePattern(layout=BlockLayout("random", density=0.1234567891, seed=7)),
    SparsePattern(layout=BlockLayout("strided", stride=8, offset=3)),
], ids=lambda p: p.describe())
def test_compiled_op_pattern_text_round_trips(pattern):
    """The compiled path hands the pattern to its custom op as text: every field must come back exactly."""
    from hf_sparsek.ops import _pattern_of_text, _pattern_text

    assert _pattern_of_text(_pattern_text(pattern)) == pattern


@pytest.mark.parametrize("q_len,kv_len,q_offset,kv_offset", [(256, 256, None, 0), (7, 250, None, 0),
                                                              (30, 90, 150, 100), (1, 256, None, 0),
                                                              (30, 90, "tensor 150", 100)])
def test_a_call_below_min_sparse_len_is_dense_attention_without_the_patterns_work(monkeypatch, q_len, kv_len,
                                                                                 q_offset, kv_offset):
    """Every query below ``min_sparse_len``: the call is plain causal attention (with the padding), and neither the
    selector, the per-query-head K / V repeat nor the dense tail's split runs. One row past it, they do."""
    from hf_sparsek import ops

    calls = []
    real = ops.per_query_head_kv
    monkeypatch.setattr(ops, "per_query_head_kv", lambda *a, **kw: calls.append("repeat") or real(*a, **kw))
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=64, topk_blocks=1, selector="probe",
                            probe_stride=8, per_query_head=True, dense_tail=16, min_sparse_len=256)
    q = torch.randn(2, 4, q_len, 16)
    k, v = torch.randn(2, 2, kv_len, 16), torch.randn(2, 2, kv_len, 16)
    mask = torch.ones(2, kv_len, dtype=torch.bool)
    mask[1, :5] = False
    given = q_offset  # an eager call's tensor offset (a static cache's position) is read, as the call reads it
    if isinstance(q_offset, str):
        q_offset = int(q_offset.split()[1])
        given = torch.tensor([q_offset])
    got = sparse_attention(q, k, v, pattern, q_offset=given, kv_offset=kv_offset, attention_mask=mask,
                           backend="reference")
    start = kv_offset + kv_len - q_len if q_offset is None else q_offset
    q_abs = start + torch.arange(q_len).view(-1, 1)
    k_abs = kv_offset + torch.arange(kv_len).view(1, -1)
    dense = (k_abs <= q_abs) & mask.view(2, 1, 1, kv_len)
    want = dense_masked_attention(q, k, v, dense, q.shape[-1] ** -0.5)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    assert calls == []
    sparse_attention(q, k, v, pattern.replace(min_sparse_len=(start + q_len - 64) // 64 * 64),
                     q_offset=given, kv_offset=kv_offset, attention_mask=mask, backend="reference")
    assert calls == ["repeat"]
