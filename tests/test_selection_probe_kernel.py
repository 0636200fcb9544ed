"""The fused probe kernel (hf_sparsek.kernels.probe) against the PyTorch definition of selector "probe"
(hf_sparsek.selection.probe), in Triton's interpreter: awkward shapes, every sampling stride the kernel takes, peaked
and flat attention, and a planted key."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import triton_interpreter
from test_selection import CASES, PATTERNS, _case_id, _check_same_selection, _inputs
from test_selection_oracle import _slow_oracle_selection

from hf_sparsek import SparsePattern
from hf_sparsek.selection import select_probe
from hf_sparsek.selection.tiles import key_tile_info


@pytest.fixture(autouse=True)
def interpret():
    with triton_interpreter("selection", "probe"):
        yield


def _same_as_definition(got, q, k, pattern, q_offset, kv_offset, k_seg, stride):
    want = select_probe(q, k, pattern, q_offset, kv_offset, k_seg, stride=stride, backend="torch")
    assert got.shape == want.shape and got.dtype == want.dtype
    if not torch.equal(got, want):  # ties may order or pick differently: compare the masses chosen
        rows = lambda t, q_len: (q_offset + t) % stride == stride - 1 or t == q_len - 1  # noqa: E731
        _check_same_selection(got, _slow_oracle_selection(q, k, pattern, q_offset, kv_offset, k_seg, rows),
                              tol=1e-5)
    return got


def _same(q, k, pattern, q_offset, kv_offset, k_seg, stride=16):
    got = select_probe(q, k, pattern, q_offset, kv_offset, k_seg, stride=stride, backend="triton")
    return _same_as_definition(got, q, k, pattern, q_offset, kv_offset, k_seg, stride)


def _kernel(q, k, pattern, q_offset, kv_offset, k_seg, stride, **kw):
    """``select_by_probe`` called directly (splits / rows per program forced), as ``select_probe`` calls it.
    Imported here, under the interpreter: a module-level import would compile the kernels for every importer."""
    from hf_sparsek.kernels.probe import select_by_probe

    count = sink_only = None
    if k_seg is not None:
        count, sink_only = key_tile_info(k.shape[2], kv_offset, k_seg, pattern, q.shape[0], q.device)
    return select_by_probe(q, k, k_seg, count, sink_only, block=pattern.block_size, q_offset=q_offset,
                           kv_offset=kv_offset, sink=pattern.sink_tokens, topk=pattern.topk_blocks,
                           window=pattern.window, threshold=pattern.mass_threshold,
                           scale=1.0 / math.sqrt(q.shape[-1]), stride=stride, **kw)


KERNEL_CASES = CASES + [
    (2, 8, 2, 129, 129, 64, None, 0, True),  # group of 4, padding, one row past a tile
    (3, 6, 3, 77, 300, 128, 223, 0, True),  # chunked prefill at an odd offset, three padded rows
    (1, 16, 1, 4, 400, 64, None, 0, False),  # MQA, q_len 4 (speculative decode)
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[_case_id(c) for c in KERNEL_CASES])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_probe_kernel_matches_definition(name, case):
    q, k, q_offset, kv_offset, k_seg = _inputs(case, seed=11)
    _same(q, k, PATTERNS[name], q_offset, kv_offset, k_seg)


@pytest.mark.parametrize("stride", [1, 2, 8, 64])
def test_probe_kernel_other_strides(stride):
    q, k, q_offset, kv_offset, k_seg = _inputs((2, 4, 2, 150, 230, 64, None, 0, True), seed=12)
    _same(q, k, PATTERNS["sink64-win64-top3"], q_offset, kv_offset, k_seg, stride=stride)


@pytest.mark.parametrize("topk", [5, 20])
def test_probe_kernel_many_key_tiles(topk):
    """46 key tiles, one per step: the running top-k stages 16 (top-5) or 32 (top-20) steps' tiles per merge, so
    several merges and a partial last one; padding, a sink and a window."""
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=100, topk_blocks=topk, selector="probe")
    q, k, q_offset, kv_offset, k_seg = _inputs((2, 4, 2, 130, 2900, 64, None, 0, True), seed=15)
    tiles = _same(q, k, pattern, q_offset, kv_offset, k_seg)
    assert (tiles >= 0).sum(-1).max() == topk


def test_probe_kernel_block128_head_dim_256_peaked():
    """Scaled inputs: peaked softmax rows, so the masses differ widely and a wrong row or tile shows."""
    pattern = SparsePattern(block_size=128, window=128, topk_blocks=2, selector="probe")
    q, k, q_offset, kv_offset, k_seg = _inputs((1, 4, 2, 400, 520, 256, None, 0, False), seed=13)
    tiles = _same(4 * q, k, pattern, q_offset, kv_offset, k_seg)
    assert (tiles[..., 0] >= 0).any()


def test_probe_kernel_finds_a_planted_key():
    """One key at position 200 aligned with the queries at rows 15 mod 16 of the last tile: its tile wins."""
    gen = torch.Generator().manual_seed(14)
    q = 0.1 * torch.randn(1, 4, 640, 64, generator=gen)
    k = 0.1 * torch.randn(1, 2, 640, 64, generator=gen)
    u = torch.randn(64, generator=gen)
    q[:, :, 576:] += 6.0 * u / u.norm()
    k[:, :, 200] += 6.0 * u / u.norm()
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=64, topk_blocks=1, selector="probe")
    tiles = select_probe(q, k, pattern, 0, 0, None, backend="triton")
    assert tiles[0, :, -1, 0].tolist() == [3, 3]


def test_probe_kernel_refuses_a_stride_it_cannot_sample():
    q, k, q_offset, kv_offset, k_seg = _inputs(CASES[0], seed=15)
    pattern = PATTERNS["sink64-win64-top3"]
    with pytest.raises(ValueError, match="power of two dividing block=64"):
        select_probe(q, k, pattern, q_offset, kv_offset, k_seg, stride=12, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        select_probe(q, k, pattern, q_offset, kv_offset, k_seg, backend="cuda")
    # auto on a CPU tensor: the PyTorch definition, any stride
    assert select_probe(q, k, pattern, q_offset, kv_offset, k_seg, stride=12).shape[-1] == 3


SPLIT_CASES = [
    ((2, 8, 2, 129, 900, 64, 771, 0, True), "sink64-win64-top3", 4, 3),  # chunked prefill, padding, group 4
    ((1, 4, 1, 1, 1500, 128, None, 0, False), "win100-top2-mass0.6", 16, 5),  # decode, MQA, the threshold mode
    ((2, 6, 2, 4, 700, 64, 696, 0, True), "sink5-top4-block128", 16, 2),  # q_len 4, group 3, padding
    ((1, 2, 2, 300, 1100, 256, None, 37, False), "sink64-win64-top3", 8, 7),  # offset keys, D 256, uneven slices
]


@pytest.mark.parametrize("case,name,stride,splits", SPLIT_CASES,
                         ids=[f"{_case_id(c)}-{n}-s{st}-x{sp}" for c, n, st, sp in SPLIT_CASES])
def test_probe_kernel_split_over_keys_matches_definition(case, name, stride, splits):
    """Key slices (pass 1 partials, pass 2 per slice, merged top-k) give the definition's tiles, and the fused
    launch's, whatever the slice count; fewer query tiles per program too."""
    q, k, q_offset, kv_offset, k_seg = _inputs(case, seed=21)
    pattern = PATTERNS[name]
    fused = _kernel(q, k, pattern, q_offset, kv_offset, k_seg, stride, splits=1)
    split = _kernel(q, k, pattern, q_offset, kv_offset, k_seg, stride, splits=splits, rows_per_program=16)
    _same_as_definition(split, q, k, pattern, q_offset, kv_offset, k_seg, stride)
    _same_as_definition(fused, q, k, pattern, q_offset, kv_offset, k_seg, stride)
    assert (split >= 0).any()


def test_probe_kernel_split_keeps_a_planted_key_in_a_late_slice():
    """The planted key's tile lies in the last of 5 slices; the other slices' lists are full of weaker tiles."""
    gen = torch.Generator().manual_seed(22)
    q = 0.1 * torch.randn(1, 4, 64, 64, generator=gen)
    k = 0.1 * torch.randn(1, 2, 1280, 64, generator=gen)
    u = torch.randn(64, generator=gen)
    q[:, :, :] += 6.0 * u / u.norm()
    k[:, :, 1100] += 6.0 * u / u.norm()
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=64, topk_blocks=2, selector="probe")
    tiles = _kernel(q, k, pattern, 1216, 0, None, 16, splits=5)
    assert tiles[0, :, -1, 0].tolist() == [17, 17]


def test_probe_splits_rule():
    from hf_sparsek.kernels.probe import probe_splits

    assert probe_splits(programs=300, n_k=512, cn=1, sms=132) == 1  # enough programs already
    assert probe_splits(programs=32, n_k=256, cn=1, sms=132) == 9  # Gemma 3 per query head at 16K: 288 programs
    assert probe_splits(programs=1, n_k=128, cn=1, sms=132) == 16  # a decode step: slices of 8 key tiles at least
    assert probe_splits(programs=1, n_k=4096, cn=1, sms=132) == 64  # at most 64 slices
    assert probe_splits(programs=1, n_k=3, cn=1, sms=132) == 1
    with pytest.raises(ValueError, match="splits"):
        q, k, q_offset, kv_offset, k_seg = _inputs(CASES[0], seed=23)
        _kernel(q, k, PATTERNS["sink64-win64-top3"], q_offset, kv_offset, k_seg, 16, splits=0)


def test_probe_kernel_bf16_selects_as_float32():
    """bfloat16 queries and keys: the kernel chooses the tiles it chooses for the same values in float32 (the
    interpreter's ``tl.dot`` misreads bf16 tiles, so the launch hands it float32 copies; a bf16 product is exact in
    float32, so the scores are the same)."""
    q, k, q_offset, kv_offset, k_seg = _inputs((2, 4, 2, 150, 230, 64, None, 0, True), seed=16)
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    pattern = PATTERNS["sink64-win64-top3"]
    got = _kernel(q, k, pattern, q_offset, kv_offset, k_seg, 16)
    assert torch.equal(got, _kernel(q.float(), k.float(), pattern, q_offset, kv_offset, k_seg, 16))
