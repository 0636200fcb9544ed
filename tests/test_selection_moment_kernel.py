"""Selector "moment" on the GPU path (``select_by_moment`` in hf_sparsek.kernels.selection) against its PyTorch
definition (hf_sparsek.selection.moment), in Triton's interpreter: awkward shapes (offsets, padding, GQA / MQA,
decode, chunked prefill, sliding keys), every stride, budgets past one chunk, the decode split path, and a case where
the per-row estimate and the mean query disagree."""

from __future__ import annotations

import pytest
import torch
from conftest import triton_interpreter
from test_selection import CASES, PATTERNS, _case_id, _check_same_selection, _inputs
from test_selection_moment import _slow_moment_selection
from test_selection_probe_kernel import KERNEL_CASES  # the probe kernel's awkward shapes

from hf_sparsek import SparsePattern
from hf_sparsek.selection import select_moment
from hf_sparsek.selection.moment import key_moments


@pytest.fixture(autouse=True)
def interpret():
    with triton_interpreter("selection"):
        yield


def _same(q, k, pattern, q_offset, kv_offset, k_seg, stride=8):
    want = select_moment(q, k, pattern, q_offset, kv_offset, k_seg, stride=stride, backend="torch")
    got = select_moment(q, k, pattern, q_offset, kv_offset, k_seg, stride=stride, backend="triton")
    assert got.shape == want.shape and got.dtype == want.dtype
    if not torch.equal(got, want):  # ties may order or pick differently: compare the masses chosen
        _check_same_selection(got, _slow_moment_selection(q, k, pattern, q_offset, kv_offset, k_seg, stride),
                              tol=1e-5)
    return got


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[_case_id(c) for c in KERNEL_CASES])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_moment_kernel_matches_definition(name, case):
    q, k, q_offset, kv_offset, k_seg = _inputs(case, seed=21)
    _same(q, k, PATTERNS[name], q_offset, kv_offset, k_seg)


@pytest.mark.parametrize("stride", [1, 4, 16, 64])
def test_moment_kernel_other_strides(stride):
    q, k, q_offset, kv_offset, k_seg = _inputs((2, 4, 2, 150, 230, 64, None, 0, True), seed=22)
    _same(q, k, PATTERNS["sink64-win64-top3"], q_offset, kv_offset, k_seg, stride=stride)


@pytest.mark.parametrize("topk,q_len", [(5, 130), (40, 130), (3, 1), (3, 70)])
def test_moment_kernel_many_key_tiles(topk, q_len):
    """260 key tiles: budgets within a chunk (insertion) and past it (merges); q_len 1 and 70 take the decode
    split path (few query tiles, many key tiles)."""
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=100, topk_blocks=topk, selector="moment")
    q, k, q_offset, kv_offset, k_seg = _inputs((2, 4, 2, q_len, 16600, 32, None, 0, True), seed=23)
    tiles = _same(q, k, pattern, q_offset, kv_offset, k_seg)
    assert (tiles >= 0).sum(-1).max() == topk


def test_moment_kernel_block128_head_dim_256_and_threshold():
    pattern = SparsePattern(block_size=128, window=128, topk_blocks=3, selector="moment", mass_threshold=0.7)
    q, k, q_offset, kv_offset, k_seg = _inputs((1, 4, 2, 400, 520, 256, None, 0, False), seed=24)
    _same(2 * q, k, pattern, q_offset, kv_offset, k_seg)


def test_moment_kernel_key_features_are_the_definitions():
    """The key pooling launch's [mean, variance] equal key_moments' (padding left out)."""
    from hf_sparsek.kernels.selection import pool_features

    q, k, q_offset, kv_offset, k_seg = _inputs(CASES[1], seed=25)
    mean, var = key_moments(k, kv_offset, 64, k_seg >= 0)
    feats = pool_features(k, kv_offset, 64, k_seg, 0, False, moments=True)
    dim = k.shape[-1]
    torch.testing.assert_close(feats[..., :dim], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[..., dim:2 * dim], var, rtol=1e-4, atol=1e-4)


def test_moment_kernel_refuses_a_stride_it_cannot_sample():
    q, k, q_offset, kv_offset, k_seg = _inputs(CASES[0], seed=26)
    with pytest.raises(ValueError, match="power of two dividing the block"):
        select_moment(q, k, PATTERNS["sink64-win64-top3"], q_offset, kv_offset, k_seg, stride=12, backend="triton")


def test_selection_launches_refuse_bad_arguments():
    """The mass and moment launches share their argument checks: rows per program a power of two >= 16, kept key
    features float32 of the call's (batch, KV heads, key tiles, width)."""
    from hf_sparsek.kernels.selection import select_by_mass, select_by_moment

    q, k, q_offset, kv_offset, _ = _inputs((1, 4, 2, 128, 128, 32, None, 0, False), seed=24)
    common = dict(block=64, q_offset=q_offset, kv_offset=kv_offset, sink=0, topk=1, window=64, threshold=None,
                  scale=32 ** -0.5)
    for select, extra, width in ((select_by_mass, {}, 64), (select_by_moment, {"stride": 8, "variance": 0.5}, 64)):
        with pytest.raises(ValueError, match="rows_per_program must be a power of two"):
            select(q, k, None, None, None, rows_per_program=24, **common, **extra)
        good = torch.randn(1, 2, 2, width)
        for bad in (good.double(), good[:, :1]):
            with pytest.raises(ValueError, match="key_features must be float32"):
                select(q, k, None, None, None, key_features=bad, **common, **extra)
