"""Forward block-sparse flash attention for Hopper in Gluon: warp-specialised, explicit asynchronous wgmma, TMA ring.

Same contract and math as ``attention_fwd._attn_fwd_kernel`` (O and the log2-domain LSE, ``-inf`` for rows that
attend nothing) for the common case: 16-bit inputs, head dim 64 or 128, index blocks of 128 rows, query length >= 16,
no soft-capping and no per-batch segment / rank tensors (left-padded batches, packed sequences).
``kernels/dispatch.py`` decides which calls it takes; the Triton kernel runs every other case (same results, slower).

Why a second forward: in the Triton kernel the warps that issue the MMAs also do all the softmax work, and Triton's
pipeliner waits for each ``Q.K^T`` before the softmax that follows it, so the tensor cores idle while a warpgroup
computes exponentials (docs/kernel-decisions.md). Here the schedule is written out, FlashAttention-3 style:

- a persistent grid, one program per SM, walks the work items (a 128-row query tile of one query head; longest
  rows first, in snake rounds). A program has three partitions: a 1-warp loader that streams each item's Q and its
  listed K/V tiles by TMA into shared-memory slots (``mbarrier`` per slot, "full" and "free"; Q's slot is freed
  after the item's last scores, so the next item loads during this one's epilogue), and two 4-warp consumer
  warpgroups of 64 query rows each, which run unsynchronised with each other (so
  one's softmax overlaps the other's MMAs) and free a slot by arriving on its barrier (no CTA-wide barrier);
- inside a consumer, the scores of tile j are issued asynchronously together with ``P_{j-1} V_{j-1}``; it waits
  only for the scores, runs the softmax of tile j while ``P V`` is still in flight, then waits and rescales. ptxas
  moves the wait for ``P V`` above the softmax unless the softmax sits in a basic block of its own, which it does on
  the sparse rows at head dim 128 (``_SOFTMAX_OWN_BLOCK``).

A single-partition version of the same loop (8 warps, a CTA barrier per step) was no faster than Triton
(docs/kernel-decisions.md): the overlap between the two warpgroups is what pays. Gluon has no CPU
interpreter: CI compiles these kernels for sm_90 and checks their machine code; scripts/gpu_gluon_fwd.py and
scripts/gpu_kernels.py check them against the reference on the GPU.
"""

from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernel runs every case.
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

    # Triton 3.9 renamed the TMA copy (3.6, the H100 image's version, has only the old name)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # The sparse rows' loop (2-slot ring) at head dim 128 runs its softmax in a basic block of its own, so that ptxas
    # keeps the wait for P.V after it and the softmax overlaps this warpgroup's own P.V (faster on the H100 with
    # Triton 3.6; at head dim 64 it was slower, so there the plain loop stays). There the partial tiles' mask is also
    # taken as row-wise column intervals (a shorter steady loop, faster on the same rows). Triton 3.9 compiles the
    # block with spilled words reloaded per tile (sm_90, CPU), unmeasured on a GPU, so newer Tritons keep the plain
    # loop too. Measurements: docs/kernel-decisions.md.
    _SOFTMAX_OWN_BLOCK = gl.constexpr(tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7))
    # The bottom consumer warpgroup starts once the top one has its first tile's probabilities, so their item
    # boundaries (the first scores waited for alone, the last P.V, the epilogue) fall at different times and the
    # other warpgroup's MMAs fill them; a persistent program pays the offset once (a grid of one item per program,
    # n_work <= SMs, pays it per item: about one softmax). Kept: faster on the 64K sparse rows, neutral on dense rows
    # and at 16K (docs/kernel-decisions.md).
    _STAGGER = gl.constexpr(True)
    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    AVAILABLE = False

from .common import index_strides, score_constants, sm_count
from .tma import ensure_allocator

# What the kernel takes (kernels/dispatch.py holds the whole rule: dtype, soft-capping, segments, device, release).
HEAD_DIMS = (64, 128)
BLOCK = 128
MIN_Q_LEN = 16
LONG_ROW_TILES = 96  # rows listing at least this many tiles are "long" (dense-like): 3-slot ring, see slots_for
SHARED_MEMORY_BYTES = 227 * 1024 - 1024  # sm_90's per-block limit, less room for the barriers


if AVAILABLE:

    @gluon.jit
    def _tile_start(FT, PT, irow, f_width, p_width, f_cnt, it, kb0, kv_offset,
                    BLOCK: gl.constexpr, BLOCK_N: gl.constexpr):
        """Tile ``it`` of this query tile's list (full entries first): first key row (storage), partial, top-k."""
        n_sub: gl.constexpr = BLOCK // BLOCK_N
        e = it // n_sub
        if e < f_cnt:
            raw = gl.load(FT + irow * f_width + e)
        else:
            raw = gl.load(PT + irow * p_width + (e - f_cnt))
        selected = raw < 0
        n = gl.where(selected, -raw - 1, raw)
        t0 = (kb0 + n) * BLOCK + (it % n_sub) * BLOCK_N - kv_offset
        return t0, e >= f_cnt, selected

    @gluon.jit
    def _partial_entry(PT, irow, p_width, f_cnt, it, kb0, kv_offset, BLOCK: gl.constexpr, BLOCK_N: gl.constexpr):
        """First key row (storage) and top-k flag of tile ``it`` when it is a partial entry (the Gluon backward's
        consumers read the list only for those). The forward's consumers read it through ``_tile_start``: the
        partial-only form compiles to the same main loops there (Triton 3.6 already sinks the full-tile loads into
        the mask branch), so it was not kept (docs/kernel-decisions.md)."""
        n_sub: gl.constexpr = BLOCK // BLOCK_N
        raw = gl.load(PT + irow * p_width + (it // n_sub - f_cnt))
        selected = raw < 0
        n = gl.where(selected, -raw - 1, raw)
        return (kb0 + n) * BLOCK + (it % n_sub) * BLOCK_N - kv_offset, selected

    @gluon.jit
    def _keep(qa, ka, k_in, selected, sink, window):
        """Token-exact element mask of a partial tile (the Triton kernels' element_mask without segments / ranks):
        ``qa``, ``ka`` absolute positions broadcast against each other, ``k_in`` the key inside the sequence; the
        Gluon backward uses it too."""
        token = ((sink > 0) & (ka < sink)) | ((window > 0) & ((qa - ka) < window))
        return (ka <= qa) & k_in & (token | selected)

    @gluon.jit
    def _query_row_bounds(q_abs, t0, kv_offset, kv_len, sink, window, selected):
        """The token-exact mask of query rows ``q_abs`` (absolute) against the key tile from storage row ``t0`` as two
        column intervals per row: [lo, hi) (the window, or every causal key of a top-k tile) and [lo0, sink_hi)
        (the sink keys; empty past them): a few integer operations per row and one unsigned compare per element,
        where the element-wise form takes about 11 instructions per element."""
        k_base = t0 + kv_offset  # absolute position of column 0
        lo0 = -t0  # storage row 0
        hi = gl.minimum(q_abs - k_base + 1, kv_len - t0)  # causal; the end of the sequence
        windowed = (window > 0) & ~selected
        lo = gl.where(selected, lo0, gl.where(windowed, gl.maximum(q_abs - window + 1 - k_base, lo0), hi))
        sink_hi = gl.where(selected, lo0, gl.minimum(hi, sink - k_base))  # sink keys: causal ones only
        return lo, hi, lo0, sink_hi

    @gluon.jit
    def _in_interval(lo, hi, N: gl.constexpr, layout: gl.constexpr):
        """[rows, N] booleans: column in [lo, hi) of its row (empty when hi <= lo): (col - lo) mod 2**32 < hi - lo."""
        cols = gl.arange(0, N, layout=gl.SliceLayout(0, layout))[None, :]
        width = gl.maximum(hi - lo, 0).to(gl.uint32, bitcast=True)
        return (cols - lo[:, None]).to(gl.uint32, bitcast=True) < width[:, None]

    @gluon.jit
    def _softmax_step(s, m_i, l_i, qk_mul, part, selected, t0, q_abs, kv_offset, kv_len, sink, window,
                      BLOCK_N: gl.constexpr, s_layout: gl.constexpr, INTERVALS: gl.constexpr = False):
        """Online-softmax update for one tile of raw scores: (P, new max, new sum, rescale factor). ``INTERVALS``:
        the partial tile's mask as row-wise column intervals (same mask, fewer instructions)."""
        if part and INTERVALS:
            lo, hi, lo0, sink_hi = _query_row_bounds(q_abs, t0, kv_offset, kv_len, sink, window, selected)
            keep = (_in_interval(lo, hi, BLOCK_N, s_layout)
                    | _in_interval(gl.zeros_like(lo) + lo0, sink_hi, BLOCK_N, s_layout))
            s = gl.where(keep, s, float("-inf"))
        elif part:  # element-wise
            k_t = t0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            keep = _keep(q_abs[:, None], (k_t + kv_offset)[None, :], ((k_t >= 0) & (k_t < kv_len))[None, :], selected,
                         sink, window)
            s = gl.where(keep, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_mul)  # qk_mul > 0: max before scaling
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s * qk_mul - m_safe[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _stream_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, k_free, v_free, FT, PT, irow, f_width,
                         p_width, f_cnt, n_tiles, base, kb0, kv_offset, b32, hkv32, BLOCK: gl.constexpr,
                         BLOCK_N: gl.constexpr):
        """The loaders' K/V stream (forward and dQ): the ``n_tiles`` listed tiles of one work item into the ring,
        ring uses ``base`` on, each K and V as soon as both consumers freed its slot."""
        STAGES: gl.constexpr = k_smem.shape[0]
        for j in range(n_tiles):
            c = base + j
            slot = c % STAGES
            t0 = _tile_start(FT, PT, irow, f_width, p_width, f_cnt, j, kb0, kv_offset, BLOCK, BLOCK_N)[0]
            free_phase = ((c // STAGES) + 1) & 1  # the slot's previous use ended (first round: no wait)
            mbarrier.wait(k_free.index(slot), free_phase, pred=c >= STAGES)
            mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, [b32, hkv32, t0, 0], k_bar.index(slot), k_smem.index(slot))
            mbarrier.wait(v_free.index(slot), free_phase, pred=c >= STAGES)
            mbarrier.expect(v_bar.index(slot), v_desc.block_type.nbytes)
            _tma_load(v_desc, [b32, hkv32, t0, 0], v_bar.index(slot), v_smem.index(slot))

    @gluon.jit
    def _ws_loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free,
                   FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, q_offset, kv_offset, n_q_tiles, n_work):
        """One warp: per work item (query tile, head), Q once it is free, then the K and V tiles into the ring as
        soon as both consumers freed the slot; the ring's slot counter runs on across work items."""
        BLOCK: gl.constexpr = q_smem.shape[3]  # worker partitions take no constexpr arguments (Triton 3.6)
        Q_SLOTS: gl.constexpr = q_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[3]
        kb0 = kv_offset // BLOCK
        base = 0  # ring uses before this work item
        i = 0  # work items done by this program
        for k in range(_items_of_program(n_work)):
            w = _item(k)
            b, hkv, hq, q_first, t_first, irow, f_cnt, n_tiles = _query_tile(
                w, n_work, FC, PC, s_ib, s_ih, Hkv, G, q_offset, n_q_tiles, BLOCK, BLOCK_N)
            b32 = b.to(gl.int32)
            q_slot = i % Q_SLOTS  # both consumers issued their last Q.K^T on the slot's previous item
            mbarrier.wait(q_free.index(q_slot), ((i // Q_SLOTS) + 1) & 1, pred=i >= Q_SLOTS)
            mbarrier.expect(q_bar.index(q_slot), q_desc.block_type.nbytes)
            _tma_load(q_desc, [b32, hq.to(gl.int32), t_first, 0], q_bar.index(q_slot), q_smem.index(q_slot))
            _stream_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, k_free, v_free, FT, PT, irow, f_width,
                             p_width, f_cnt, n_tiles, base, kb0, kv_offset, b32, hkv.to(gl.int32), BLOCK, BLOCK_N)
            base += n_tiles
            i += 1

    @gluon.jit
    def _ws_consumer(q_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, stagger,
                     Out, LSE, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                     s_ob, s_oh, s_ot, s_lb, s_lh, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul,
                     ROW0: gl.constexpr):
        """One warpgroup: 64 query rows (from ROW0) of each work item's tile. Scores of tile j go out with P.V of
        tile j-1; the softmax of j runs while P.V is in flight; each slot is freed (mbarrier arrive) as soon as its
        MMA is done, and Q once the last scores are in, so the loader fetches the next item during this epilogue."""
        ROWS: gl.constexpr = 64
        BLOCK: gl.constexpr = q_smem.shape[3]
        Q_SLOTS: gl.constexpr = q_smem.shape[0]
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[3]
        HEAD_DIM: gl.constexpr = k_smem.shape[4]
        dtype: gl.constexpr = q_smem.dtype
        SOFTMAX_BLOCK: gl.constexpr = _SOFTMAX_OWN_BLOCK and STAGES == 2 and HEAD_DIM == 128
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        kb0 = kv_offset // BLOCK
        base = 0  # ring uses before this work item (the loader counts the same way)
        i = 0
        if _STAGGER and ROW0 > 0:
            mbarrier.wait(stagger.index(0), 0)  # the top warpgroup has its first probabilities
        for k in range(_items_of_program(n_work)):
            w = _item(k)
            b, hkv, hq, q_first, t_first, irow, f_cnt, n_tiles = _query_tile(
                w, n_work, FC, PC, s_ib, s_ih, Hkv, G, q_offset, n_q_tiles, BLOCK, BLOCK_N)
            q_abs = q_first + ROW0 + gl.arange(0, ROWS, layout=row_s)
            m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
            l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
            acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
            q_slot = i % Q_SLOTS
            q_rows = _ring_tile(q_smem, q_slot).slice(ROW0, ROWS)
            mbarrier.wait(q_bar.index(q_slot), (i // Q_SLOTS) & 1)
            if n_tiles > 0:
                slot = base % STAGES
                mbarrier.wait(k_bar.index(slot), (base // STAGES) & 1)
                s = warpgroup_mma(q_rows, _ring_tile(k_smem, slot).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
                s = warpgroup_mma_wait(0, deps=(s, ))
                mbarrier.arrive(k_free.index(slot))
                t0, part, selected = _tile_start(FT, PT, irow, f_width, p_width, f_cnt, 0, kb0, kv_offset, BLOCK,
                                                 BLOCK_N)
                p32, m_i, l_i, alpha0 = _softmax_step(s, m_i, l_i, qk_mul, part, selected, t0, q_abs, kv_offset,
                                                      kv_len, sink, window, BLOCK_N, s_layout, SOFTMAX_BLOCK)
                p = gl.convert_layout(p32.to(dtype), p_layout)
                if _STAGGER and ROW0 == 0:
                    mbarrier.arrive(stagger.index(0), pred=i == 0)
                for j in range(1, n_tiles):
                    c = base + j
                    slot = c % STAGES
                    prev = (c - 1) % STAGES
                    mbarrier.wait(k_bar.index(slot), (c // STAGES) & 1)
                    s = warpgroup_mma(q_rows, _ring_tile(k_smem, slot).permute((1, 0)), s_zero, use_acc=False,
                                      is_async=True)
                    mbarrier.wait(v_bar.index(prev), ((c - 1) // STAGES) & 1)
                    acc = warpgroup_mma(p, _ring_tile(v_smem, prev), acc, is_async=True)
                    s = warpgroup_mma_wait(1, deps=(s, ))
                    mbarrier.arrive(k_free.index(slot))
                    t0, part, selected = _tile_start(FT, PT, irow, f_width, p_width, f_cnt, j, kb0, kv_offset,
                                                     BLOCK, BLOCK_N)
                    if SOFTMAX_BLOCK:
                        # the softmax in a basic block of its own (the condition always holds): ptxas schedules
                        # within a block, and in one shared with the P.V wait below it hoists that wait above the
                        # exponentials (the new P's packs reuse the registers of the P in flight), so the softmax
                        # would not overlap this warpgroup's own P.V (docs/kernel-decisions.md)
                        p32 = s
                        alpha = m_i
                        if c >= 0:
                            p32, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_mul, part, selected, t0, q_abs,
                                                                 kv_offset, kv_len, sink, window, BLOCK_N, s_layout,
                                                                 SOFTMAX_BLOCK)
                    else:
                        p32, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_mul, part, selected, t0, q_abs,
                                                             kv_offset, kv_len, sink, window, BLOCK_N, s_layout)
                    p = gl.convert_layout(p32.to(dtype), p_layout)
                    acc = warpgroup_mma_wait(0, deps=(acc, ))
                    mbarrier.arrive(v_free.index(prev))
                    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                mbarrier.arrive(q_free.index(q_slot))  # every Q.K^T of this item is done: the slot may refill
                last = (base + n_tiles - 1) % STAGES
                mbarrier.wait(v_bar.index(last), ((base + n_tiles - 1) // STAGES) & 1)
                acc = warpgroup_mma(p, _ring_tile(v_smem, last), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                mbarrier.arrive(v_free.index(last))
            else:
                mbarrier.arrive(q_free.index(q_slot))
                if _STAGGER and ROW0 == 0:
                    mbarrier.arrive(stagger.index(0), pred=i == 0)
            empty = l_i == 0.0
            l_safe = gl.where(empty, 1.0, l_i)
            lse = gl.where(empty, float("-inf"), m_i + gl.log2(l_safe))
            rows_s = t_first + ROW0 + gl.arange(0, ROWS, layout=row_s)
            gl.store(LSE + b * s_lb + hq * s_lh + rows_s, lse, mask=(rows_s >= 0) & (rows_s < q_len))
            out = acc / gl.convert_layout(l_safe, row_o)[:, None]
            rows_o = t_first + ROW0 + gl.arange(0, ROWS, layout=row_o)
            cols_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
            ok = (rows_o >= 0) & (rows_o < q_len)
            gl.store(Out + b * s_ob + hq * s_oh + rows_o[:, None] * s_ot + cols_o[None, :], out.to(dtype),
                     mask=ok[:, None])
            base += n_tiles
            i += 1

    @gluon.jit
    def _ws_consumer_top(q_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, stagger,
                         Out, LSE, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                         s_ob, s_oh, s_ot, s_lb, s_lh, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul):
        _ws_consumer(q_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, stagger,
                     Out, LSE, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                     s_ob, s_oh, s_ot, s_lb, s_lh, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul, 0)

    @gluon.jit
    def _ws_consumer_bottom(q_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, stagger,
                            Out, LSE, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                            s_ob, s_oh, s_ot, s_lb, s_lh, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul):
        _ws_consumer(q_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, stagger,
                     Out, LSE, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                     s_ob, s_oh, s_ot, s_lb, s_lh, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul, 64)

    @gluon.jit
    def _ring_tile(ring, slot):
        """Slot ``slot`` of a ring of [1, 1, rows, head dim] TMA boxes, as the 2-D [rows, head dim] MMA operand."""
        return ring.index(slot).reshape([ring.shape[3], ring.shape[4]])

    @gluon.jit
    def _items_of_program(n_work):
        """Work items this program walks: rounds of one item per program, forth in even rounds and back in odd ones
        (items come longest first, so the snake order evens the programs' loads)."""
        grid = gl.num_programs(0)
        rounds = n_work // grid
        left = n_work % grid  # items of the last, partial round
        last = gl.program_id(0) + (rounds % 2) * (grid - 1 - 2 * gl.program_id(0))
        return rounds + (last < left).to(gl.int32)

    @gluon.jit
    def _item(k):
        """Round ``k``'s work item of this program (the snake order of ``_items_of_program``)."""
        p = gl.program_id(0)
        grid = gl.num_programs(0)
        return k * grid + p + (k % 2) * (grid - 1 - 2 * p)

    @gluon.jit
    def _query_tile(w, n_work, FC, PC, s_ib, s_ih, Hkv, G, q_offset, n_q_tiles, BLOCK: gl.constexpr,
                    BLOCK_N: gl.constexpr):
        """Work item ``w`` -> (batch, KV head, query head, first absolute / storage row of its query tile, index
        row, full entries, BLOCK_N-key steps). Items go by query tile, last (longest causal rows) first, then by
        (batch, KV head), the heads of a KV group side by side: with a grid of one program per SM the longest rows
        of every head start first; grouping by (batch, KV head) first left a persistent grid 1.8x out of balance
        on dense causal rows at 4K (docs/kernel-decisions.md)."""
        per_rank = n_work // n_q_tiles
        rest = w % per_rank
        return _query_tile_of((w // per_rank) * G + rest % G, rest // G, FC, PC, s_ib, s_ih, Hkv, G, q_offset,
                              n_q_tiles, BLOCK, BLOCK_N)

    @gluon.jit
    def _query_tile_of(pid, bh, FC, PC, s_ib, s_ih, Hkv, G, q_offset, n_q_tiles, BLOCK: gl.constexpr,
                       BLOCK_N: gl.constexpr):
        b = (bh // Hkv).to(gl.int64)  # 64-bit bases: B*H*L*D exceeds 2**31 at 1M tokens
        hkv = (bh % Hkv).to(gl.int64)
        m = n_q_tiles - 1 - pid // G
        hq = hkv * G + pid % G
        q_first = (q_offset // BLOCK + m) * BLOCK
        irow = b * s_ib + hkv * s_ih + m
        f_cnt = gl.load(FC + irow)
        n_tiles = (f_cnt + gl.load(PC + irow)) * (BLOCK // BLOCK_N)
        return b, hkv, hq, q_first, q_first - q_offset, irow, f_cnt, n_tiles

    @gluon.jit
    def _slot_barriers(SLOTS: gl.constexpr):
        """"Full" (count 1: the loader's expect + TMA transaction) and "free" (count 2: one arrival per consumer
        warpgroup) mbarriers for ``SLOTS`` slots of one tensor, initialised (the query slots of forward and dQ)."""
        full = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
        for slot in gl.static_range(SLOTS):
            mbarrier.init(full.index(slot), count=1)
            mbarrier.init(free.index(slot), count=2)
        return full, free

    @gluon.jit
    def _rows_descriptor(ptr, n_batch, n_heads, n_rows, s_b, s_h, s_t, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
                         layout: gl.constexpr):
        """A TMA descriptor over a (batch, head, row, dim) tensor with [1, 1, ROWS, HEAD_DIM] boxes: one serves
        every work item of a persistent program."""
        return tma.make_tensor_descriptor(ptr, shape=[n_batch, n_heads, n_rows, HEAD_DIM], strides=[s_b, s_h, s_t, 1],
                                          block_shape=[1, 1, ROWS, HEAD_DIM], layout=layout)

    @gluon.jit
    def _ring_barriers(STAGES: gl.constexpr):
        """The mbarriers of a ring of slots holding two tensors (a, b): per slot "full" (count 1: the loader's
        expect + TMA transaction) and "free" (count 2: one arrival per consumer warpgroup), initialised."""
        full_a = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        full_b = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free_a = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free_b = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(full_a.index(i), count=1)
            mbarrier.init(full_b.index(i), count=1)
            mbarrier.init(free_a.index(i), count=2)
            mbarrier.init(free_b.index(i), count=2)
        return full_a, full_b, free_a, free_b

    @gluon.jit
    def _attn_fwd_ws_kernel(
        Q, K, V, Out, LSE, FC, FT, PC, PT,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_lb, s_lh,
        s_ib, s_ih, f_width, p_width,
        B, Hkv, G, q_len, kv_len, q_offset, kv_offset, n_q_tiles, sink, window, qk_mul,
        BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
        Q_SLOTS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Warp-specialised forward: a 1-warp TMA loader and two 4-warp consumers (64 query rows each) that run
        unsynchronised with each other (FlashAttention-3's producer/consumer split; no CTA-wide barrier in the
        loop). Program p takes work items p, p + grid, ... (one per program when the grid covers them all; a
        persistent grid of one program per SM overlaps each item's epilogue with the next item's loads). Same work
        order (last query tiles first, the heads of a KV group side by side) and results as the Triton forward's
        ``_attn_fwd_kernel``."""
        dtype: gl.constexpr = Q.dtype.element_ty
        layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
        q_desc = _rows_descriptor(Q, B, Hkv * G, q_len, s_qb, s_qh, s_qt, BLOCK, HEAD_DIM, layout)
        k_desc = _rows_descriptor(K, B, Hkv, kv_len, s_kb, s_kh, s_kt, BLOCK_N, HEAD_DIM, layout)
        v_desc = _rows_descriptor(V, B, Hkv, kv_len, s_vb, s_vh, s_vt, BLOCK_N, HEAD_DIM, layout)
        q_smem = gl.allocate_shared_memory(dtype, [Q_SLOTS, 1, 1, BLOCK, HEAD_DIM], layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], layout)
        q_bar, q_free = _slot_barriers(Q_SLOTS)
        k_bar, v_bar, k_free, v_free = _ring_barriers(STAGES)
        stagger = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        mbarrier.init(stagger.index(0), count=1)
        n_work = B * Hkv * G * n_q_tiles
        consumer_args = (q_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, stagger,
                         Out, LSE, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                         s_ob, s_oh, s_ot, s_lb, s_lh, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul)
        gl.warp_specialize(
            [(_ws_consumer_top, consumer_args), (_ws_consumer_bottom, consumer_args),
             (_ws_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free,
                           v_free, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, q_offset, kv_offset,
                           n_q_tiles, n_work))],
            [4, 1], [240, 24])


def slots_for(dim: int, block: int, row_tiles: int, stages: int | None = None,
              q_slots: int | None = None) -> tuple[int, int]:
    """(K/V ring depth, query slots) the forward launches with for rows listing up to ``row_tiles`` tiles: given
    values, else 3 slots for long rows (2 otherwise; each the faster of the two on its rows) and 2 query slots where
    shared memory holds them (the loader then fetches the next item's Q while this one runs). Raises ValueError for
    a combination that does not fit."""
    stages = stages or (3 if row_tiles >= LONG_ROW_TILES else 2)
    if stages not in (2, 3):
        raise ValueError(f"Gluon forward ring depth {stages}: 2 or 3 (shared memory holds at most 3)")
    q_slots = q_slots or (2 if _shared_bytes(stages, 2, block, dim) <= SHARED_MEMORY_BYTES else 1)
    if q_slots not in (1, 2) or _shared_bytes(stages, q_slots, block, dim) > SHARED_MEMORY_BYTES:
        raise ValueError(f"Gluon forward with {q_slots} query slots and a {stages}-slot ring at head dim {dim}: "
                         f"{_shared_bytes(stages, q_slots, block, dim)} bytes of shared memory, more than "
                         f"{SHARED_MEMORY_BYTES} (query slots: 1 or 2)")
    return stages, q_slots


def _shared_bytes(stages: int, q_slots: int, block: int, dim: int) -> int:
    """Shared memory of the forward's tiles: ``stages`` K/V slot pairs (128 keys), ``q_slots`` query tiles (16-bit)."""
    return (stages * 2 * 128 + q_slots * block) * dim * 2


def attention_forward_gluon(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    full_count: torch.Tensor, full_tiles: torch.Tensor, part_count: torch.Tensor, part_tiles: torch.Tensor,
    block: int, q_offset: int, kv_offset: int, sink: int, window: int, scale: float,
    *, stages: int | None, q_slots: int | None, persistent: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Gluon forward for inputs ``kernels/dispatch.py`` gave it. ``stages`` / ``q_slots``: see
    :func:`slots_for` (None: automatic); ``persistent``: one program per SM walks the work items (else one program
    per item). Returns O and the log2-domain LSE."""
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    n_q = full_count.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(batch, hq, q_len, device=q.device, dtype=torch.float32)
    qk_mul, _ = score_constants(scale, 0.0)  # no soft-capping on this path
    s_ib, s_ih = index_strides(full_count)
    ensure_allocator()
    stages, q_slots = slots_for(dim, block, full_tiles.shape[-1] + part_tiles.shape[-1], stages, q_slots)
    n_work = batch * hkv * group * n_q
    grid = (min(n_work, sm_count(q.device)) if persistent else n_work,)  # one 3-warpgroup program per SM
    _attn_fwd_ws_kernel[grid](
        q, k, v, out, lse, full_count, full_tiles, part_count, part_tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), s_ib, s_ih, full_tiles.shape[-1], part_tiles.shape[-1],
        batch, hkv, group, q_len, kv_len, q_offset, kv_offset, n_q, sink, window, qk_mul,
        BLOCK=block, BLOCK_N=128, HEAD_DIM=dim, STAGES=stages, Q_SLOTS=q_slots,
        num_warps=4,  # the default partition is the first consumer warpgroup
    )
    return out, lse


__all__ = ["AVAILABLE", "HEAD_DIMS", "attention_forward_gluon", "slots_for"]
