"""Shared helpers for the block-sparse attention kernels (Triton and Gluon): the element mask of partial tiles,
softcap, and the host-side score constants, index strides and SM count every launcher uses.

The element predicate mirrors ``hf_sparsek.block_index.element_mask`` exactly; it is written with broadcasting so
the forward (query rows x keys) and the key-major backward (keys x query rows) share one definition.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@functools.cache
def _sm_count_of_index(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, read once per device (1 elsewhere: the Triton interpreter's
    grids stay small)."""
    if device.type != "cuda":
        return 1
    return _sm_count_of_index(device.index if device.index is not None else torch.cuda.current_device())


_FITTED: dict[tuple, tuple[int, int]] = {}  # (kernel, shapes, dtype, device) -> (key block, stages) that fit
_UNFIT: set[str] = set()  # kernels that did not fit once in this process: their launches consult _FITTED


def launch_fitting(name: str, launch: Callable[[int, int], None], key: Callable[[], tuple], block_n: int,
                   stages: int, shrink_block: bool = True) -> None:
    """``launch(block_n, stages)``; where the compiled kernel needs more shared memory than this GPU has (Triton's
    OutOfResources, raised when the kernel loads, before anything runs), again with half the key block (down to 16;
    not with ``shrink_block`` False, for kernels whose key step is a whole tile), then with fewer stages (down to 1).
    Why: the tile tables are tuned for 16-bit inputs on an H100; float32 inputs at head dim 128-256 (or a GPU with
    less shared memory) need twice the room. The tiles split the work differently, the result is the same (float32
    sums may round differently). The shape that fits is remembered per ``key()`` (which kernel, its constexpr shapes,
    the dtype and the device), so the failed compiles are paid once. Until kernel ``name`` fails once, a launch
    costs one set lookup more than a plain one (the key is not built): the decode path is bound by host time."""
    shapes = _shapes(block_n, stages, shrink_block)
    if name not in _UNFIT:
        try:
            launch(*next(shapes))
            return
        except OutOfResources:
            _UNFIT.add(name)
        where = (name, *key())
    else:
        where = (name, *key())
        fitted = _FITTED.get(where)
        if fitted is not None:
            launch(*fitted)
            return
    error: OutOfResources | None = None
    for bn, st in shapes:
        try:
            launch(bn, st)
        except OutOfResources as exc:
            error = exc
            continue
        _FITTED[where] = (bn, st)
        return
    if error is None:  # the first shape was the only one, and it failed
        raise OutOfResources(0, 0, f"shared memory ({name}: no smaller tile to try)")
    raise error


def _shapes(block_n: int, stages: int, shrink_block: bool) -> Iterator[tuple[int, int]]:
    """(key block, stages) in the order :func:`launch_fitting` tries them: the tuned one, half the key block down to
    16, then one stage fewer from the tuned block, down to one stage."""
    bn, st = block_n, stages
    while True:
        yield bn, st
        if shrink_block and bn > 16:
            bn //= 2
        elif st > 1:
            bn, st = block_n, st - 1
        else:
            return


def score_constants(scale: float, softcap: float) -> tuple[float, float]:
    """(qk multiplier, log2 cap): scores = qk*mul*log2e, or cap*log2e*tanh(qk*scale/cap) with softcap."""
    if softcap:
        return scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0


def index_strides(count: torch.Tensor) -> tuple[int, int]:
    """Row strides of a (Bi, Hi, n) count tensor with 0 for broadcast dims (lists are contiguous)."""
    bi, hi, n = count.shape
    return (hi * n if bi > 1 else 0), (n if hi > 1 else 0)


@triton.jit
def tanh_f32(x):
    """tanh via exp2: portable across Triton versions and the interpreter; saturates to +-1 without NaN."""
    e = tl.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def element_mask(
    q_abs, k_abs, q_t, k_t, b, selected,
    KSEG, QSEG, KRANK, s_kseg_b, s_qseg_b, s_krank_b,
    q_len, kv_len, sink, window,
    HAS_KSEG: tl.constexpr, HAS_QSEG: tl.constexpr, HAS_KRANK: tl.constexpr,
):
    """Token-exact predicate of a partial tile; ``q_*`` and ``k_*`` broadcast against each other (absolute/storage)."""
    k_in = (k_t >= 0) & (k_t < kv_len)
    keep = (k_abs <= q_abs) & k_in
    k_safe = tl.minimum(tl.maximum(k_t, 0), kv_len - 1)
    if HAS_KSEG:
        kseg = tl.load(KSEG + b * s_kseg_b + k_safe, mask=k_in, other=-1)
        keep = keep & (kseg >= 0)
        if HAS_QSEG:
            q_safe = tl.minimum(tl.maximum(q_t, 0), q_len - 1)
            qseg = tl.load(QSEG + b * s_qseg_b + q_safe)
            keep = keep & (qseg == kseg)
    if HAS_KRANK:
        rank = tl.load(KRANK + b * s_krank_b + k_safe, mask=k_in, other=0)
    else:
        rank = k_abs
    token = ((sink > 0) & (rank < sink)) | ((window > 0) & ((q_abs - k_abs) < window))
    return keep & (token | selected)


@triton.jit
def query_tile_rows(pid, b, hkv, FC, PC, s_ib, s_ih, G, q_len, q_offset, n_q_tiles,
                    BLOCK: tl.constexpr, SUB_M: tl.constexpr, HPP: tl.constexpr):
    """Program -> its rows: query tile ``m`` (last tiles first: they list the most key tiles), ``SUB_M`` rows of it
    for ``HPP`` query heads of the KV group packed into the M dimension, and the tile's list counts (0 when the
    program has no valid row). Shared by the forward and the dQ kernel."""
    n_sub_m: tl.constexpr = BLOCK // SUB_M
    n_hc = tl.cdiv(G, HPP)
    per_tile = n_sub_m * n_hc
    m = n_q_tiles - 1 - pid // per_tile
    rem = pid % per_tile
    sub = rem // n_hc
    h0 = (rem % n_hc) * HPP
    r = tl.arange(0, SUB_M * HPP)
    head = h0 + r // SUB_M
    q_abs = (q_offset // BLOCK + m) * BLOCK + sub * SUB_M + r % SUB_M
    q_t = q_abs - q_offset
    row_ok = (q_t >= 0) & (q_t < q_len) & (head < G)
    first_t = (q_offset // BLOCK + m) * BLOCK + sub * SUB_M - q_offset
    any_row = (first_t < q_len) & (first_t + SUB_M > 0)
    irow = b * s_ib + hkv * s_ih + m
    f_cnt = tl.where(any_row, tl.load(FC + irow), 0)
    p_cnt = tl.where(any_row, tl.load(PC + irow), 0)
    return q_abs, q_t, row_ok, hkv * G + head, irow, f_cnt, p_cnt


@triton.jit
def kv_descriptors(k_base, v_base, kv_len, s_kt, s_vt, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   USE_TMA: tl.constexpr):
    """2-D TMA descriptors over one head's K and V rows (``[kv_len, HEAD_DIM]``), or the base pointers."""
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[kv_len, HEAD_DIM], strides=[s_kt, 1],
                                           block_shape=[ROWS, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[kv_len, HEAD_DIM], strides=[s_vt, 1],
                                           block_shape=[ROWS, HEAD_DIM])
        return k_desc, v_desc
    else:
        return k_base, v_base


@triton.jit
def load_rows(desc, base, t0, t, s_t, d, ok, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows ``t = t0 + arange`` of one head: a TMA box load (out-of-range rows read 0) or a pointer load, masked
    by ``ok`` when MASKED (full tiles need no mask)."""
    if USE_TMA:
        return desc.load([t0, 0])
    elif MASKED:
        return tl.load(base + t[:, None] * s_t + d[None, :], mask=ok[:, None], other=0.0)
    else:
        return tl.load(base + t[:, None] * s_t + d[None, :])
