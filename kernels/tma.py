"""When the kernels load K/V tiles through TMA (Hopper's bulk tensor copy engine) and what that needs.

The kernels build one 2-D tensor descriptor per (batch, KV head) program on the device
(``tl.make_tensor_descriptor`` over rows of one head: shape ``[len, head_dim]``, strides ``[token stride, 1]``),
so any strided (B, H, S, D) layout works, including transformers' transposed (B, S, H, D) views, and rows
outside the sequence read as zeros (the same values the pointer path's masks give). Results are identical
either way; only speed differs. Device-side descriptors need a scratch allocator for the descriptor bytes:
:func:`ensure_allocator` installs a torch one when none is set.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

AUTO_HEAD_DIMS = (64, 128)
_ALIGN = 16  # bytes: TMA base address and every stride but the last


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def aligned(*tensors: torch.Tensor) -> bool:
    """Base addresses and non-unit strides are multiples of 16 bytes and the last dim is contiguous (plain loops:
    this runs several times per call, and small shapes are bound by host time)."""
    for t in tensors:
        strides = t.stride()
        if strides[-1] != 1 or t.data_ptr() % _ALIGN:
            return False
        size = t.element_size()
        for st, n in zip(strides[:-1], t.shape[:-1], strict=True):
            if (st == 0 and n > 1) or (st * size) % _ALIGN:  # broadcast dims; misaligned rows
                return False
    return True


@functools.cache
def _major_of(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def compute_major(device: torch.device) -> int:
    """The CUDA compute capability's major number of ``device`` (looked up once per GPU)."""
    return _major_of(device.index if device.index is not None else torch.cuda.current_device())


def use_tma(*tensors: torch.Tensor, setting: bool | None) -> bool:
    """Whether the kernels should load these (B, H, S, D) tensors through TMA descriptors. ``setting``
    (``KernelOptions.tma``): None automatic (CUDA, compute capability >= 9, fp16/bf16, head dim 64 or 128, aligned
    strides); True / False force (True still needs the alignment TMA requires; the interpreter runs it too)."""
    first = tensors[0]
    if setting is False or not aligned(*tensors):
        return False
    if setting is True:
        return first.is_cuda or _interpreting()
    if not first.is_cuda or _interpreting() or first.dtype not in (torch.float16, torch.bfloat16):
        return False
    if first.shape[-1] not in AUTO_HEAD_DIMS:
        return False
    return compute_major(first.device) >= 9


def _torch_alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Descriptor scratch, called at every launch of a kernel that builds descriptors on the device."""
    return torch.empty(size, dtype=torch.int8, device="cpu" if _interpreting() else "cuda")


def ensure_allocator() -> None:
    """Install a torch-backed allocator for device-side descriptors unless the program has set one."""
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # other Triton layouts: set ours
        pass
    triton.set_allocator(_torch_alloc)
