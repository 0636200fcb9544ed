"""Checks of a fine-tune against the model and the device, each a ValueError that says what to change.

They run in :func:`hf_sparsek.finetune.model.load_model`, before any weights load, so a run that cannot train fails
in seconds rather than after the Trainer starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import DTYPE_CHOICES

# torch and transformers are imported inside the functions: building the command line stays light.
if TYPE_CHECKING:
    import torch


def check_model_type(config: Any) -> type:
    """The causal-LM class of ``config``; ValueError when transformers has none or it cannot take "sparsek"."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"model type {model_type!r} has no causal-LM class in transformers; finetune supports decoder-only "
            f"causal LMs such as llama, mistral, qwen2, qwen3, gemma3_text, phi3"
        )
    import transformers

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
    if cls is None or not getattr(cls, "_supports_attention_backend", False):
        raise ValueError(
            f"model type {model_type!r} ({MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}) does not route attention "
            "through transformers' AttentionInterface, so attn_implementation='sparsek' cannot run it"
        )
    return cls


def check_seq_len(config: Any, seq_len: int, what: str = "seq_len") -> None:
    """ValueError when a training (or evaluation) length exceeds the model's position range."""
    from ..model_support import check_positions

    check_positions(config, seq_len, what)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")


def check_dtype(dtype: str, device: str) -> None:
    """ValueError for a training precision this device (or the sparse kernels) cannot train in."""
    import torch

    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype={dtype!r}; supported: {DTYPE_CHOICES}")
    if device == "cuda":
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"bf16 was requested but this GPU ({torch.cuda.get_device_name()}) has no bf16 support; use "
                "--dtype fp16 or fp32"
            )
    elif dtype == "fp16":
        raise ValueError("fp16 mixed-precision training needs a CUDA device; on CPU use --dtype bf16 or fp32")


def check_kernel(config: Any, dtype: str, device: str, allow_reference: bool = False) -> str:
    """Which backend will train the sparse layers: "triton" on CUDA when the kernel takes this head dim and dtype.

    On CUDA a model the kernel cannot run raises (the PyTorch reference is exact but far too slow and big to train
    at long lengths) unless ``allow_reference``; on CPU the reference is the only backend and is returned as such.
    """
    import torch

    if device != "cuda":
        return "reference"
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    reason = _kernel_reason(head_dim, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    if reason is None:
        return "triton"
    if not allow_reference:
        raise ValueError(
            f"the sparse attention kernel cannot train this model in {dtype}: {reason}. Use another --dtype, "
            "--attn sdpa, or --allow-reference to train with the (slow, exact) PyTorch reference"
        )
    return "reference"


def _kernel_reason(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the Triton kernel cannot run (head_dim, dtype) on this GPU, or None."""
    import torch

    from hf_sparsek.ops import triton_unsupported_reason

    probe = torch.empty(1, 1, 1, head_dim, dtype=dtype, device="cuda")
    return triton_unsupported_reason(probe, probe, probe)


def check_attention_dropout(config: Any, attn: str) -> None:
    """Sparse attention has no dropout: refuse rather than silently train without it."""
    p = float(getattr(config, "attention_dropout", 0.0) or 0.0)
    if attn == "sparsek" and p > 0:
        raise ValueError(
            f"the model config has attention_dropout={p}; attn_implementation='sparsek' has no attention dropout. "
            "Set --attention-dropout-zero to train with 0"
        )
