"""Autograd + torch.library wrapper around the Triton block-sparse attention kernels.

The forward and backward are registered as custom ops (``hf_sparsek::block_sparse_attn_fwd`` / ``_bwd``) with
fake implementations that only allocate outputs, so ``torch.compile`` sees one opaque op per call. The block index
travels as tensor arguments, its scalars as ints. The forward saves O and the log2-domain LSE for the backward.
The kernels' options are not arguments: each body reads the current settings' (``hf_sparsek.runtime``) when it runs
and hands them to ``kernels/dispatch.py``, which makes every launch choice.
"""

from __future__ import annotations

import contextlib

import torch

from .block_index import BlockIndex, _transpose_lists
from .kernels import dispatch
from .kernels.dispatch import unsupported_reason
from .runtime import kernel_options

LN2 = 0.6931471805599453


def _on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the inputs' GPU: Triton launches on the current device, and a model split over GPUs
    (``device_map="auto"``) calls a layer on cuda:1 while cuda:0 is current. No context when that device is already
    current (the common case; entering one costs host time on every call)."""
    if not t.is_cuda or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _i32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.int32).contiguous()


@torch.library.custom_op("hf_sparsek::block_sparse_attn_fwd", mutates_args=())
def block_sparse_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    full_count: torch.Tensor, full_tiles: torch.Tensor, part_count: torch.Tensor, part_tiles: torch.Tensor,
    t_full_count: torch.Tensor | None, t_full_tiles: torch.Tensor | None,
    t_part_count: torch.Tensor | None, t_part_tiles: torch.Tensor | None,
    k_seg: torch.Tensor | None, q_seg: torch.Tensor | None, k_rank: torch.Tensor | None,
    block: int, q_offset: int, kv_offset: int, sink: int, window: int, scale: float, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (O, log2-domain LSE). The transposed lists are only carried for the backward."""
    return _forward_body(q, k, v, full_count, full_tiles, part_count, part_tiles, k_seg, q_seg, k_rank,
                         block, q_offset, kv_offset, sink, window, scale, softcap)


def _forward_body(q, k, v, full_count, full_tiles, part_count, part_tiles, k_seg, q_seg, k_rank,
                  block, q_offset, kv_offset, sink, window, scale, softcap):
    """The forward launch, shared by the custom op and the eager autograd function."""
    with _on_device_of(q):
        return dispatch.forward(
            q, k, v, full_count, full_tiles, part_count, part_tiles, k_seg, q_seg, k_rank,
            block, q_offset, kv_offset, sink, window, scale, softcap, kernel_options(),
        )


@block_sparse_attn_fwd.register_fake
def _(q, k, v, full_count, full_tiles, part_count, part_tiles, t_full_count, t_full_tiles, t_part_count,
      t_part_tiles, k_seg, q_seg, k_rank, block, q_offset, kv_offset, sink, window, scale, softcap):
    batch, hq, q_len, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, hq, q_len), dtype=torch.float32)


@torch.library.custom_op("hf_sparsek::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    full_count: torch.Tensor, full_tiles: torch.Tensor, part_count: torch.Tensor, part_tiles: torch.Tensor,
    t_full_count: torch.Tensor | None, t_full_tiles: torch.Tensor | None,
    t_part_count: torch.Tensor | None, t_part_tiles: torch.Tensor | None,
    k_seg: torch.Tensor | None, q_seg: torch.Tensor | None, k_rank: torch.Tensor | None,
    block: int, q_offset: int, kv_offset: int, sink: int, window: int, scale: float, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dQ, dK, dV); builds the key-major lists here when the forward did not carry them."""
    return _backward_body(do, q, k, v, o, lse, full_count, full_tiles, part_count, part_tiles, t_full_count,
                          t_full_tiles, t_part_count, t_part_tiles, k_seg, q_seg, k_rank,
                          block, q_offset, kv_offset, sink, window, scale, softcap)


def _backward_body(do, q, k, v, o, lse, full_count, full_tiles, part_count, part_tiles, t_full_count, t_full_tiles,
                   t_part_count, t_part_tiles, k_seg, q_seg, k_rank, block, q_offset, kv_offset, sink, window,
                   scale, softcap):
    """The backward launches, shared by the custom op and the eager autograd function."""
    if t_full_count is None or t_full_tiles is None or t_part_count is None or t_part_tiles is None:
        n_k = (kv_offset % block + k.shape[2] + block - 1) // block
        t_full_count, t_full_tiles = _transpose_lists(full_count, full_tiles, n_k, encoded=False)
        t_part_count, t_part_tiles = _transpose_lists(part_count, part_tiles, n_k, encoded=True)
    with _on_device_of(q):
        return dispatch.backward(
            do, q, k, v, o, lse, full_count, full_tiles, part_count, part_tiles,
            t_full_count, t_full_tiles, t_part_count, t_part_tiles, k_seg, q_seg, k_rank,
            block, q_offset, kv_offset, sink, window, scale, softcap, kernel_options(),
        )


@block_sparse_attn_bwd.register_fake
def _(do, q, k, v, o, lse, full_count, full_tiles, part_count, part_tiles, t_full_count, t_full_tiles,
      t_part_count, t_part_tiles, k_seg, q_seg, k_rank, block, q_offset, kv_offset, sink, window, scale, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_N_TENSOR_ARGS = 14  # q, k, v, 4 forward lists, 4 transposed lists, k_seg, q_seg, k_rank


def _setup_context(ctx, inputs, output) -> None:
    out, lse = output
    ctx.save_for_backward(*inputs[:_N_TENSOR_ARGS], out, lse)
    ctx.scalars = inputs[_N_TENSOR_ARGS:]


def _backward(ctx, d_out, d_lse):
    q, k, v, fc, ft, pc, pt, tfc, tft, tpc, tpt, k_seg, q_seg, k_rank, out, lse = ctx.saved_tensors
    dq, dk, dv = block_sparse_attn_bwd(
        d_out, q, k, v, out, lse, fc, ft, pc, pt, tfc, tft, tpc, tpt, k_seg, q_seg, k_rank, *ctx.scalars
    )
    return (dq, dk, dv) + (None,) * (_N_TENSOR_ARGS - 3 + len(ctx.scalars))


torch.library.register_autograd("hf_sparsek::block_sparse_attn_fwd", _backward, setup_context=_setup_context)

# Eager calls skip the custom op (KernelOptions.eager_fast_path): its Python dispatch (schema defaults, aliasing
# checks, dynamo guards) made a call cost 441 us of host time per forward and 1693 us per forward+backward on the H100
# machine, against 155 / 1020 us through this function (4K tokens, where the forward kernel takes ~0.2 ms;
# docs/kernel-decisions.md). torch.compile still sees the op. Same kernels, same results; False sends eager calls
# through the op too (tests compare the two).
class _EagerBlockSparseAttention(torch.autograd.Function):
    """The custom op's forward and backward bodies behind a plain autograd function (eager mode only)."""

    @staticmethod
    def forward(ctx, q, k, v, *rest):
        tensors, scalars = rest[:_N_TENSOR_ARGS - 3], rest[_N_TENSOR_ARGS - 3:]
        fc, ft, pc, pt, _tfc, _tft, _tpc, _tpt, k_seg, q_seg, k_rank = tensors
        out, lse = _forward_body(q, k, v, fc, ft, pc, pt, k_seg, q_seg, k_rank, *scalars)
        ctx.save_for_backward(q, k, v, *tensors, out, lse)
        ctx.scalars = scalars
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, fc, ft, pc, pt, tfc, tft, tpc, tpt, k_seg, q_seg, k_rank, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward_body(d_out, q, k, v, out, lse, fc, ft, pc, pt, tfc, tft, tpc, tpt,
                                    k_seg, q_seg, k_rank, *ctx.scalars)
        return (dq, dk, dv) + (None,) * (_N_TENSOR_ARGS - 3 + len(ctx.scalars))


def triton_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockIndex, scale: float, softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention through the Triton kernels. Differentiable; output (B, Hq, Lq, D) in q's dtype.

    With ``return_lse`` also returns the natural-log LSE (B, Hq, Lq) fp32, ``-inf`` for rows that attend nothing.
    """
    reason = unsupported_reason(q, k, v, softcap)
    if reason is not None:
        raise ValueError(f"Triton block-sparse attention cannot run: {reason}")
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    options = kernel_options()
    row_programs = q.shape[0] * k.shape[1] * dispatch.query_tiles(q.shape[2], index.block_size, index.q_offset)
    if not torch.compiler.is_compiling() and dispatch.use_split_kv(q.shape[2], needs_grad or return_lse, options,
                                                                   row_programs, q.device):
        lists, segments, (block, q_offset, kv_offset, sink, window, scale, softcap) = _index_args(index, scale, softcap)
        if segments[1] is None:  # packed queries (q_seg) stay on the forward kernel
            with _on_device_of(q):
                return dispatch.decode_forward(
                    q, k, v, block=block, q_offset=q_offset, kv_offset=kv_offset, sink=sink, window=window,
                    scale=scale, softcap=softcap, options=options, lists=lists, k_seg=segments[0],
                    k_rank=segments[2])
    trans = tuple(index.transposed()) if needs_grad else (None, None, None, None)
    eager = options.eager_fast_path and not torch.compiler.is_compiling()
    op = _EagerBlockSparseAttention.apply if eager else block_sparse_attn_fwd
    lists, segments, scalars = _index_args(index, scale, softcap)
    out, lse = op(q, k, v, *lists, *trans, *segments, *scalars)
    if return_lse:
        return out, lse * LN2
    return out


def triton_decode_without_index(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int, q_offset: int | torch.Tensor, kv_offset: int,
    sink: int, window: int, scale: float, softcap: float | None, ranges: tuple[int, int, int, int],
    sink_ranges: torch.Tensor | None = None, selected: torch.Tensor | None = None, range_selected: bool = False,
    k_seg: torch.Tensor | None = None, k_rank: torch.Tensor | None = None, min_sparse_len: int = 0,
) -> torch.Tensor:
    """A decode step without a block index: key tiles from the pattern's sink and window ranges (and selected
    tiles) through the split-KV kernel. No gradients. A tensor ``q_offset`` stays on the device (the kernel reads
    it, with ``min_sparse_len``), so the call can be captured in a CUDA graph."""
    reason = unsupported_reason(q, k, v, softcap)
    if reason is not None:
        raise ValueError(f"Triton block-sparse attention cannot run: {reason}")
    with _on_device_of(q):
        return dispatch.decode_forward(
            q, k, v, block=block, q_offset=q_offset, kv_offset=kv_offset, sink=sink, window=window, scale=scale,
            softcap=float(softcap or 0.0), options=kernel_options(), ranges=ranges, sink_ranges=sink_ranges,
            selected=selected, range_selected=range_selected, k_seg=_i32(k_seg), k_rank=_i32(k_rank),
            min_sparse_len=min_sparse_len)


def _index_args(index: BlockIndex, scale: float, softcap: float | None) -> tuple[tuple, tuple, tuple]:
    """The index as the kernels' arguments: the forward lists, the per-batch tensors, the scalars."""
    lists = (index.full_count.contiguous(), index.full_tiles.contiguous(), index.part_count.contiguous(),
             index.part_tiles.contiguous())
    segments = (_i32(index.k_seg), _i32(index.q_seg), _i32(index.k_rank))
    scalars = (int(index.block_size), int(index.q_offset), int(index.kv_offset), int(index.sink_tokens),
               int(index.window or 0), float(scale), float(softcap or 0.0))
    return lists, segments, scalars


def triton_block_sparse_attention_grads(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockIndex, scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of :func:`triton_block_sparse_attention` for the output gradient ``grad``: the forward is
    recomputed for its log-sum-exp (the compiled op's backward, which runs outside autograd)."""
    lists, segments, scalars = _index_args(index, scale, softcap)
    out, lse = _forward_body(q, k, v, *lists, *segments, *scalars)
    return _backward_body(grad, q, k, v, out, lse, *lists, *index.transposed(), *segments, *scalars)
