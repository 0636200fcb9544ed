"""How the kernels run a call: the one place that decides.

Which inputs the kernels take (``unsupported_reason``: the op's backend decision and the launch wrapper's error ask
here), Triton or Gluon for each pass (the Gluon kernels' input rules, the device and ``kernels/gluon_support.py``'s
Triton-release rule), the backward's split of long key lists, its side stream and launch order, TMA, and autotuning
-- all from a frozen :class:`KernelOptions` the caller passes (``hf_sparsek.triton_ops`` passes the current
settings'). The launchers below it check shapes and launch what they are told.
"""

from __future__ import annotations

import os

import torch

from . import attention_bwd, attention_fwd, autotune, decode, gluon_support
from . import attention_bwd_gluon as gluon_bwd
from . import attention_fwd_gluon as gluon_fwd
from .attention_bwd import BWD_CANDIDATES, BWD_CONFIGS, BackwardPlan, BwdConfig
from .attention_fwd import FWD_CANDIDATES, FWD_CONFIGS, FwdConfig
from .bwd_split import split_key_lists
from .common import sm_count
from .options import KernelOptions
from .tma import AUTO_HEAD_DIMS, aligned, compute_major, use_tma

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GLUON_DTYPES = (torch.float16, torch.bfloat16)
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}

__all__ = ["KernelOptions", "backward", "decode_forward", "forward", "gluon_dkdv_reason", "gluon_forward_reason",
           "unsupported_reason", "use_gluon_dkdv", "use_gluon_dq", "use_gluon_forward", "use_split_kv"]


def interpreter_mode() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_upcast(q: torch.Tensor) -> bool:
    """Whether these bfloat16 inputs must reach the kernels as float32 copies: Triton's interpreter (3.6 to 3.9)
    multiplies bfloat16 tiles in ``tl.dot`` as numpy's raw 16-bit words, so its results are garbage (a 16 x 16
    product off by 1e10; float16 and float32 are right). The copies' products are the same (a bfloat16 product is
    exact in float32) and the outputs are rounded back to bfloat16. Compiled kernels (no TRITON_INTERPRET) take
    bfloat16 as it is."""
    return q.dtype == torch.bfloat16 and interpreter_mode()


def as_float32(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """float32 copies of the floating tensors (None stays None): :func:`interpreter_upcast`'s inputs."""
    return tuple(t if t is None or not t.is_floating_point() else t.float() for t in tensors)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softcap: float | None = None) -> str | None:
    """None when the kernels can run these (batch, heads, seq, head_dim) inputs, else a reason a person can read
    (soft-capping is supported: ``softcap`` is taken for the day a kernel is not)."""
    if not (q.is_cuda or interpreter_mode()):
        return "inputs are not on a CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not supported by the kernels (float16, bfloat16, float32)"
    dims = {q.shape[-1], k.shape[-1], v.shape[-1]}
    if len(dims) != 1:
        return f"q/k/v head dims differ ({q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]})"
    if q.shape[-1] not in FWD_CONFIGS:
        return f"head dim {q.shape[-1]} is not supported by the kernels (one of {sorted(FWD_CONFIGS)})"
    return None


# ---- Triton or Gluon ----------------------------------------------------------------------------------------------


def _gluon_shared_reason(kernel: str, head_dims: tuple[int, ...], kernel_block: int, dtype: torch.dtype,
                         head_dim: int, block: int, softcap: float, has_segments: bool) -> str | None:
    """The input rules every Gluon kernel shares (16-bit, its head dims and block, no soft-capping or segments)."""
    if dtype not in GLUON_DTYPES:
        return f"dtype {dtype} ({kernel}: float16, bfloat16)"
    if head_dim not in head_dims:
        return f"head dim {head_dim} ({kernel}: {head_dims})"
    if block != kernel_block:
        return f"block size {block} ({kernel}: {kernel_block})"
    if softcap:
        return "soft-capping"
    if has_segments:
        return "per-batch segments or ranks (left padding, packed sequences)"
    return None


def gluon_forward_reason(dtype: torch.dtype, head_dim: int, q_len: int, block: int, softcap: float,
                         has_segments: bool) -> str | None:
    """Why these inputs go to the Triton forward (None: the Gluon forward takes them, device permitting)."""
    reason = _gluon_shared_reason("Gluon forward", gluon_fwd.HEAD_DIMS, gluon_fwd.BLOCK, dtype, head_dim, block,
                                  softcap, has_segments)
    if reason is not None:
        return reason
    if q_len < gluon_fwd.MIN_Q_LEN:
        return f"query length {q_len} < {gluon_fwd.MIN_Q_LEN} (decode: the Triton forward packs heads instead)"
    return None


def gluon_dkdv_reason(dtype: torch.dtype, head_dim: int, block: int, softcap: float, has_segments: bool,
                      q_offset: int, options: KernelOptions, programs: int | None = None,
                      row_tiles: int | None = None) -> str | None:
    """Why these inputs go to the Triton dK/dV kernel (None: the Gluon one takes them, device permitting);
    ``programs``: batch x KV heads x key tiles; ``row_tiles``: key tiles the longest query row lists."""
    reason = _gluon_shared_reason("Gluon dK/dV", gluon_bwd.HEAD_DIMS, gluon_bwd.BLOCK, dtype, head_dim, block,
                                  softcap, has_segments)
    if reason is not None:
        return reason
    if q_offset % 4:
        return f"query offset {q_offset} not a multiple of 4"
    least = options.gluon_dkdv_min_programs.get(head_dim, 0)
    exempt = options.gluon_dkdv_floor_exempt_row_tiles
    long_rows = row_tiles is not None and row_tiles >= exempt
    if programs is not None and programs < least and not long_rows:
        return (f"{programs} key-tile programs < {least} at head dim {head_dim} with rows of "
                f"{'?' if row_tiles is None else row_tiles} < {exempt} tiles (short grids of short rows are bound by "
                "host time, which the Triton kernels' launches take less of)")
    return None


def broadcast_heads_fit(head_dim: int) -> bool:
    """Whether K / V may reach the kernels as a view broadcast over the heads (stride 0: one KV head repeated per
    query head) without costing speed: the kernels that load through TMA (Gluon, TMA loads) need real strides and
    fall back to plain loads on such a view (``tma.aligned``), and they take head dims 64 / 128 only. Elsewhere plain
    loads read the view as it is, and the copy a repeat makes is saved."""
    return head_dim not in (*AUTO_HEAD_DIMS, *gluon_fwd.HEAD_DIMS, *gluon_bwd.HEAD_DIMS)


def use_gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, softcap: float,
                      has_segments: bool, options: KernelOptions) -> bool:
    """Whether the Gluon forward runs this call (Hopper, qualifying inputs, a checked Triton release, switched on)."""
    if not options.gluon_fwd or not gluon_fwd.AVAILABLE or not q.is_cuda:
        return False
    if gluon_forward_reason(q.dtype, q.shape[-1], q.shape[2], block, softcap, has_segments) is not None:
        return False
    return aligned(q, k, v) and compute_major(q.device) == 9 and gluon_support.allowed()


def use_gluon_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, block: int, softcap: float,
                   has_segments: bool, q_offset: int, row_tiles: int | None, options: KernelOptions) -> bool:
    """Whether the Gluon dK/dV kernel runs this call; ``row_tiles``: the forward lists' width (full + partial)."""
    if not options.gluon_dkdv or not gluon_fwd.AVAILABLE or not q.is_cuda:
        return False
    programs = q.shape[0] * k.shape[1] * -(-k.shape[2] // block)
    if gluon_dkdv_reason(q.dtype, q.shape[-1], block, softcap, has_segments, q_offset, options, programs,
                         row_tiles) is not None:
        return False
    return aligned(q, k, v, do) and compute_major(q.device) == 9 and gluon_support.allowed()


def use_gluon_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, block: int, softcap: float,
                 has_segments: bool, row_tiles: int | None, options: KernelOptions) -> bool:
    """Whether the Gluon dQ kernel runs this call: its own rules (query length, ``gluon_dq_head_dims``) on top of
    what the Gluon dK/dV kernel takes."""
    if not options.gluon_dq or q.shape[2] < gluon_bwd.DQ_MIN_Q_LEN or q.shape[-1] not in options.gluon_dq_head_dims:
        return False
    return use_gluon_dkdv(q, k, v, do, block, softcap, has_segments, 0, row_tiles, options)


# ---- the calls ----------------------------------------------------------------------------------------------------


def _rows_contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels need a unit stride on the head dim (any other layout is fine)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU, made once (a stream per call would cost host time on small shapes)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    full_count: torch.Tensor, full_tiles: torch.Tensor, part_count: torch.Tensor, part_tiles: torch.Tensor,
    k_seg: torch.Tensor | None, q_seg: torch.Tensor | None, k_rank: torch.Tensor | None,
    block: int, q_offset: int, kv_offset: int, sink: int, window: int, scale: float, softcap: float,
    options: KernelOptions, config: FwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward: O (q's shape and dtype) and the log2-domain LSE (B, Hq, Lq) fp32. The Gluon forward where it
    applies, else the Triton kernel with ``config`` (an explicit config always runs Triton), the autotuned one
    (``options.autotune``) or the head dim's default."""
    attention_fwd.check_shapes(q, k, v)
    if interpreter_upcast(q):
        out, lse = forward(*as_float32(q, k, v), full_count, full_tiles, part_count, part_tiles, k_seg, q_seg, k_rank,
                           block, q_offset, kv_offset, sink, window, scale, softcap, options, config)
        return out.to(q.dtype), lse
    q, k, v = _rows_contiguous(q, k, v)
    has_segments = k_seg is not None or q_seg is not None or k_rank is not None
    if config is None and use_gluon_forward(q, k, v, block, softcap, has_segments, options):
        return gluon_fwd.attention_forward_gluon(
            q, k, v, full_count, full_tiles, part_count, part_tiles, block, q_offset, kv_offset, sink, window, scale,
            stages=options.gluon_fwd_stages, q_slots=options.gluon_fwd_q_slots, persistent=options.gluon_fwd_persistent)
    out, lse, launch = attention_fwd.prepare_forward(
        q, k, v, full_count, full_tiles, part_count, part_tiles, k_seg, q_seg, k_rank,
        block, q_offset, kv_offset, sink, window, scale, softcap, tma=use_tma(k, v, setting=options.tma))
    if config is None and options.autotune:
        dim = q.shape[-1]
        # list widths (the longest row) stand for the pattern's density without a device sync
        key = autotune.shape_key("fwd", q, k, block, full_tiles.shape[-1] + part_tiles.shape[-1])
        config = autotune.choose(key, FWD_CANDIDATES[dim], FWD_CONFIGS[dim], launch)
    launch(config)
    return out, lse


def backward_plan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
    full_tiles: torch.Tensor, part_tiles: torch.Tensor,
    t_full_count: torch.Tensor, t_full_tiles: torch.Tensor, t_part_count: torch.Tensor, t_part_tiles: torch.Tensor,
    has_segments: bool, block: int, q_offset: int, softcap: float, options: KernelOptions, explicit_config: bool,
) -> BackwardPlan:
    """The backward's choices for last-dim-contiguous inputs: the split, Gluon or Triton per pass (an explicit
    config keeps the Triton kernels it names), the side stream and order, TMA, the Gluon launch parameters."""
    dim = q.shape[-1]
    row_tiles = full_tiles.shape[-1] + part_tiles.shape[-1]
    split = split_key_lists(t_full_count, t_full_tiles, t_part_count, t_part_tiles, options.split_chunk,
                            options.split_imbalance)
    gluon_dkdv = not explicit_config and use_gluon_dkdv(q, k, v, do, block, softcap, has_segments, q_offset,
                                                        row_tiles, options)
    gluon_dq = not explicit_config and use_gluon_dq(q, k, v, do, block, softcap, has_segments, row_tiles, options)
    block_n = options.gluon_dq_block_n
    return BackwardPlan(
        split=split, gluon_dkdv=gluon_dkdv, gluon_dq=gluon_dq,
        side_stream=_side_stream(q.device) if options.concurrent_dq and q.is_cuda else None,
        dq_first=options.dq_first,
        tma=use_tma(k, v, setting=options.tma),
        rows_tma=options.dkdv_tma_rows and use_tma(q, do, setting=options.tma),
        gluon_dkdv_stages=options.gluon_dkdv_stages[dim] if gluon_dkdv else None,
        gluon_dq_block_n=block_n,
        gluon_dq_stages=options.gluon_dq_stages[(dim, block_n)] if gluon_dq else None,
        gluon_dq_q_slots=options.gluon_dq_q_slots, gluon_dq_persistent=options.gluon_dq_persistent,
    )


def backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    full_count: torch.Tensor, full_tiles: torch.Tensor, part_count: torch.Tensor, part_tiles: torch.Tensor,
    t_full_count: torch.Tensor, t_full_tiles: torch.Tensor, t_part_count: torch.Tensor, t_part_tiles: torch.Tensor,
    k_seg: torch.Tensor | None, q_seg: torch.Tensor | None, k_rank: torch.Tensor | None,
    block: int, q_offset: int, kv_offset: int, sink: int, window: int, scale: float, softcap: float,
    options: KernelOptions, config: BwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward: dq, dk, dv (``lse``: the forward's log2-domain LSE), as :func:`backward_plan` decides, with
    ``config``, the autotuned config (``options.autotune``) or the head dim's default for the Triton kernels."""
    if interpreter_upcast(q):
        grads = backward(*as_float32(do, q, k, v, o), lse, full_count, full_tiles, part_count, part_tiles,
                         t_full_count, t_full_tiles, t_part_count, t_part_tiles, k_seg, q_seg, k_rank, block,
                         q_offset, kv_offset, sink, window, scale, softcap, options, config)
        return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v), strict=True))
    q, k, v, o, do = _rows_contiguous(q, k, v, o, do)
    has_segments = k_seg is not None or q_seg is not None or k_rank is not None
    plan = backward_plan(q, k, v, do, full_tiles, part_tiles, t_full_count, t_full_tiles, t_part_count,
                         t_part_tiles, has_segments, block, q_offset, softcap, options, config is not None)
    dq, dk, dv, launch = attention_bwd.prepare_backward(
        do, q, k, v, o, lse, full_count, full_tiles, part_count, part_tiles,
        t_full_count, t_full_tiles, t_part_count, t_part_tiles, k_seg, q_seg, k_rank,
        block, q_offset, kv_offset, sink, window, scale, softcap, plan)
    dim = q.shape[-1]
    if config is None and options.autotune:
        key = autotune.shape_key("bwd", q, k, block, full_tiles.shape[-1] + part_tiles.shape[-1])
        config = autotune.choose(key, BWD_CANDIDATES[dim], BWD_CONFIGS[dim], launch)
    launch(config or BWD_CONFIGS[dim])
    return dq, dk, dv


# ---- decode: split-KV ----------------------------------------------------------------------------------------------


SHORT_RUN_ROWS = 16  # a query run this short always takes the split-KV kernel (decode, speculative steps)


def use_split_kv(q_len: int, needs_lse: bool, options: KernelOptions, row_programs: int = 0,
                 device: torch.device | None = None) -> bool:
    """Whether a call runs the split-KV decode kernel; never for calls that need gradients or the log-sum-exp.

    Runs of at most ``SHORT_RUN_ROWS`` rows always. Longer runs, up to ``options.split_kv_max_rows``, where the
    prefill kernel would leave most of the GPU idle: ``row_programs`` (batch x KV heads x query tiles the run
    spans) times ``options.split_kv_sms_per_program`` at most the device's SMs. Measured on an H100 (16K-32K
    keys, 32-64 rows; docs/kernel-decisions.md, "Dense tail rows"): one split-KV launch was 1.5-10x faster than the
    prefill kernel at batch 1 (1-16 such programs) and slower at batch 8 with 8 KV heads and 64 rows (64-128)."""
    if not options.split_kv_decode or needs_lse or q_len > decode.MAX_Q_LEN:
        return False
    if q_len <= SHORT_RUN_ROWS:
        return True
    if q_len > options.split_kv_max_rows or device is None:
        return False
    return row_programs * options.split_kv_sms_per_program <= sm_count(device)


def query_tiles(q_len: int, block: int, q_offset: int | torch.Tensor | None) -> int:
    """Query tiles a run of ``q_len`` rows at ``q_offset`` spans (a device-side or unknown offset: the most it can
    span)."""
    if not isinstance(q_offset, int):
        return decode.tiles_spanned(q_len, block)
    return (q_offset % block + q_len + block - 1) // block


def decode_splits(q: torch.Tensor, k: torch.Tensor, block: int, q_offset: int | torch.Tensor,
                  options: KernelOptions) -> int:
    """Shares per query tile: enough programs for ``decode_programs_per_sm`` per SM (the kernel caps it by the
    entries a tile lists, so each program keeps at least one key tile). A device-side offset counts the most tiles
    the run can span."""
    programs = q.shape[0] * k.shape[1] * query_tiles(q.shape[2], block, q_offset)
    return max(1, -(-options.decode_programs_per_sm * sm_count(q.device) // programs))


def decode_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, q_offset: int | torch.Tensor, kv_offset: int,
    sink: int,
    window: int, scale: float, softcap: float, options: KernelOptions, **source,
) -> torch.Tensor:
    """The split-KV decode forward (``source``: ``lists=`` a block index's four lists, or ``ranges=`` with its
    optional per-row sink ranges, selected tiles and ``range_selected``; see ``kernels/decode.py``)."""
    attention_fwd.check_shapes(q, k, v)
    if interpreter_upcast(q):
        out = decode_forward(*as_float32(q, k, v), block=block, q_offset=q_offset, kv_offset=kv_offset, sink=sink,
                             window=window, scale=scale, softcap=softcap, options=options, **source)
        return out.to(q.dtype)
    q, k, v = _rows_contiguous(q, k, v)
    return decode.decode_forward(
        q, k, v, block=block, q_offset=q_offset, kv_offset=kv_offset, sink=sink, window=window, scale=scale,
        softcap=softcap, n_splits=decode_splits(q, k, block, q_offset, options), **source)
