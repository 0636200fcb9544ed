"""Which inputs the kernels take: the one answer to "can the kernels run these inputs, and if not why".

The op's backend decision (``hf_sparsek.ops``) and the launch wrapper's error (``hf_sparsek.triton_ops``) both ask
here. Today the Gluon-or-Triton choice, splits, streams and autotuning are still made inside the launchers from
module settings (docs/how-it-works.md says where they are headed: a frozen options object decided here).
"""

from __future__ import annotations

import os

import torch

from .attention_fwd import FWD_CONFIGS

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_mode() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
