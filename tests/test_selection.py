"""Dynamic block selection (hf_sparsek.selection): the mass selector against a slow exact reference of its own
definition, the Triton kernel against the PyTorch path (Triton CPU interpreter), a planted block, and the public
path (sparse_attention and a model forward) on awkward shapes: padding, decode, chunked prefill, GQA / MQA."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import dense_masked_attention, triton_interpreter

import hf_sparsek
from hf_sparsek import SparsePattern, exact_token_mask
from hf_sparsek.ops import build_index_for, sparse_attention
from hf_sparsek.selection import select_tiles
from hf_sparsek.selection.mass import select_mass, tile_mass
from hf_sparsek.selection.tiles import tile_grid

# --- the definition, slowly: loops over (batch, KV head, query tile, key tile), float64 --------------------------


def _slow_cells(q, k, pattern, q_offset, kv_offset, k_seg):
    """The loops every slow selector definition shares: per (batch, KV head, query tile) of the call, yield
    ``(b, g, m, cell)`` with the positions, real-key / real-row masks and key ranks a definition reads."""
    block = pattern.block_size
    q_len, kv_len = q.shape[2], k.shape[2]
    q_pos = q_offset + torch.arange(q_len)
    k_pos = kv_offset + torch.arange(kv_len)
    qb0, kb0 = q_offset // block, kv_offset // block
    n_q = (q_offset % block + q_len + block - 1) // block
    for b in range(q.shape[0]):
        k_real = torch.ones(kv_len, dtype=torch.bool) if k_seg is None else k_seg[b] >= 0
        rank = kv_offset + torch.cumsum(k_real.long(), 0) - 1
        q_real = torch.ones(q_len, dtype=torch.bool)
        if k_seg is not None and q_offset >= kv_offset:
            q_real = k_real[q_offset - kv_offset: q_offset - kv_offset + q_len]
        for g in range(k.shape[1]):
            for m in range(n_q):
                rows = q_pos // block == qb0 + m
                yield b, g, m, dict(rows=rows, real_rows=rows & q_real, q_pos=q_pos, k_pos=k_pos, qb0=qb0, kb0=kb0,
                                    n_k=(kv_offset % block + kv_len + block - 1) // block, k_real=k_real, rank=rank)


def _slow_choice(pattern, probs, cell):
    """:func:`_slow_choose` for one cell of :func:`_slow_cells`."""
    return _slow_choose(pattern, probs, int(cell["q_pos"][cell["rows"]].max()), cell["k_pos"], cell["kb0"],
                        cell["k_real"], cell["rank"])


def _slow_mass_selection(q, k, pattern, q_offset, kv_offset, k_seg):
    """{(b, g, m): (chosen tile set, {tile: estimated mass})} straight from the docstring of selection/mass.py."""
    block = pattern.block_size
    dim = q.shape[3]
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(dim)
    result = {}
    for b, g, m, c in _slow_cells(q, k, pattern, q_offset, kv_offset, k_seg):
        real_rows, k_pos, k_real, kb0 = c["real_rows"], c["k_pos"], c["k_real"], c["kb0"]
        probs = {}
        for h in range(g * group, (g + 1) * group):
            qbar = q[b, h, real_rows].double().mean(0) if real_rows.any() else torch.zeros(dim).double()
            logits = {}
            for n in range(c["n_k"]):
                keys = (k_pos // block == kb0 + n) & k_real
                if kb0 + n > c["qb0"] + m or not keys.any():
                    continue
                kk = k[b, g, keys].double()
                bound = torch.maximum(qbar * kk.amax(0), qbar * kk.amin(0)).sum()
                logits[n] = scale * float(bound)
            if not logits:
                continue
            top_logit = max(logits.values())
            total = sum(math.exp(v - top_logit) for v in logits.values())
            for n, v in logits.items():
                probs[n] = probs.get(n, 0.0) + math.exp(v - top_logit) / total / group
        result[b, g, m] = (_slow_choice(pattern, probs, c), probs)
    return result


def _slow_choose(pattern, probs, q_last, k_pos, kb0, k_real, rank):
    """The tiles a selector keeps from masses ``probs`` {tile: mass}: tiles the sink / window keep whole do not
    compete; the ``topk_blocks`` with most mass, or with a threshold the fewest reaching it (static mass counted)."""
    block, top, thr = pattern.block_size, pattern.topk_blocks, pattern.mass_threshold
    static = set()
    for n in probs:
        keys = (k_pos // block == kb0 + n) & k_real
        stored = k_pos[k_pos // block == kb0 + n]
        in_window = pattern.window is not None and q_last - int(stored.min()) < pattern.window
        all_sink = pattern.sink_tokens > 0 and bool((rank[keys] < pattern.sink_tokens).all())
        if in_window or all_sink:
            static.add(n)
    competing = sorted((n for n in probs if n not in static), key=lambda n: -probs[n])[:top]
    if thr is not None:
        covered, kept = sum(probs[n] for n in static), []
        for n in competing:
            if covered >= thr:
                break
            kept.append(n)
            covered += probs[n]
        competing = kept
    return set(competing)


def _check_same_selection(tiles, slow, tol=1e-6):
    """Same tiles as the slow definition, ties allowed: per row the chosen masses agree as sorted lists."""
    assert tiles.dtype == torch.int32
    for (b, g, m), (chosen, probs) in slow.items():
        got = [n for n in tiles[b, g, m].tolist() if n >= 0]
        assert len(got) == len(set(got)) == len(chosen), (b, g, m, got, chosen)
        want = sorted(probs[n] for n in chosen)
        have = sorted(probs[n] for n in got)
        assert all(abs(x - y) <= tol for x, y in zip(want, have, strict=True)), (b, g, m, got, chosen)


def _padding(batch: int, kv_len: int) -> torch.Tensor:
    """(batch, kv_len) int32 k_seg: row b has 37 * b padding keys on the left."""
    seg = torch.zeros(batch, kv_len, dtype=torch.int32)
    for b in range(batch):
        seg[b, : 37 * b] = -1
    return seg


# batch, q heads, kv heads, q_len, kv_len, head dim, q_offset (None: the last q_len positions), kv_offset, padded
CASES = [
    (1, 4, 2, 300, 300, 64, None, 0, False),
    (2, 3, 1, 200, 200, 128, None, 0, True),  # group of 3 (padded to 4 in the kernel), left padding
    (1, 8, 1, 1, 233, 64, None, 0, False),  # MQA decode
    (2, 4, 4, 50, 250, 64, 150, 0, True),  # chunked prefill, q_offset not a multiple of the block
    (1, 2, 2, 70, 161, 128, None, 101, False),  # keys from offset 101 (a sliding cache)
]
PATTERNS = {
    "sink64-win64-top3": SparsePattern(block_size=64, sink_tokens=64, window=64, topk_blocks=3),
    "win100-top2-mass0.6": SparsePattern(block_size=64, window=100, topk_blocks=2, mass_threshold=0.6),
    "sink5-top4-block128": SparsePattern(block_size=128, sink_tokens=5, topk_blocks=4),
}


def _case_id(case) -> str:
    b, hq, hk, lq, lk, d, qo, ko, pad = case
    return f"B{b}-Tq{lq}-Tk{lk}-Hq{hq}-Hk{hk}-D{d}" + (f"-qo{qo}" if qo is not None else "") + \
        (f"-ko{ko}" if ko else "") + ("-pad" if pad else "")


def _inputs(case, seed=0):
    b, hq, hk, lq, lk, d, qo, ko, pad = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen)
    k = torch.randn(b, hk, lk, d, generator=gen)
    q_offset = ko + lk - lq if qo is None else qo
    return q, k, q_offset, ko, (_padding(b, lk) if pad else None)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_mass_selector_follows_its_definition(name, case):
    pattern = PATTERNS[name]
    q, k, q_offset, kv_offset, k_seg = _inputs(case)
    tiles = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="torch")
    assert tiles.shape == (q.shape[0], k.shape[1], (q_offset % pattern.block_size + q.shape[2] + pattern.block_size
                                                    - 1) // pattern.block_size, pattern.topk_blocks)
    _check_same_selection(tiles, _slow_mass_selection(q, k, pattern, q_offset, kv_offset, k_seg))


def test_estimated_mass_rows_sum_to_one():
    q, k, q_offset, kv_offset, k_seg = _inputs(CASES[1])
    pattern = PATTERNS["sink64-win64-top3"]
    grid = tile_grid(q.shape[2], k.shape[2], q_offset, kv_offset, k_seg, pattern, q.shape[0], q.device)
    mass = tile_mass(q, k, grid, pattern.block_size, q_offset, kv_offset, k_seg)
    torch.testing.assert_close(mass.sum(-1), torch.ones(mass.shape[:3]))
    assert not (mass * ~grid.candidate).any()  # no mass on acausal or empty tiles


# --- a planted block: one key tile holds the attention mass ---------------------------------------------------------


def _planted(one_key: bool):
    """Queries of the last tile all point along u; key tile 3 holds keys along u (all of them, or one)."""
    gen = torch.Generator().manual_seed(3)
    q = 0.1 * torch.randn(1, 4, 640, 64, generator=gen)
    k = 0.1 * torch.randn(1, 2, 640, 64, generator=gen)
    u = torch.randn(64, generator=gen)
    u = u / u.norm()
    q[:, :, 576:] += 6.0 * u
    if one_key:
        k[:, :, 3 * 64 + 17] += 6.0 * u
    else:
        k[:, :, 3 * 64: 4 * 64] += 6.0 * u
    return q, k


@pytest.mark.parametrize("one_key", [False, True], ids=["whole-block", "one-key"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_planted_block_is_selected(backend, one_key, interpret):
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=64, topk_blocks=1)
    q, k = _planted(one_key)
    tiles = select_mass(q, k, pattern, 0, 0, None, backend=backend)
    assert tiles[0, :, -1, 0].tolist() == [3, 3]


# --- the Triton kernel equals the PyTorch definition (Triton CPU interpreter) --------------------------------------


@pytest.fixture
def interpret(request):
    """TRITON_INTERPRET=1 for kernels launched in the test (only needed by the Triton backend)."""
    if "triton" not in request.node.name:
        yield
        return
    with triton_interpreter("selection"):
        yield


KERNEL_CASES = CASES + [(2, 8, 2, 129, 129, 64, None, 0, True)]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[_case_id(c) for c in KERNEL_CASES])
@pytest.mark.parametrize("name", ["sink64-win64-top3", "win100-top2-mass0.6"])
def test_triton_kernel_matches_definition(name, case, interpret):
    pattern = PATTERNS[name]
    q, k, q_offset, kv_offset, k_seg = _inputs(case, seed=1)
    want = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="torch")
    got = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="triton")
    assert got.shape == want.shape and got.dtype == want.dtype
    if not torch.equal(got, want):  # ties may order or pick differently: compare the masses chosen
        _check_same_selection(got, _slow_mass_selection(q, k, pattern, q_offset, kv_offset, k_seg), tol=1e-5)


@pytest.mark.parametrize("case", KERNEL_CASES[1:4] + KERNEL_CASES[-1:], ids=[_case_id(c) for c in KERNEL_CASES[1:4]
                                                                           + KERNEL_CASES[-1:]])
def test_triton_kernel_half_features_match_definition(case, interpret):
    """The CUDA launch (``half``: pooled features stored and multiplied as float16, query features loaded once per
    program), run here in the interpreter: the masses of the chosen tiles equal the definition's to float16
    rounding (padding, a group of 3, MQA decode, chunked prefill, threshold mode)."""
    from hf_sparsek.kernels.selection import select_by_mass

    from hf_sparsek.selection.tiles import key_tile_info

    for name in ("sink64-win64-top3", "win100-top2-mass0.6"):
        pattern = PATTERNS[name]
        q, k, q_offset, kv_offset, k_seg = _inputs(case, seed=4)
        count = sink_only = None
        if k_seg is not None:
            count, sink_only = key_tile_info(k.shape[2], kv_offset, k_seg, pattern, q.shape[0], q.device)
        got = select_by_mass(q, k, k_seg, count, sink_only, block=pattern.block_size, q_offset=q_offset,
                             kv_offset=kv_offset, sink=pattern.sink_tokens, topk=pattern.topk_blocks,
                             window=pattern.window, threshold=pattern.mass_threshold, scale=q.shape[-1] ** -0.5,
                             half=True)
        _check_same_selection(got, _slow_mass_selection(q, k, pattern, q_offset, kv_offset, k_seg), tol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_pooling_pair_equals_separate_launches(dtype, interpret):
    """Query and key features pooled in one launch (``pool_feature_pair``, what ``select_by_mass`` runs) equal the
    two separate launches: padding, a chunk of queries inside the keys, keys from an unaligned offset, head dim 80."""
    from hf_sparsek.kernels.selection import pool_feature_pair, pool_features

    gen = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 6, 150, 80, generator=gen), torch.randn(2, 2, 260, 80, generator=gen)
    seg = torch.zeros(2, 260, dtype=torch.int32)
    seg[1, :70] = -1
    for q_offset, kv_offset, q_seg, k_seg, start in ((110, 0, seg, seg, 110), (5, 0, None, None, 0),
                                                     (200, 77, None, seg, 0)):
        qf, kf = pool_feature_pair(q, q_offset, q_seg, start, k, kv_offset, k_seg, 64, dtype)
        assert torch.equal(qf, pool_features(q, q_offset, 64, q_seg, start, True, dtype))
        assert torch.equal(kf, pool_features(k, kv_offset, 64, k_seg, 0, False, dtype))
    qf, kf = pool_feature_pair(q, 300, None, 0, k[:, :, :0], 256, None, 64, dtype)  # no keys: the queries still pool
    assert kf.numel() == 0 and torch.equal(qf, pool_features(q, 300, 64, None, 0, True, dtype))


def test_triton_kernel_half_features_saturate(interpret):
    """Features past float16's range saturate instead of becoming inf (which would make NaN scores): every query
    tile still gets its full budget of causal, competing tiles."""
    from hf_sparsek.kernels.selection import select_by_mass

    q, k, q_offset, kv_offset, _ = _inputs((1, 4, 2, 640, 640, 64, None, 0, False), seed=6)
    q, k = q * 1e5, k * 1e5
    got = select_by_mass(q, k, None, None, None, block=64, q_offset=q_offset, kv_offset=kv_offset, sink=0, topk=3,
                         window=None, threshold=None, scale=0.125, half=True)
    qb = torch.arange(got.shape[2]).view(1, 1, -1, 1)
    assert bool(((got >= 0) == (torch.arange(3).view(1, 1, 1, -1) <= qb)).all())  # tiles 0 .. qb compete
    assert bool((got <= qb).all())


@pytest.mark.parametrize("rows", [16, 32, 64])
def test_triton_kernel_rows_per_program_keeps_the_tiles(rows, interpret):
    """More (query tile, head) rows per program (fewer programs, each key feature load shared wider): the same
    tiles as the default launch, on a case with padding, a group of 3 and a partial last program."""
    from hf_sparsek.kernels.selection import select_by_mass

    from hf_sparsek.selection.tiles import key_tile_info

    pattern = PATTERNS["win100-top2-mass0.6"]
    q, k, q_offset, kv_offset, k_seg = _inputs((2, 3, 1, 700, 700, 64, None, 0, True), seed=3)
    count, sink_only = key_tile_info(k.shape[2], kv_offset, k_seg, pattern, q.shape[0], q.device)
    args = dict(block=pattern.block_size, q_offset=q_offset, kv_offset=kv_offset, sink=pattern.sink_tokens,
                topk=pattern.topk_blocks, window=pattern.window, threshold=pattern.mass_threshold,
                scale=q.shape[-1] ** -0.5)
    want = select_by_mass(q, k, k_seg, count, sink_only, rows_per_program=16 if rows != 16 else 64, **args)
    got = select_by_mass(q, k, k_seg, count, sink_only, rows_per_program=rows, **args)
    assert torch.equal(got, want)
    if not torch.equal(got, select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="torch")):
        _check_same_selection(got, _slow_mass_selection(q, k, pattern, q_offset, kv_offset, k_seg), tol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        select_by_mass(q, k, k_seg, count, sink_only, rows_per_program=24, **args)


def test_mass_rows_per_program_keeps_every_sm_busy():
    """The widest programs only while the grid still fills the GPU: on 132 SMs (H200) with 32 / 8 heads and
    64-token tiles, 2K keeps 16 rows, 8K takes 32, 16K and 64K take 64; a batch of 8 widens 2K; the interpreter's
    one "SM" always takes 64."""
    from hf_sparsek.kernels.selection import mass_rows_per_program

    assert [mass_rows_per_program(seq // 64, 4, 8, 132) for seq in (2048, 8192, 16384, 65536)] == [16, 32, 64, 64]
    assert mass_rows_per_program(2048 // 64, 4, 64, 132) == 64
    assert mass_rows_per_program(1, 8, 1, 132) == 16  # a decode step of one sequence
    assert mass_rows_per_program(5, 3, 2, 1) == 64
    # the running top-k stays within 1024 slots or the 16-row program's: MHA at top-24 takes 32 rows (32 tiles x 32
    # slots), at top-200 16 rows (as before); the measured case (group 4, top-24) keeps 64, at top-100 32 (8 x 128)
    assert mass_rows_per_program(1024, 1, 8, 132, topk=24) == 32
    assert mass_rows_per_program(1024, 1, 8, 132, topk=200) == 16
    assert mass_rows_per_program(1024, 4, 8, 132, topk=24) == 64
    assert mass_rows_per_program(1024, 4, 8, 132, topk=100) == 32


def test_triton_kernel_block128_head_dim_256(interpret):
    pattern = SparsePattern(block_size=128, window=128, topk_blocks=2, selector="mass")
    q, k, q_offset, kv_offset, k_seg = _inputs((1, 2, 1, 300, 300, 256, None, 0, False), seed=2)
    want = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="torch")
    got = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="triton")
    if not torch.equal(got, want):
        _check_same_selection(got, _slow_mass_selection(q, k, pattern, q_offset, kv_offset, k_seg), tol=1e-5)


@pytest.mark.parametrize("topk,dim", [(5, 64), (33, 64), (20, 256)], ids=["top5-D64", "top33-D64", "top20-D256"])
def test_triton_kernel_many_key_tiles(topk, dim, interpret):
    """46 key tiles, with padding, a window and a sink; the definition's tiles: top-5 inserts into its running top-k
    (the budget fits a chunk of 32 tiles); top-33 merges 64 slots staged from two chunks of 32; head dim 256 (chunks
    of 16) merges from top-17 on."""
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=100, topk_blocks=topk)
    q, k, q_offset, kv_offset, k_seg = _inputs((2, 4, 2, 300, 2900, dim, None, 0, True), seed=5)
    got = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="triton")
    want = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="torch")
    assert (got >= 0).sum(-1).max() == min(topk, 43)  # the budget is used: up to 43 tiles compete
    if not torch.equal(got, want):
        _check_same_selection(got, _slow_mass_selection(q, k, pattern, q_offset, kv_offset, k_seg), tol=1e-5)


MERGE_KERNEL = """
import triton
import triton.language as tl

from hf_sparsek.kernels.selection import desc_key, key_tile, key_value, topk_merge


@triton.jit
def merge_all(V, T, OV, OT, n_chunks, BM: tl.constexpr, KP: tl.constexpr, LOG: tl.constexpr):
    r = tl.arange(0, BM)
    c = tl.arange(0, KP)
    best = desc_key(tl.full([BM, KP], -1.0e30, tl.float32), tl.full([BM, KP], -1, tl.int32))
    for i in range(n_chunks):
        at = r[:, None] * (n_chunks * KP) + i * KP + c[None, :]
        best = topk_merge(best, desc_key(tl.load(V + at), tl.load(T + at)), BM, KP, LOG)
    tl.store(OV + r[:, None] * KP + c[None, :], key_value(best))
    tl.store(OT + r[:, None] * KP + c[None, :], key_tile(best))
"""


@pytest.mark.parametrize("width", [32, 64])
def test_triton_topk_merge_keeps_the_largest_lower_tile_first(width, interpret, tmp_path):
    """The running top-k's merge (``topk_merge`` of ``desc_key`` keys) over many chunks equals a sort by value
    (descending), then tile (ascending): negative values, -0.0 beside +0.0, and ties across chunks."""
    import importlib.util

    path = tmp_path / "merge_kernel.py"  # a file: @triton.jit reads its source; imported now, in interpreter mode
    path.write_text(MERGE_KERNEL)
    spec = importlib.util.spec_from_file_location("merge_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    merge_all = module.merge_all
    gen = torch.Generator().manual_seed(width)
    rows, chunks = 16, 5
    values = torch.randint(-6, 6, (rows, chunks * width), generator=gen).float() / 4  # many ties, negatives
    values[0] = -1.0  # row 0: zeros of both signs at the top, equal
    values[0, :3] = torch.tensor([-0.0, 0.0, -0.0])
    tiles = torch.stack([torch.randperm(chunks * width, generator=gen) for _ in range(rows)]).int()
    tiles[0, :3] = tiles[0, :3].sort().values  # -0.0 holds the lowest tile: it comes before +0.0
    out_v = torch.empty(rows, width)
    out_t = torch.empty(rows, width, dtype=torch.int32)
    merge_all[(1,)](values, tiles, out_v, out_t, chunks, BM=rows, KP=width, LOG=width.bit_length() - 1)
    rank = (8 - values * 4).long() * 10_000 + tiles.long()  # value descending (quarters), then tile ascending
    order = torch.argsort(rank, dim=-1)[:, :width]
    assert torch.equal(out_v, torch.gather(values, 1, order) + 0.0)
    assert torch.equal(out_t, torch.gather(tiles, 1, order))


# --- the public path: sparse_attention and a model forward ----------------------------------------------------------


def _expected_mask(pattern, tiles, q_len, kv_len, q_offset, kv_offset, hkv, attention_mask):
    """Token-exact mask (B, Hkv, q_len, kv_len): the static part's token rules, or a causal real key in a tile
    the selector chose for the query's tile."""
    block = pattern.block_size
    batch = tiles.shape[0]
    shape = (batch, hkv, q_len, kv_len)
    kw = dict(q_offset=q_offset, kv_offset=kv_offset, kv_heads=hkv, attention_mask=attention_mask)
    causal = exact_token_mask(SparsePattern(block_size=block), q_len, kv_len, **kw).expand(shape)
    static = exact_token_mask(pattern.replace(topk_blocks=None), q_len, kv_len, **kw).expand(shape)
    q_tile = (q_offset + torch.arange(q_len)) // block - q_offset // block
    k_tile = (kv_offset + torch.arange(kv_len)) // block - kv_offset // block
    chosen = torch.zeros(batch, hkv, tiles.shape[2], k_tile.max() + 2, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(tiles >= 0, tiles, chosen.shape[-1] - 1).long(), True)
    picked = chosen[:, :, q_tile][..., k_tile]
    return static | (causal & picked)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("selector", ["mass", "meanpool", "oracle", "probe", "moment"])
def test_sparse_attention_with_selection_equals_masked_softmax(selector, case):
    """What sparse_attention computes for a top-k pattern is dense attention on the static rules plus the tiles
    ``select_tiles`` chooses: padding, decode, chunked prefill, batch > 1, GQA / MQA, forward and gradients."""
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=64, topk_blocks=2, selector=selector)
    q, k, q_offset, kv_offset, k_seg = _inputs(case)
    v = torch.randn(k.shape[:3] + (k.shape[3],), dtype=torch.float64)
    q, k = q.double().requires_grad_(), k.double().requires_grad_()
    v.requires_grad_()
    mask = None if k_seg is None else k_seg >= 0
    tiles = select_tiles(q.detach(), k.detach(), pattern, q_offset, kv_offset, k_seg)
    expected = _expected_mask(pattern, tiles, q.shape[2], k.shape[2], q_offset, kv_offset, k.shape[1], mask)
    out = sparse_attention(q, k, v, pattern, q_offset=q_offset, kv_offset=kv_offset, attention_mask=mask,
                           backend="reference")
    ref = dense_masked_attention(q, k, v, expected, q.shape[-1] ** -0.5)
    rows = expected.any(-1).repeat_interleave(q.shape[1] // k.shape[1], 1)  # rows with a key (padding rows: zeros)
    torch.testing.assert_close(out[rows], ref[rows], rtol=1e-9, atol=1e-9)
    grad = torch.randn_like(out) * rows.unsqueeze(-1)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8)
    if selector != "meanpool" and k_seg is None and q.shape[2] > 64:  # the selection changed what is attended
        assert tiles.ge(0).any()


def test_learned_selector_cannot_select_inside_the_op():
    q, k = torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    pattern = SparsePattern(block_size=64, window=64, topk_blocks=1, selector="learned")
    with pytest.raises(ValueError, match="trained scorer"):
        sparse_attention(q, k, k, pattern)
    with pytest.raises(ValueError, match="topk_blocks"):
        select_mass(q, k, SparsePattern(window=64), 0, 0, None)
    with pytest.raises(ValueError, match="backend"):
        select_mass(q, k, pattern, 0, 0, None, backend="cuda")


def test_selection_reads_nothing_on_the_host(monkeypatch):
    """No .item() / .tolist() / bool(tensor) in selection: it must run inside CUDA graphs and torch.compile."""
    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in selection")

    q, k, q_offset, kv_offset, k_seg = _inputs(CASES[3])
    for name in ("item", "tolist", "__bool__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for selector in ("mass", "meanpool", "oracle", "probe", "moment"):
        for threshold in (None, 0.7):
            if threshold is not None and selector == "meanpool":
                continue
            pattern = SparsePattern(block_size=64, sink_tokens=64, window=64, topk_blocks=3, selector=selector,
                                    mass_threshold=threshold)
            select_tiles(q, k, pattern, q_offset, kv_offset, k_seg)


def test_model_forward_with_selection():
    """A tiny Llama through attn_implementation="sparsek": with a budget that selects every competing tile the
    logits equal SDPA's; with a small budget they follow the selection (finite, and not the dense logits)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = torch.randint(1, 97, (2, 300))
    mask = torch.ones_like(ids)
    mask[1, :21] = 0
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        hf_sparsek.set_pattern(model, SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=5))
        with hf_sparsek.settings(backend="reference"):
            every = model(ids, attention_mask=mask).logits
        hf_sparsek.set_pattern(model, SparsePattern(block_size=64, window=64, topk_blocks=1))
        with hf_sparsek.settings(backend="reference"):
            small = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(every[real], dense[real], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(small[real]).all()
    assert (small[real] - dense[real]).abs().max() > 1e-3


def test_index_of_a_mass_pattern_lists_the_selected_tiles():
    """build_index_for with a top-k pattern adds exactly the selected tiles to the static part."""
    q, k, q_offset, kv_offset, k_seg = _inputs(CASES[0])
    pattern = PATTERNS["sink64-win64-top3"]
    tiles = select_tiles(q, k, pattern, q_offset, kv_offset, k_seg)
    index = build_index_for(q, k, pattern)
    with_tiles = build_index_for(q, k, pattern, selected_tiles=tiles)
    assert torch.equal(index.token_mask(), with_tiles.token_mask())


# --- few query tiles (decode): the split path over key tiles (two launches and torch.topk) -------------------------

SHORT_CASES = [
    (1, 8, 1, 1, 233, 64, None, 0, False),  # MQA decode
    (2, 4, 2, 1, 700, 64, None, 0, True),  # decode, left padding
    (2, 6, 2, 4, 650, 128, 638, 0, True),  # q_len 4 across a tile boundary: two query tiles
    (1, 4, 4, 3, 500, 64, None, 77, False),  # keys from offset 77
]


@pytest.mark.parametrize("case", SHORT_CASES, ids=[_case_id(c) for c in SHORT_CASES])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_triton_short_query_path_matches_definition(name, case, interpret, monkeypatch):
    import hf_sparsek.kernels.selection as kernel

    monkeypatch.setattr(kernel, "SHORT_MIN_KEY_TILES", 1)  # small caches take the split path too
    called = []
    short = kernel._select_short
    monkeypatch.setattr(kernel, "_select_short", lambda *a, **kw: called.append(1) or short(*a, **kw))
    pattern = PATTERNS[name]
    q, k, q_offset, kv_offset, k_seg = _inputs(case, seed=21)
    want = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="torch")
    got = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="triton")
    assert called and got.shape == want.shape and got.dtype == want.dtype
    if not torch.equal(got, want):
        _check_same_selection(got, _slow_mass_selection(q, k, pattern, q_offset, kv_offset, k_seg), tol=1e-5)


def test_triton_short_query_path_long_cache(interpret):
    """A decode step over 300 key tiles takes the split path at its shipped threshold; the store's kept features
    give the same tiles as pooling every key."""
    import hf_sparsek.kernels.selection as kernel

    from hf_sparsek.selection import SelectionState

    pattern = SparsePattern(block_size=64, sink_tokens=64, window=256, topk_blocks=12)
    q, k, q_offset, kv_offset, k_seg = _inputs((2, 4, 2, 1, 300 * 64 - 5, 64, None, 0, True), seed=22)
    assert k.shape[2] // 64 >= kernel.SHORT_MIN_KEY_TILES
    want = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="torch")
    got = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="triton")
    state = SelectionState()
    stored = select_mass(q, k, pattern, q_offset, kv_offset, k_seg, backend="triton", selection_state=state)
    for tiles in (got, stored):
        if not torch.equal(tiles, want):
            _check_same_selection(tiles, _slow_mass_selection(q, k, pattern, q_offset, kv_offset, k_seg), tol=1e-5)
