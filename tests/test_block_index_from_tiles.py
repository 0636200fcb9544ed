"""The Triton list kernel (``hf_sparsek.kernels.block_index``, ``build_block_index(builder="triton")``) gives the
PyTorch builder's index bit for bit, in the Triton CPU interpreter.

Cases are awkward on purpose: odd lengths, offsets off the block grid, chunked prefill, decode (1 and 4 queries),
batches with left padding and holes, GQA / MQA, blocks of 64 and 128, dense rows, selected tiles with -1 entries,
repeats, copies of the static tiles, tiles past the keys or the diagonal, int64 and strided tile tensors. The op's
output on a kernel-built index equals its output on the PyTorch-built one.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from conftest import triton_interpreter

from hf_sparsek import BlockLayout, SparsePattern, build_block_index, sparse_attention
from hf_sparsek.block_index import BlockIndex
from hf_sparsek.ops import DECODE_MAX_Q_LEN, sequence_layout

triton = pytest.importorskip("triton")
if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7) and int(__import__("numpy").__version__[0]) >= 2:
    pytest.skip(f"Triton {triton.__version__}'s interpreter needs numpy<2", allow_module_level=True)

FIELDS = ("full_count", "full_tiles", "part_count", "part_tiles")
PATTERNS = {
    "sink64-win256-top24": SparsePattern(block_size=64, sink_tokens=64, window=256, topk_blocks=24),
    "sink3-win70-top3": SparsePattern(block_size=64, sink_tokens=3, window=70, topk_blocks=3),
    "sink100-win10-top2": SparsePattern(block_size=64, sink_tokens=100, window=10, topk_blocks=2),
    "win5-top4": SparsePattern(block_size=64, window=5, topk_blocks=4),
    "sink130-top2": SparsePattern(block_size=64, sink_tokens=130, topk_blocks=2),
    "top3": SparsePattern(block_size=64, topk_blocks=3),
    "b128-sink128-win300-top3": SparsePattern(block_size=128, sink_tokens=128, window=300, topk_blocks=3),
    "b128-sink5-win130-dense256-top2": SparsePattern(block_size=128, sink_tokens=5, window=130, topk_blocks=2,
                                                     min_sparse_len=256),
    "sink4-win40": SparsePattern(block_size=64, sink_tokens=4, window=40),
    "dense": SparsePattern(block_size=64),
}
# (q_len, kv_len, q_offset, kv_offset): prefill, odd prefill, chunk, chunk off the grid, decode (1 and 4 queries),
# decode against a cache that starts mid-tile.
SHAPES = [(300, 300, 0, 0), (517, 517, 0, 0), (37, 300, 263, 0), (65, 237, 150, 3), (1, 300, 299, 0),
          (4, 389, 385, 0), (1, 250, 299, 50), (4, 190, 301, 115)]
# (batch, KV heads, selected tiles' batch, selected tiles' heads, padding): GQA per-head tiles, MQA, broadcasts.
LAYOUTS = [(1, 2, 1, 2, "none"), (3, 2, 3, 2, "left"), (2, 1, 2, 1, "none"), (3, 2, 1, 1, "holes"),
           (2, 4, 2, 1, "left")]


@pytest.fixture(autouse=True)
def interpret():
    """The attention kernels re-decorated in interpreter mode as tests/test_kernels_interpret.py sets them up, and
    the list kernels too (``conftest.triton_interpreter``)."""
    pytest.importorskip("test_kernels_interpret")
    with triton_interpreter("block_index"):
        yield


def _padding(kind: str, batch: int, kv_len: int) -> torch.Tensor | None:
    """None, left padding (a different amount per row, row 0 unpadded) or holes (keys missing mid-sequence)."""
    if kind == "none":
        return None
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    for b in range(1, batch):
        if kind == "left":
            mask[b, : min(kv_len - 1, 70 * b + 3)] = False
        else:
            mask[b, b::3] = False
            mask[b, 40 : 40 + 90 * b] = False
    mask[:, -1] = True
    return mask


def _tiles(shape_b: int, shape_h: int, n_q: int, n_k: int, k: int, qb0: int, kb0: int, seed: int) -> torch.Tensor:
    """Selected key tiles: mostly causal ones, with -1, repeats, the sink and diagonal tiles (static ones), tiles
    past the keys and past the diagonal."""
    gen = torch.Generator().manual_seed(seed)
    diag = (qb0 - kb0 + torch.arange(n_q)).clamp(min=0).view(1, 1, n_q, 1)
    draw = (torch.rand(shape_b, shape_h, n_q, k, generator=gen) * (diag + 1).float()).long()
    kind = torch.randint(0, 10, (shape_b, shape_h, n_q, k), generator=gen)
    tiles = torch.where(kind == 0, -1, draw)
    tiles = torch.where(kind == 1, 0, tiles)  # a sink tile (static already)
    tiles = torch.where(kind == 2, diag, tiles)  # the diagonal (static when there is a window)
    tiles = torch.where(kind == 3, diag + 1 + (kind % 3), tiles)  # past the diagonal: not causal
    tiles = torch.where(kind == 4, n_k + 2, tiles)  # past the keys
    if k > 1:
        tiles[..., -1] = tiles[..., 0]  # a repeat
    return tiles.to(torch.int32)


def _build(pattern: SparsePattern, shape, layout, seed: int, builder: str, tiles_dtype=torch.int32,
           strided: bool = False) -> BlockIndex:
    q_len, kv_len, q_offset, kv_offset = shape
    batch, heads, t_b, t_h, padding = layout
    block = pattern.block_size
    mask = _padding(padding, batch, kv_len)
    k_seg, _, k_rank = sequence_layout(batch, q_len, kv_len, mask, None, torch.device("cpu"))
    topk = None
    if pattern.topk_blocks is not None:
        n_q = (q_offset % block + q_len + block - 1) // block
        n_k = (kv_offset % block + kv_len + block - 1) // block
        topk = _tiles(t_b, t_h, n_q, n_k, pattern.topk_blocks, q_offset // block, kv_offset // block, seed)
        topk = topk.to(tiles_dtype)
        if strided:  # every other column of a wider tensor
            wide = torch.full(topk.shape[:-1] + (2 * topk.shape[-1],), -7, dtype=topk.dtype)
            wide[..., ::2] = topk
            topk = wide[..., ::2]
    return build_block_index(pattern, batch=batch, kv_heads=heads, q_len=q_len, kv_len=kv_len, q_offset=q_offset,
                             kv_offset=kv_offset, k_seg=k_seg, k_rank=k_rank, topk_tiles=topk, builder=builder)


def _assert_same(got: BlockIndex, want: BlockIndex) -> None:
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous(), name
        assert torch.equal(a, b), f"{name} differs at {(a != b).nonzero()[:4].tolist()}"
    assert got.t_widths == want.t_widths and got.sink_tokens == want.sink_tokens and got.window == want.window
    for name in ("k_seg", "q_seg", "k_rank"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"B{b}-H{h}-t{tb}x{th}-{p}" for b, h, tb, th, p in LAYOUTS])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"q{q}-kv{k}-qo{a}-ko{b}" for q, k, a, b in SHAPES])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_kernel_lists_equal_torch_builder(name, shape, layout):
    pattern = PATTERNS[name]
    seed = zlib.crc32(repr((name, shape, layout)).encode())
    want = _build(pattern, shape, layout, seed, "torch")
    got = _build(pattern, shape, layout, seed, "triton")
    _assert_same(got, want)


@pytest.mark.parametrize("variant", ["int64", "strided"])
def test_kernel_reads_any_integer_tiles(variant):
    pattern = PATTERNS["sink3-win70-top3"]
    shape, layout = (65, 237, 150, 3), (3, 2, 3, 2, "left")
    kwargs = dict(tiles_dtype=torch.int64) if variant == "int64" else dict(strided=True)
    _assert_same(_build(pattern, shape, layout, 5, "triton", **kwargs), _build(pattern, shape, layout, 5, "torch"))


def test_kernel_lists_at_4k_with_24_tiles():
    """The measured case's shape (block 64, sink 64, window 256, top-24, 8 KV heads) at 4K tokens, batch 2."""
    pattern = PATTERNS["sink64-win256-top24"]
    shape, layout = (4096, 4096, 0, 0), (2, 8, 2, 8, "left")
    _assert_same(_build(pattern, shape, layout, 1, "triton"), _build(pattern, shape, layout, 1, "torch"))


def test_auto_builder_on_cpu_is_torch_and_unsupported_plans_raise():
    pattern = SparsePattern(block_size=64, window=10, layout=BlockLayout("strided", stride=3))
    kwargs = dict(batch=1, kv_heads=2, q_len=200, kv_len=200)
    _assert_same(build_block_index(pattern, **kwargs), build_block_index(pattern, builder="torch", **kwargs))
    with pytest.raises(ValueError, match="block layouts"):
        build_block_index(pattern, builder="triton", **kwargs)
    with pytest.raises(ValueError, match="dense heads"):
        build_block_index(SparsePattern(block_size=64, window=10, dense_heads=(1,)), builder="triton", **kwargs)
    seg = torch.zeros(1, 200, dtype=torch.int32)
    with pytest.raises(ValueError, match="packed"):
        build_block_index(SparsePattern(block_size=64, sink_tokens=4), builder="triton", k_seg=seg, q_seg=seg,
                          k_rank=seg, **kwargs)
    with pytest.raises(ValueError, match="candidate slots"):
        build_block_index(SparsePattern(block_size=64, window=64 * 140), builder="triton", batch=1, kv_heads=1,
                          q_len=8192, kv_len=8192)
    with pytest.raises(ValueError, match="builder="):
        build_block_index(pattern, builder="cuda", **kwargs)


@pytest.mark.parametrize("case", [dict(batch=1, hq=4, hkv=2, q_len=300, kv_len=300, mask="none"),
                                  dict(batch=2, hq=3, hkv=1, q_len=70, kv_len=333, mask="left"),
                                  dict(batch=2, hq=4, hkv=2, q_len=4, kv_len=389, mask="holes")],
                         ids=["prefill-GQA", "chunk-MQA-left", "decode4-holes"])
def test_op_output_unchanged_on_kernel_index(case):
    """sparse_attention on the Triton backend (interpreter) gives the same output on the kernel-built index as on
    the PyTorch-built one and, where the op builds an index, as when it builds it from the selected tiles."""
    batch, hq, hkv, q_len, kv_len = (case[n] for n in ("batch", "hq", "hkv", "q_len", "kv_len"))
    pattern = SparsePattern(block_size=64, sink_tokens=5, window=70, topk_blocks=3)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, hq, q_len, 64, generator=gen)
    k, v = (torch.randn(batch, hkv, kv_len, 64, generator=gen) for _ in range(2))
    mask = _padding(case["mask"], batch, kv_len)
    q_offset = kv_len - q_len
    n_q, n_k = (q_offset % 64 + q_len + 63) // 64, (kv_len + 63) // 64
    tiles = _tiles(batch, hkv, n_q, n_k, 3, q_offset // 64, 0, seed=7)
    k_seg, _, k_rank = sequence_layout(batch, q_len, kv_len, mask, None, torch.device("cpu"))
    outs = []
    for builder in ("torch", "triton"):
        index = build_block_index(pattern, batch=batch, kv_heads=hkv, q_len=q_len, kv_len=kv_len, q_offset=q_offset,
                                  k_seg=k_seg, k_rank=k_rank, topk_tiles=tiles, builder=builder)
        outs.append(sparse_attention(q, k, v, pattern, attention_mask=mask, index=index, backend="triton"))
    if q_len > DECODE_MAX_Q_LEN:  # the op builds an index (a short run goes to the split-KV kernel without one)
        outs.append(sparse_attention(q, k, v, pattern, attention_mask=mask, selected_tiles=tiles, backend="triton"))
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert all(torch.equal(outs[0], out) for out in outs[1:])


@pytest.mark.parametrize("given", ["k_seg", "k_rank"])
def test_kernel_lists_with_segments_or_ranks_alone(given):
    """Padding given by key segments alone (ranks are positions: fixed sink tiles) or by ranks alone (all keys
    valid, sinks from the ranks)."""
    pattern = PATTERNS["sink100-win10-top2"]
    mask = _padding("holes", 3, 300)
    k_seg, _, k_rank = sequence_layout(3, 37, 300, mask, None, torch.device("cpu"))
    layout = dict(k_seg=k_seg) if given == "k_seg" else dict(k_rank=k_rank)
    topk = _tiles(3, 2, 1, 5, 2, 4, 0, seed=11)
    kwargs = dict(batch=3, kv_heads=2, q_len=37, kv_len=300, q_offset=263, topk_tiles=topk, **layout)
    _assert_same(build_block_index(pattern, builder="triton", **kwargs),
                 build_block_index(pattern, builder="torch", **kwargs))
