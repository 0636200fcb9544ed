"""The fused probe kernel (hf_sparsek.kernels.probe) against the PyTorch definition of selector "probe"
(hf_sparsek.selection.probe), in Triton's interpreter: awkward shapes, every sampling stride the kernel takes, peaked
and flat attention, and a planted key."""

from __future__ import annotations

import pytest
import torch
from conftest import triton_interpreter
from test_selection import CASES, PATTERNS, _case_id, _check_same_selection, _inputs
from test_selection_oracle import _slow_oracle_selection

from hf_sparsek import SparsePattern
from hf_sparsek.selection import select_probe


@pytest.fixture(autouse=True)
def interpret():
    with triton_interpreter("selection", "probe"):
        yield


def _same(q, k, pattern, q_offset, kv_offset, k_seg, stride=16):
    want = select_probe(q, k, pattern, q_offset, kv_offset, k_seg, stride=stride, backend="torch")
    got = select_probe(q, k, pattern, q_offset, kv_offset, k_seg, stride=stride, backend="triton")
    assert got.shape == want.shape and got.dtype == want.dtype
    if not torch.equal(got, want):  # ties may order or pick differently: compare the masses chosen
        rows = lambda t, q_len: (q_offset + t) % stride == stride - 1 or t == q_len - 1  # noqa: E731
        _check_same_selection(got, _slow_oracle_selection(q, k, pattern, q_offset, kv_offset, k_seg, rows),
                              tol=1e-5)
    return got


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
