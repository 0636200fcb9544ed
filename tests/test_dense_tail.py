"""``dense_tail``: a call's last rows attend densely (a prefill's last row predicts the first generated token).

The op runs such a call as two: the first rows under the pattern (its keys ending with them), the last rows dense.
Checked against those two calls made by hand, on the reference and the Triton (interpreter) paths, with padding,
packing, offsets, top-k selection and gradients; decode steps and short calls keep the pattern; the density and the
token mask count the tail; a one-layer model's first generated token is the dense model's."""

from __future__ import annotations

import pytest
import torch
from conftest import triton_interpreter

from hf_sparsek import SparsePattern, exact_token_mask, sparse_attention
from hf_sparsek.block_index import causal_pairs
from hf_sparsek.describe import pattern_density

STATIC = SparsePattern(block_size=64, sink_tokens=8, window=48, dense_tail=40)
TOPK = SparsePattern(block_size=64, sink_tokens=8, window=48, topk_blocks=1, dense_tail=64)
DENSE = SparsePattern(block_size=64)


def _qkv(batch=2, hq=4, hkv=2, q_len=300, kv_len=300, dim=64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, dim, generator=g) for h, n in ((hq, q_len), (hkv, kv_len), (hkv, kv_len)))
    if grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def _by_hand(q, k, v, pattern, q_offset=None, **kw):
    """The first rows under the pattern without its tail (keys up to their last position), the rest dense."""
    q_len, kv_len = q.shape[2], k.shape[2]
    tail = pattern.dense_tail
    head = q_len - tail
    kv_offset = kw.get("kv_offset", 0)
    q_offset = kv_offset + kv_len - q_len if q_offset is None else q_offset
    keys = q_offset + head - kv_offset
    mask = kw.pop("attention_mask", None)
    first = sparse_attention(q[:, :, :head], k[:, :, :keys], v[:, :, :keys], pattern.replace(dense_tail=0),
                             q_offset=q_offset, attention_mask=None if mask is None else mask[:, :keys], **kw)
    last = sparse_attention(q[:, :, head:], k, v, DENSE, q_offset=q_offset + head, attention_mask=mask, **kw)
    return torch.cat([first, last], 2)


@pytest.mark.parametrize("pattern", [STATIC, TOPK], ids=["static", "topk"])
def test_tail_rows_dense_first_rows_the_pattern(pattern):
    q, k, v = _qkv()
    got = sparse_attention(q, k, v, pattern)
    torch.testing.assert_close(got, _by_hand(q, k, v, pattern))
    dense = sparse_attention(q, k, v, None)
    torch.testing.assert_close(got[:, :, -pattern.dense_tail:], dense[:, :, -pattern.dense_tail:])
    assert (got[:, :, : -pattern.dense_tail] - dense[:, :, : -pattern.dense_tail]).abs().max() > 1e-3
    # query tiles wholly before the split see what the pattern without its tail gives them
    plain = sparse_attention(q, k, v, pattern.replace(dense_tail=0))
    whole = (q.shape[2] - pattern.dense_tail) // 64 * 64
    torch.testing.assert_close(got[:, :, :whole], plain[:, :, :whole])


def test_padding_offsets_and_the_triton_path():
    """Left padding, a chunk at an offset into a cache that starts at kv_offset; reference and interpreter agree."""
    q, k, v = _qkv(q_len=150, kv_len=330, seed=1)
    mask = torch.ones(2, 330, dtype=torch.bool)
    mask[1, :37] = False
    kw = dict(q_offset=190, kv_offset=19, attention_mask=mask)  # keys run 9 past the last query
    want = _by_hand(q, k, v, STATIC, q_offset=190, kv_offset=19, attention_mask=mask)
    got = sparse_attention(q, k, v, STATIC, backend="reference", **kw)
    torch.testing.assert_close(got, want)
    with triton_interpreter("attention_fwd", "block_index", "decode"):
        tri = sparse_attention(q, k, v, STATIC, backend="triton", **kw)
    torch.testing.assert_close(tri, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("sms,want_runs", [(1, [16, 16, 8]), (32, [40]), (31, [16, 16, 8])])
def test_a_long_tail_runs_through_the_split_kv_kernel(sms, want_runs, monkeypatch):
    """Without gradients the tail goes through the split-KV kernel (the prefill kernel would give its few rows a
    program or two per KV head to walk every key): in one launch where the prefill kernel's programs (batch 2 x 2 KV
    heads x 2 query tiles) times 4 fit in the SMs, else 16 rows at a time; with gradients it stays one call. Same
    rows."""
    from hf_sparsek.kernels import dispatch

    from hf_sparsek import triton_ops

    monkeypatch.setattr(dispatch, "sm_count", lambda device: sms)
    runs = []
    real = triton_ops.triton_decode_without_index
    monkeypatch.setattr(triton_ops, "triton_decode_without_index",
                        lambda q, *a, **kw: runs.append(q.shape[2]) or real(q, *a, **kw))
    q, k, v = _qkv(q_len=120, kv_len=257, seed=8, dim=128)
    mask = torch.ones(2, 257, dtype=torch.bool)
    mask[0, :21] = False
    want = _by_hand(q, k, v, STATIC, attention_mask=mask)
    with triton_interpreter("attention_fwd", "block_index", "decode"):
        got = sparse_attention(q, k, v, STATIC, attention_mask=mask, backend="triton")
        assert runs == want_runs
        runs.clear()
        q.requires_grad_()
        sparse_attention(q, k, v, STATIC, attention_mask=mask, backend="triton")
        assert runs == []
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_packed_sequences_keep_their_segments():
    q, k, v = _qkv(batch=1, q_len=260, kv_len=260, seed=2)
    seg = torch.tensor([[0] * 100 + [1] * 160])
    got = sparse_attention(q, k, v, STATIC, segment_ids=seg)
    plain = sparse_attention(q, k, v, STATIC.replace(dense_tail=0), segment_ids=seg)
    dense = sparse_attention(q, k, v, DENSE, segment_ids=seg)
    torch.testing.assert_close(got[:, :, -40:], dense[:, :, -40:])
    torch.testing.assert_close(got[:, :, :192], plain[:, :, :192])


def test_gradients_flow_through_both_parts():
    q, k, v = _qkv(q_len=200, kv_len=200, seed=3, grad=True)
    grad = torch.randn(2, 4, 200, 64, generator=torch.Generator().manual_seed(4))
    sparse_attention(q, k, v, STATIC).backward(grad)
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    _by_hand(q, k, v, STATIC).backward(grad)
    for a, b in zip(got, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(a, b)


def test_decode_steps_and_short_calls_keep_the_pattern():
    plain = STATIC.replace(dense_tail=0)
    q, k, v = _qkv(q_len=1, kv_len=400, seed=5)
    torch.testing.assert_close(sparse_attention(q, k, v, STATIC), sparse_attention(q, k, v, plain))
    q, k, v = _qkv(q_len=40, kv_len=400, seed=6)  # exactly the tail's length: no split
    torch.testing.assert_close(sparse_attention(q, k, v, STATIC), sparse_attention(q, k, v, plain))


def test_density_and_token_mask_count_the_tail():
    for seq in (40, 41, 300):
        mask = exact_token_mask(STATIC, seq)
        want = float(mask.sum()) / causal_pairs(seq, seq, 0, 0)
        assert abs(pattern_density(STATIC, seq) - want) < 1e-12, seq
    mask = exact_token_mask(STATIC, 300)
    assert bool(mask[0, 0, -40:].equal(exact_token_mask(DENSE, 300)[0, 0, -40:]))
    assert not bool(mask[0, 0, -41].equal(exact_token_mask(DENSE, 300)[0, 0, -41]))


def test_field_checks_and_what_it_refuses():
    assert SparsePattern.from_dict(STATIC.to_dict()) == STATIC
    assert "dense_tail" not in STATIC.replace(dense_tail=0).to_dict()  # files without it stay as they were
    assert "last" not in STATIC.replace(dense_tail=0).describe()
    assert STATIC.describe().endswith(f"last {STATIC.dense_tail} rows of a call dense")  # labels tell the tail apart
    with pytest.raises(ValueError, match="dense_tail"):
        SparsePattern(block_size=64, window=64, dense_tail=-1)
    q, k, v = _qkv(q_len=100, kv_len=100)
    tiles = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="dense_tail splits the call"):
        sparse_attention(q, k, v, TOPK, selected_tiles=tiles)
    with pytest.raises(ValueError, match="dense_tail.*'learned'"):  # its scorer's tiles cover the whole call
        TOPK.replace(selector="learned")
    assert TOPK.replace(selector="learned", dense_tail=0).selector == "learned"


def test_one_layer_model_first_token_is_the_dense_models():
    """One layer: the prompt's last row is the only input to the first generated token's logits, and it is dense."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_sparsek

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 64, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits[0, -1]
        model.set_attn_implementation("sparsek")
        hf_sparsek.set_pattern(model, SparsePattern(block_size=64, sink_tokens=4, window=64, dense_tail=64))
        tail = model(ids).logits[0, -1]
        hf_sparsek.set_pattern(model, SparsePattern(block_size=64, sink_tokens=4, window=64))
        plain = model(ids).logits[0, -1]
    torch.testing.assert_close(tail, dense, atol=1e-4, rtol=1e-4)
    assert (plain - dense).abs().max() > 1e-3


COMPOSITE = SparsePattern(block_size=64, sink_tokens=64, window=64, topk_blocks=2, selector="probe", probe_stride=8,
                          per_query_head=True, dense_tail=24, min_sparse_len=128)  # Gemma 3's default, scaled down


@pytest.mark.parametrize("q_len,kv_len", [(700, 700), (40, 700), (4, 703), (1, 704), (100, 120)],
                         ids=["prefill", "chunk", "four-rows", "decode", "below-min-sparse-len"])
def test_the_shipped_composite_on_the_interpreter_equals_the_reference(q_len, kv_len):
    """The Gemma 3 default's ingredients together (probe per query head, dense tail, rows dense below
    ``min_sparse_len``) with left padding and GQA: the Triton path (interpreter) gives the reference's rows, in a
    prefill, a chunk, short runs and a call wholly below ``min_sparse_len``."""
    q, k, v = _qkv(q_len=q_len, kv_len=kv_len, seed=q_len, dim=64)
    mask = torch.ones(2, kv_len, dtype=torch.bool)
    mask[1, :11] = False
    want = sparse_attention(q, k, v, COMPOSITE, attention_mask=mask, backend="reference")
    dense = sparse_attention(q, k, v, DENSE, attention_mask=mask, backend="reference")
    assert (want - dense).abs().amax() > 1e-3 if kv_len > 128 else torch.equal(want, dense)  # the pattern bites
    with triton_interpreter("attention_fwd", "block_index", "decode", "probe", "selection"):
        got = sparse_attention(q, k, v, COMPOSITE, attention_mask=mask, backend="triton")
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
