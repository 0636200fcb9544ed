"""The backward of block-sparse flash attention for Hopper in Gluon: dK/dV and dQ kernels, warp-specialised, with
explicit asynchronous wgmma and TMA rings.

Same contracts and math as ``attention_bwd._attn_bwd_dkdv_kernel`` (key-major, deterministic, the transposed index
and its split "virtual rows") and ``_attn_bwd_dq_kernel`` (query-major over the forward lists) for the common case:
16-bit inputs, head dim 64 or 128 (dQ: 128 by default), index blocks of 128 rows, no soft-capping, no per-batch
segment / rank tensors, a query offset that is a multiple of 4 (dK/dV), query length >= 16 (dQ), and large enough
grids (``KernelOptions.gluon_dkdv_min_programs``). ``kernels/dispatch.py`` decides which calls they take; the Triton
kernels run every other case (same results).

Why: in the Triton kernels the warps that issue the MMAs of a step also do the probability recompute, dS and the
conversions, and Triton waits for each MMA before the elementwise work that follows it (docs/kernel-decisions.md).
Here, as in the Gluon forward and FlashAttention-3's backward, each program has three partitions: a 1-warp TMA
loader and two 4-warp consumer warpgroups that run unsynchronised with each other (no CTA-wide barrier in the loop),
so one's elementwise work overlaps the other's MMAs.

- dK/dV: one program = one 128-key tile of one KV head (or one chunk of a long key tile's list). The loader loads K
  and V once, then streams the query rows, dO rows, LSE and delta of every listed (query tile, row block, query
  head) step into a ring of shared-memory slots; each consumer owns 64 keys (its dK and dV accumulators, 64 x head
  dim fp32 each, stay in registers). Per step it issues ``S^T = K Q^T`` and ``dP^T = V dO^T`` together, waits for
  the scores only, recomputes P while dP^T runs, issues ``dV += P^T dO``, computes dS while that runs, issues
  ``dK += dS^T Q`` and waits for both before freeing the slot (keeping their operands alive into the next step
  needed more than the 240 registers a consumer has: ptxas then serialised every wgmma).
- dQ: one work item = one 128-row query tile of one query head (the forward's order; on rows under the forward's
  LONG_ROW_TILES a persistent grid walks the items, else one program each); the loader loads its query and dO rows
  once and streams the listed K/V tiles in 64-key steps; step j issues ``S_j`` and ``dP_j`` together with
  ``dQ += dS_{j-1} K_{j-1}``, waits for the first two, and computes ``dS_j`` while that product runs.

Gluon has no CPU interpreter: CI compiles these kernels for sm_90 and checks their machine code;
scripts/gpu_gluon_bwd.py and scripts/gpu_kernels.py check them against the reference on the GPU.
"""

from __future__ import annotations

import torch

from .attention_fwd_gluon import (  # AVAILABLE: Gluon (Triton >= 3.5)
    AVAILABLE,
    LONG_ROW_TILES,
    SHARED_MEMORY_BYTES,
)
from .common import index_strides, score_constants, sm_count
from .tma import ensure_allocator

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from .attention_fwd_gluon import (
        _item,
        _items_of_program,
        _keep,
        _partial_entry,
        _query_tile,
        _ring_barriers,
        _ring_tile,
        _rows_descriptor,
        _slot_barriers,
        _stream_kv_tiles,
        _tma_load,
    )

# What the kernels take (kernels/dispatch.py holds the whole rule, with the options' grid floor and dQ head dims).
HEAD_DIMS = (64, 128)
BLOCK = 128
BLOCK_M = 64  # query rows per step (S^T is 64 keys x 64 queries per consumer: 32 fp32 registers a thread)
DQ_MIN_Q_LEN = 16  # shorter (decode) queries: the Triton dQ kernel packs the heads of a group instead


if AVAILABLE:

    @gluon.jit
    def _step_rows(FT, PT, irow, f_width, p_width, f_cnt, j, hkv, G, q_offset, BLOCK: gl.constexpr,
                   BLOCK_M: gl.constexpr):
        """Step ``j`` of a key tile's list (full entries first; per entry its row blocks x the group's heads):
        query head, first storage row, partial-entry flag, top-k flag."""
        per_entry = (BLOCK // BLOCK_M) * G
        e = j // per_entry
        rem = j % per_entry
        if e < f_cnt:
            raw = gl.load(FT + irow * f_width + e)
        else:
            raw = gl.load(PT + irow * p_width + (e - f_cnt))
        selected = raw < 0
        mt = gl.where(selected, -raw - 1, raw)
        hq = hkv * G + rem % G
        t_first = (q_offset // BLOCK + mt) * BLOCK + (rem // G) * BLOCK_M - q_offset
        return hq, t_first, e >= f_cnt, selected

    @gluon.jit
    def _ws_loader(k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, k_smem, v_smem, q_smem, do_smem,
                   lse_smem, delta_smem, kv_bar, q_bar, do_bar, q_free, do_free, FT, PT, irow, f_width, p_width,
                   f_cnt, n_steps, hkv, G, q_offset, t_k, lse_row0):
        """One warp: K and V of the key tile once, then each step's query rows with their LSE, and dO rows with
        their delta, as soon as both consumers freed the slot."""
        BLOCK: gl.constexpr = k_smem.shape[0]  # worker partitions take no constexpr arguments (Triton 3.6)
        STAGES: gl.constexpr = q_smem.shape[0]
        BLOCK_M: gl.constexpr = q_smem.shape[2]
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
        _tma_load(k_desc, [t_k, 0], kv_bar, k_smem)
        _tma_load(v_desc, [t_k, 0], kv_bar, v_smem)
        for j in range(n_steps):
            slot = j % STAGES
            hq, t_first, part, selected = _step_rows(FT, PT, irow, f_width, p_width, f_cnt, j, hkv, G, q_offset,
                                                     BLOCK, BLOCK_M)
            hq32 = hq.to(gl.int32)
            free_phase = ((j // STAGES) + 1) & 1  # the slot's previous use ended (first round: no wait)
            mbarrier.wait(q_free.index(slot), free_phase, pred=j >= STAGES)
            stat_row = (lse_row0 + hq).to(gl.int32)
            mbarrier.expect(q_bar.index(slot), q_desc.block_type.nbytes + lse_desc.block_type.nbytes)
            _tma_load(q_desc, [hq32, t_first, 0], q_bar.index(slot), q_smem.index(slot))
            _tma_load(lse_desc, [stat_row, t_first], q_bar.index(slot), lse_smem.index(slot))
            mbarrier.wait(do_free.index(slot), free_phase, pred=j >= STAGES)
            mbarrier.expect(do_bar.index(slot), do_desc.block_type.nbytes + delta_desc.block_type.nbytes)
            _tma_load(do_desc, [hq32, t_first, 0], do_bar.index(slot), do_smem.index(slot))
            _tma_load(delta_desc, [stat_row, t_first], do_bar.index(slot), delta_smem.index(slot))

    @gluon.jit
    def _ws_consumer(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_bar, do_bar, q_free, do_free,
                     DK, DV, SCR_K, SCR_V, FT, PT, irow, f_width, p_width, f_cnt, n_steps,
                     b, hkv, G, s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt, s_sb, s_sh, s_ss, slot_out,
                     q_len, kv_len, q_offset, kv_offset, k_first, sink, window, qk_mul, scale, ROW0: gl.constexpr):
        """One warpgroup: 64 keys (from ROW0) of the tile. Step j: S^T and dP^T issued together; wait for S^T only;
        P while dP^T runs; dV += P^T dO issued, dS computed while it runs; dK += dS^T Q; both waited for before the
        slot is freed."""
        ROWS: gl.constexpr = 64
        BLOCK: gl.constexpr = k_smem.shape[0]
        HEAD_DIM: gl.constexpr = k_smem.shape[1]
        STAGES: gl.constexpr = q_smem.shape[0]
        BLOCK_M: gl.constexpr = q_smem.shape[2]
        dtype: gl.constexpr = k_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_M, 16])
        a_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=a_layout, k_width=2)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        k_rows = k_smem.slice(ROW0, ROWS)
        v_rows = v_smem.slice(ROW0, ROWS)
        k_abs = k_first + ROW0 + gl.arange(0, ROWS, layout=row_s)
        k_t = k_abs - kv_offset
        k_in = (k_t >= 0) & (k_t < kv_len)
        cols = gl.arange(0, BLOCK_M, layout=col_s)
        s_zero = gl.zeros([ROWS, BLOCK_M], gl.float32, layout=s_layout)
        dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=a_layout)
        dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=a_layout)
        per_entry = (BLOCK // BLOCK_M) * G
        mbarrier.wait(kv_bar, 0)
        for j in range(n_steps):
            slot = j % STAGES
            phase = (j // STAGES) & 1
            q_rows = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
            do_rows = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
            mbarrier.wait(q_bar.index(slot), phase)
            s = warpgroup_mma(k_rows, q_rows.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(do_bar.index(slot), phase)
            dp = warpgroup_mma(v_rows, do_rows.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s, ))
            s = s * qk_mul
            if j // per_entry >= f_cnt:  # a partial entry: the element mask (the list is read only for those)
                hq, t_first, part, selected = _step_rows(FT, PT, irow, f_width, p_width, f_cnt, j, hkv, G, q_offset,
                                                         BLOCK, BLOCK_M)
                keep = _keep((t_first + q_offset + cols)[None, :], k_abs[:, None], k_in[:, None], selected, sink,
                             window)
                s = gl.where(keep, s, float("-inf"))
            # the row's LSE (the backward's copy: +inf for empty rows; rows outside the sequence read 0, and their
            # q and dO rows are 0 too, so they add nothing), broadcast over this warpgroup's keys
            p = gl.exp2(s - lse_smem.index(slot).load(s_layout))
            p_op = gl.convert_layout(p.to(dtype), op_layout)
            dv = warpgroup_mma(p_op, do_rows, dv, is_async=True)  # runs while dS is computed
            dp = warpgroup_mma_wait(1, deps=(dp, ))
            ds = p * (dp - delta_smem.index(slot).load(s_layout))
            ds_op = gl.convert_layout(ds.to(dtype), op_layout)
            dk = warpgroup_mma(ds_op, q_rows, dk, is_async=True)
            dk, dv = warpgroup_mma_wait(0, deps=(dk, dv, p_op, ds_op))[:2]
            mbarrier.arrive(q_free.index(slot))
            mbarrier.arrive(do_free.index(slot))
        dk = dk * scale
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, a_layout))
        d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, a_layout))
        k_t_a = k_first + ROW0 + rows - kv_offset
        if slot_out >= 0:  # a chunk of a split key tile: fp32 partial, summed by bwd_split.reduce_split
            base = b * s_sb + hkv * s_sh + slot_out * s_ss + (ROW0 + rows)[:, None] * HEAD_DIM + d[None, :]
            gl.store(SCR_K + base, dk)
            gl.store(SCR_V + base, dv)
        elif slot_out == -1:  # the tile's only program (-2: padding of the split lists, writes nothing)
            ok = ((k_t_a >= 0) & (k_t_a < kv_len))[:, None]
            gl.store(DK + b * s_dkb + hkv * s_dkh + k_t_a[:, None] * s_dkt + d[None, :], dk.to(dtype), mask=ok)
            gl.store(DV + b * s_dvb + hkv * s_dvh + k_t_a[:, None] * s_dvt + d[None, :], dv.to(dtype), mask=ok)

    @gluon.jit
    def _ws_consumer_top(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_bar, do_bar, q_free, do_free,
                         DK, DV, SCR_K, SCR_V, FT, PT, irow, f_width, p_width, f_cnt, n_steps,
                         b, hkv, G, s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt, s_sb, s_sh, s_ss, slot_out,
                         q_len, kv_len, q_offset, kv_offset, k_first, sink, window, qk_mul, scale):
        _ws_consumer(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_bar, do_bar, q_free, do_free,
                     DK, DV, SCR_K, SCR_V, FT, PT, irow, f_width, p_width, f_cnt, n_steps,
                     b, hkv, G, s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt, s_sb, s_sh, s_ss, slot_out,
                     q_len, kv_len, q_offset, kv_offset, k_first, sink, window, qk_mul, scale, 0)

    @gluon.jit
    def _ws_consumer_bottom(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_bar, do_bar, q_free,
                            do_free,
                            DK, DV, SCR_K, SCR_V, FT, PT, irow, f_width, p_width, f_cnt, n_steps,
                            b, hkv, G, s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt, s_sb, s_sh, s_ss, slot_out,
                            q_len, kv_len, q_offset, kv_offset, k_first, sink, window, qk_mul, scale):
        _ws_consumer(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_bar, do_bar, q_free, do_free,
                     DK, DV, SCR_K, SCR_V, FT, PT, irow, f_width, p_width, f_cnt, n_steps,
                     b, hkv, G, s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt, s_sb, s_sh, s_ss, slot_out,
                     q_len, kv_len, q_offset, kv_offset, k_first, sink, window, qk_mul, scale, 64)

    @gluon.jit
    def _attn_bwd_dkdv_ws_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, FC, FT, PC, PT, VT, VS, SCR_K, SCR_V, s_sb, s_sh, s_ss,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_lb, s_lh,
        s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt, s_ib, s_ih, f_width, p_width,
        Hkv, G, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul, scale,
        BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
        SPLIT: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Warp-specialised dK/dV: a 1-warp TMA loader and two 4-warp consumers (64 keys each). Same program order,
        lists and outputs (direct stores, or fp32 partials for split key tiles) as ``_attn_bwd_dkdv_kernel``."""
        dtype: gl.constexpr = Q.dtype.element_ty
        kv_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        row_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
        pid = gl.program_id(0)
        bh = gl.program_id(1)
        b = (bh // Hkv).to(gl.int64)  # 64-bit bases: B*H*L*D exceeds 2**31 at 1M tokens
        hkv = (bh % Hkv).to(gl.int64)
        irow = b * s_ib + hkv * s_ih + pid  # a key tile, or with SPLIT a chunk ("virtual row") of its list
        f_cnt = gl.load(FC + irow)
        if SPLIT:
            n = gl.load(VT + irow)
            slot_out = gl.load(VS + irow)  # -1: one chunk, store directly; >= 0: fp32 partial slot; -2: padding
        else:
            n = pid
            # -1 (f_cnt >= 0), computed at run time: a constant passed into the partitions crashed Triton 3.6's
            # lowering of warp_specialize
            slot_out = gl.minimum(f_cnt, 0) - 1
        k_first = (kv_offset // BLOCK + n) * BLOCK
        t_k = k_first - kv_offset
        n_steps = (f_cnt + gl.load(PC + irow)) * (BLOCK // BLOCK_M) * G
        k_desc = tma.make_tensor_descriptor(K + b * s_kb + hkv * s_kh, shape=[kv_len, HEAD_DIM], strides=[s_kt, 1],
                                            block_shape=[BLOCK, HEAD_DIM], layout=kv_layout)
        v_desc = tma.make_tensor_descriptor(V + b * s_vb + hkv * s_vh, shape=[kv_len, HEAD_DIM], strides=[s_vt, 1],
                                            block_shape=[BLOCK, HEAD_DIM], layout=kv_layout)
        q_desc = tma.make_tensor_descriptor(Q + b * s_qb, shape=[Hkv * G, q_len, HEAD_DIM], strides=[s_qh, s_qt, 1],
                                            block_shape=[1, BLOCK_M, HEAD_DIM], layout=row_layout)
        do_desc = tma.make_tensor_descriptor(DO + b * s_db, shape=[Hkv * G, q_len, HEAD_DIM],
                                             strides=[s_dh, s_dt, 1], block_shape=[1, BLOCK_M, HEAD_DIM],
                                             layout=row_layout)
        stat_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
        rows_total = gl.num_programs(1) // Hkv * Hkv * G  # batch x query heads: the statistics buffers' rows
        lse_desc = tma.make_tensor_descriptor(LSE, shape=[rows_total, q_len], strides=[s_lh, 1],
                                              block_shape=[1, BLOCK_M], layout=stat_layout)
        delta_desc = tma.make_tensor_descriptor(DELTA, shape=[rows_total, q_len], strides=[s_lh, 1],
                                                block_shape=[1, BLOCK_M], layout=stat_layout)
        k_smem = gl.allocate_shared_memory(dtype, [BLOCK, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK, HEAD_DIM], kv_layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_DIM], row_layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_DIM], row_layout)
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M], stat_layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BLOCK_M], stat_layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        q_bar, do_bar, q_free, do_free = _ring_barriers(STAGES)
        consumer_args = (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_bar, do_bar, q_free, do_free,
                         DK, DV, SCR_K, SCR_V, FT, PT, irow, f_width, p_width, f_cnt, n_steps,
                         b, hkv, G, s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt, s_sb, s_sh, s_ss, slot_out,
                         q_len, kv_len, q_offset, kv_offset, k_first, sink, window, qk_mul, scale)
        gl.warp_specialize(
            [(_ws_consumer_top, consumer_args), (_ws_consumer_bottom, consumer_args),
             (_ws_loader, (k_desc, v_desc, q_desc, do_desc, lse_desc, delta_desc, k_smem, v_smem, q_smem, do_smem,
                           lse_smem, delta_smem, kv_bar, q_bar, do_bar, q_free, do_free, FT, PT, irow, f_width,
                           p_width, f_cnt, n_steps, hkv, G, q_offset, t_k, b * Hkv * G))],
            [4, 1], [240, 24])

    @gluon.jit
    def _dq_ds(s, dp, lse, delta, q_abs, cols, FT, PT, irow, f_width, p_width, f_cnt, j, kb0, kv_offset, kv_len,
               sink, window, qk_mul, BLOCK: gl.constexpr, BLOCK_N: gl.constexpr):
        """dS of key tile ``j`` from raw scores and dP (query rows x keys); partial tiles get the element mask."""
        s = s * qk_mul
        if j // (BLOCK // BLOCK_N) >= f_cnt:  # a partial entry (the list is read only for those)
            t0, selected = _partial_entry(PT, irow, p_width, f_cnt, j, kb0, kv_offset, BLOCK, BLOCK_N)
            k_t = t0 + cols
            keep = _keep(q_abs[:, None], (k_t + kv_offset)[None, :], ((k_t >= 0) & (k_t < kv_len))[None, :],
                         selected, sink, window)
            s = gl.where(keep, s, float("-inf"))
        p = gl.exp2(s - lse[:, None])
        return p * (dp - delta[:, None])

    @gluon.jit
    def _dq_loader(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar,
                   k_free, v_free, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, q_offset, kv_offset,
                   n_q_tiles, n_work):
        """One warp: per work item (query tile, head), the query and dO rows once their slot is free, then the
        listed K and V tiles into the ring as soon as both consumers freed the slot (a counter running on across
        work items)."""
        BLOCK: gl.constexpr = q_smem.shape[3]  # worker partitions take no constexpr arguments (Triton 3.6)
        Q_SLOTS: gl.constexpr = q_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[3]
        kb0 = kv_offset // BLOCK
        base = 0
        i = 0
        for k in range(_items_of_program(n_work)):
            w = _item(k)
            b, hkv, hq, q_first, t_first, irow, f_cnt, n_tiles = _query_tile(
                w, n_work, FC, PC, s_ib, s_ih, Hkv, G, q_offset, n_q_tiles, BLOCK, BLOCK_N)
            b32 = b.to(gl.int32)
            q_slot = i % Q_SLOTS
            mbarrier.wait(q_free.index(q_slot), ((i // Q_SLOTS) + 1) & 1, pred=i >= Q_SLOTS)
            mbarrier.expect(q_bar.index(q_slot), 2 * q_desc.block_type.nbytes)
            _tma_load(q_desc, [b32, hq.to(gl.int32), t_first, 0], q_bar.index(q_slot), q_smem.index(q_slot))
            _tma_load(do_desc, [b32, hq.to(gl.int32), t_first, 0], q_bar.index(q_slot), do_smem.index(q_slot))
            _stream_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_bar, v_bar, k_free, v_free, FT, PT, irow, f_width,
                             p_width, f_cnt, n_tiles, base, kb0, kv_offset, b32, hkv.to(gl.int32), BLOCK, BLOCK_N)
            base += n_tiles
            i += 1

    @gluon.jit
    def _dq_consumer(q_smem, do_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, LSE, DELTA, DQ,
                     FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                     s_lb, s_lh, s_qb, s_qh, s_qt, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul, scale,
                     ROW0: gl.constexpr):
        """One warpgroup: 64 query rows (from ROW0) of each work item. Step j issues S_j = Q K_j^T and
        dP_j = dO V_j^T together with dQ += dS_{j-1} K_{j-1}, waits for S_j and dP_j only (V_j's slot is then free),
        and computes dS_j while that dQ product runs; K_{j-1}'s slot is freed once it is done, the query / dO slot
        after the item's last S and dP."""
        ROWS: gl.constexpr = 64
        BLOCK: gl.constexpr = q_smem.shape[3]
        Q_SLOTS: gl.constexpr = q_smem.shape[0]
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[3]
        HEAD_DIM: gl.constexpr = k_smem.shape[4]
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        a_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=a_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        kb0 = kv_offset // BLOCK
        base = 0
        i = 0
        for k in range(_items_of_program(n_work)):
            w = _item(k)
            b, hkv, hq, q_first, t_first, irow, f_cnt, n_tiles = _query_tile(
                w, n_work, FC, PC, s_ib, s_ih, Hkv, G, q_offset, n_q_tiles, BLOCK, BLOCK_N)
            q_slot = i % Q_SLOTS
            q_rows = _ring_tile(q_smem, q_slot).slice(ROW0, ROWS)
            do_rows = _ring_tile(do_smem, q_slot).slice(ROW0, ROWS)
            t_rows = t_first + ROW0 + gl.arange(0, ROWS, layout=row_s)
            row_ok = (t_rows >= 0) & (t_rows < q_len)
            stats = b * s_lb + hq * s_lh + t_rows
            lse = gl.load(LSE + stats, mask=row_ok, other=float("inf"))  # the backward's copy: +inf for empty rows
            delta = gl.load(DELTA + stats, mask=row_ok, other=0.0)
            q_abs = q_first + ROW0 + gl.arange(0, ROWS, layout=row_s)
            dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=a_layout)
            mbarrier.wait(q_bar.index(q_slot), (i // Q_SLOTS) & 1)
            if n_tiles > 0:
                slot = base % STAGES
                phase = (base // STAGES) & 1
                mbarrier.wait(k_bar.index(slot), phase)
                s = warpgroup_mma(q_rows, _ring_tile(k_smem, slot).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
                mbarrier.wait(v_bar.index(slot), phase)
                dp = warpgroup_mma(do_rows, _ring_tile(v_smem, slot).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
                s, dp = warpgroup_mma_wait(0, deps=(s, dp))
                mbarrier.arrive(v_free.index(slot))
                ds = _dq_ds(s, dp, lse, delta, q_abs, cols, FT, PT, irow, f_width, p_width, f_cnt, 0, kb0,
                            kv_offset, kv_len, sink, window, qk_mul, BLOCK, BLOCK_N)
                ds_op = gl.convert_layout(ds.to(dtype), op_layout)
                for j in range(1, n_tiles):
                    c = base + j
                    slot = c % STAGES
                    prev = (c - 1) % STAGES
                    phase = (c // STAGES) & 1
                    mbarrier.wait(k_bar.index(slot), phase)
                    s = warpgroup_mma(q_rows, _ring_tile(k_smem, slot).permute((1, 0)), s_zero, use_acc=False,
                                      is_async=True)
                    mbarrier.wait(v_bar.index(slot), phase)
                    dp = warpgroup_mma(do_rows, _ring_tile(v_smem, slot).permute((1, 0)), s_zero, use_acc=False,
                                       is_async=True)
                    dq = warpgroup_mma(ds_op, _ring_tile(k_smem, prev), dq, is_async=True)
                    s, dp = warpgroup_mma_wait(1, deps=(s, dp))  # dS_{j-1} K_{j-1} still in flight
                    mbarrier.arrive(v_free.index(slot))
                    ds = _dq_ds(s, dp, lse, delta, q_abs, cols, FT, PT, irow, f_width, p_width, f_cnt, j, kb0,
                                kv_offset, kv_len, sink, window, qk_mul, BLOCK, BLOCK_N)
                    dq, ds_op = warpgroup_mma_wait(0, deps=(dq, ds_op))
                    mbarrier.arrive(k_free.index(prev))
                    ds_op = gl.convert_layout(ds.to(dtype), op_layout)
                mbarrier.arrive(q_free.index(q_slot))  # the item's last S and dP are in: the slot may refill
                last = (base + n_tiles - 1) % STAGES
                dq = warpgroup_mma(ds_op, _ring_tile(k_smem, last), dq, is_async=True)
                dq = warpgroup_mma_wait(0, deps=(dq, ))
                mbarrier.arrive(k_free.index(last))
            else:
                mbarrier.arrive(q_free.index(q_slot))
            dq = dq * scale
            rows = t_first + ROW0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, a_layout))
            d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, a_layout))
            ok = (rows >= 0) & (rows < q_len)
            gl.store(DQ + b * s_qb + hq * s_qh + rows[:, None] * s_qt + d[None, :], dq.to(dtype), mask=ok[:, None])
            base += n_tiles
            i += 1

    @gluon.jit
    def _dq_consumer_top(q_smem, do_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, LSE, DELTA,
                         DQ, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                         s_lb, s_lh, s_qb, s_qh, s_qt, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul,
                         scale):
        _dq_consumer(q_smem, do_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, LSE, DELTA, DQ,
                     FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                     s_lb, s_lh, s_qb, s_qh, s_qt, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul, scale, 0)

    @gluon.jit
    def _dq_consumer_bottom(q_smem, do_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, LSE,
                            DELTA, DQ, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                            s_lb, s_lh, s_qb, s_qh, s_qt, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul,
                            scale):
        _dq_consumer(q_smem, do_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, LSE, DELTA, DQ,
                     FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                     s_lb, s_lh, s_qb, s_qh, s_qt, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul, scale, 64)

    @gluon.jit
    def _attn_bwd_dq_ws_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, FC, FT, PC, PT,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_lb, s_lh,
        s_ib, s_ih, f_width, p_width,
        B, Hkv, G, q_len, kv_len, q_offset, kv_offset, n_q_tiles, sink, window, qk_mul, scale,
        BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
        Q_SLOTS: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Warp-specialised dQ: a 1-warp TMA loader and two 4-warp consumers (64 query rows each), the work order
        of the Gluon forward (last query tiles first, the heads of a KV group side by side); program p takes work
        items p, p + grid, ... (one each, or a persistent grid). DQ has Q's strides (``torch.empty_like(q)``)."""
        dtype: gl.constexpr = Q.dtype.element_ty
        layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=4)
        q_desc = _rows_descriptor(Q, B, Hkv * G, q_len, s_qb, s_qh, s_qt, BLOCK, HEAD_DIM, layout)
        do_desc = _rows_descriptor(DO, B, Hkv * G, q_len, s_db, s_dh, s_dt, BLOCK, HEAD_DIM, layout)
        k_desc = _rows_descriptor(K, B, Hkv, kv_len, s_kb, s_kh, s_kt, BLOCK_N, HEAD_DIM, layout)
        v_desc = _rows_descriptor(V, B, Hkv, kv_len, s_vb, s_vh, s_vt, BLOCK_N, HEAD_DIM, layout)
        q_smem = gl.allocate_shared_memory(dtype, [Q_SLOTS, 1, 1, BLOCK, HEAD_DIM], layout)
        do_smem = gl.allocate_shared_memory(dtype, [Q_SLOTS, 1, 1, BLOCK, HEAD_DIM], layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], layout)
        q_bar, q_free = _slot_barriers(Q_SLOTS)
        k_bar, v_bar, k_free, v_free = _ring_barriers(STAGES)
        n_work = B * Hkv * G * n_q_tiles
        consumer_args = (q_smem, do_smem, k_smem, v_smem, q_bar, q_free, k_bar, v_bar, k_free, v_free, LSE, DELTA,
                         DQ, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, n_q_tiles, n_work,
                         s_lb, s_lh, s_qb, s_qh, s_qt, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul, scale)
        gl.warp_specialize(
            [(_dq_consumer_top, consumer_args), (_dq_consumer_bottom, consumer_args),
             (_dq_loader, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_bar, q_free, k_bar,
                           v_bar, k_free, v_free, FC, PC, FT, PT, s_ib, s_ih, f_width, p_width, Hkv, G, q_offset,
                           kv_offset, n_q_tiles, n_work))],
            [4, 1], [240, 24])


def attention_dkdv_gluon(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse_bwd: torch.Tensor, delta: torch.Tensor,
    dk: torch.Tensor, dv: torch.Tensor,
    t_full_count: torch.Tensor, t_full_tiles: torch.Tensor, t_part_count: torch.Tensor, t_part_tiles: torch.Tensor,
    split_tile: torch.Tensor | None, split_slot: torch.Tensor | None,
    scr_k: torch.Tensor | None, scr_v: torch.Tensor | None,
    block: int, q_offset: int, kv_offset: int, sink: int, window: int, scale: float, *, stages: int,
) -> None:
    """Launch the Gluon dK/dV kernel (for calls ``kernels/dispatch.py`` gave it; ``stages``: the query/dO ring
    depth) over the transposed lists (after
    ``bwd_split.split_key_lists`` when a split applies: then ``split_tile``/``split_slot`` and the fp32 scratch are
    given and ``bwd_split.reduce_split`` sums the partials afterwards). ``lse_bwd`` and ``delta`` are the backward
    preprocess kernel's padded row buffers. Writes ``dk`` (scaled) and ``dv``."""
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    n_rows = t_full_count.shape[2]
    qk_mul, _ = score_constants(scale, 0.0)  # no soft-capping on this path
    s_ib, s_ih = index_strides(t_full_count)
    if stages < 2:
        raise ValueError(f"Gluon dK/dV ring depth {stages}: at least 2")
    split = split_tile is not None
    if not split:
        split_tile = split_slot = t_full_count
        scr_k = scr_v = lse_bwd
    ensure_allocator()
    _attn_bwd_dkdv_ws_kernel[(n_rows, batch * hkv)](
        q, k, v, do, lse_bwd, delta, dk, dv, t_full_count, t_full_tiles, t_part_count, t_part_tiles,
        split_tile, split_slot, scr_k, scr_v,
        scr_k.stride(0) if split else 0, scr_k.stride(1) if split else 0, scr_k.stride(2) if split else 0,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse_bwd.stride(0), lse_bwd.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        s_ib, s_ih, t_full_tiles.shape[-1], t_part_tiles.shape[-1],
        hkv, group, q_len, kv_len, q_offset, kv_offset, sink, window, qk_mul, scale,
        BLOCK=block, BLOCK_M=BLOCK_M, HEAD_DIM=dim, STAGES=stages, SPLIT=split,
        num_warps=4,  # the default partition is the first consumer warpgroup
    )


def attention_dq_gluon(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse_bwd: torch.Tensor, delta: torch.Tensor,
    dq: torch.Tensor, full_count: torch.Tensor, full_tiles: torch.Tensor, part_count: torch.Tensor,
    part_tiles: torch.Tensor, block: int, q_offset: int, kv_offset: int, sink: int, window: int, scale: float,
    *, block_n: int, stages: int, q_slots: int, persistent: bool | None,
) -> None:
    """Launch the Gluon dQ kernel over the forward lists (for calls ``kernels/dispatch.py`` gave it). ``dq`` must
    have q's strides (``torch.empty_like(q)``); it receives the scaled dQ. ``block_n`` keys per step, ``stages`` K/V
    ring depth, ``q_slots`` query/dO slots, ``persistent``: see :func:`dq_grid_size`."""
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    n_q = full_count.shape[2]
    if dq.stride() != q.stride():
        raise ValueError("Gluon dQ: dq must have q's strides (torch.empty_like(q))")
    if block % block_n or stages < 2:
        raise ValueError(f"Gluon dQ: key tile {block_n} (a divisor of {block}), ring depth {stages} (at least 2)")
    if q_slots not in (1, 2) or _dq_shared_bytes(stages, q_slots, block, block_n, dim) > SHARED_MEMORY_BYTES:
        raise ValueError(f"Gluon dQ with {q_slots} query/dO slots and a {stages}-slot ring of {block_n} keys at head "
                         f"dim {dim}: {_dq_shared_bytes(stages, q_slots, block, block_n, dim)} bytes of shared "
                         f"memory, more than {SHARED_MEMORY_BYTES} (query/dO slots: 1 or 2)")
    qk_mul, _ = score_constants(scale, 0.0)
    s_ib, s_ih = index_strides(full_count)
    ensure_allocator()
    n_work = batch * hkv * group * n_q
    grid = (dq_grid_size(n_work, full_tiles.shape[-1] + part_tiles.shape[-1], sm_count(q.device), persistent),)
    _attn_bwd_dq_ws_kernel[grid](
        q, k, v, do, lse_bwd, delta, dq, full_count, full_tiles, part_count, part_tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse_bwd.stride(0), lse_bwd.stride(1), s_ib, s_ih, full_tiles.shape[-1], part_tiles.shape[-1],
        batch, hkv, group, q_len, kv_len, q_offset, kv_offset, n_q, sink, window, qk_mul, scale,
        BLOCK=block, BLOCK_N=block_n, HEAD_DIM=dim, STAGES=stages, Q_SLOTS=q_slots,
        num_warps=4,  # the default partition is the first consumer warpgroup
    )


def dq_grid_size(n_work: int, row_tiles: int, sms: int, persistent: bool | None) -> int:
    """Programs the dQ kernel launches for ``n_work`` items whose rows list up to ``row_tiles`` tiles: one per SM
    (persistent) or one per item; ``persistent`` None: persistent for rows under ``LONG_ROW_TILES`` (on short rows
    the persistent grid overlaps each item's start-up with the previous one; on long rows its programs would hold
    every SM, so dK/dV could not run beside dQ: docs/kernel-decisions.md)."""
    if persistent is None:
        persistent = row_tiles < LONG_ROW_TILES
    return min(n_work, sms) if persistent else n_work


def _dq_shared_bytes(stages: int, q_slots: int, block: int, block_n: int, dim: int) -> int:
    """Shared memory of the dQ kernel's tiles: ``stages`` K/V slot pairs and ``q_slots`` query + dO tiles, 16-bit."""
    return (stages * 2 * block_n + q_slots * 2 * block) * dim * 2


__all__ = ["AVAILABLE", "HEAD_DIMS", "attention_dkdv_gluon", "attention_dq_gluon", "dq_grid_size"]
