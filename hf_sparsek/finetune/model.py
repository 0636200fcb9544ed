"""Loading the model a fine-tune trains: resolve ``--model``, check it, load it with the chosen attention and
pattern, optionally wrap it in a LoRA adapter."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .checks import check_attention_dropout, check_dtype, check_kernel, check_model_type, check_seq_len
from .config import ATTN_CHOICES

# torch, transformers and peft are imported inside the functions: building the command line stays light.
if TYPE_CHECKING:
    import torch

    import hf_sparsek


def resolve_model_path(name: str) -> str:
    """What ``from_pretrained`` loads for ``--model``: a local folder as is, an offline name converted once (through
    hf_sparsek.eval.offline), else a hub id as is. ValueError for a path that does not exist."""
    from hf_sparsek.eval.offline import OFFLINE_MODELS, is_offline_model, resolve_model

    if os.path.isdir(name):
        return name
    if is_offline_model(name):
        return str(resolve_model(name))
    if os.path.isabs(os.path.expanduser(name)) or name.startswith((".", "~")) or os.path.exists(name):
        raise ValueError(f"--model {name!r}: no such checkpoint folder; give a local checkpoint folder, an offline "
                         f"name ({', '.join(OFFLINE_MODELS)}) or a hub id")
    return name


def load_model(
    model_path: str,
    attn: str = "sparsek",
    pattern: str | dict | hf_sparsek.SparsePattern | hf_sparsek.ModelSparsity | None = None,
    seq_len: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    attention_dropout_zero: bool = False,
    allow_reference: bool = False,
) -> torch.nn.Module:
    """Load a causal LM in fp32 weights (the Trainer's autocast does bf16/fp16) with the chosen attention.

    Every check against the model runs first (model type, ``seq_len``, dtype on ``device``, the kernel, attention
    dropout, the pattern): a ValueError says what to change.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import hf_sparsek

    if attn not in ATTN_CHOICES:
        raise ValueError(f"attn={attn!r}; supported: {ATTN_CHOICES}")
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"cannot read a transformers config from {model_path!r}: {exc}") from exc
    check_model_type(config)
    if seq_len is not None:
        check_seq_len(config, seq_len)
    check_dtype(dtype, device)
    if attn == "sparsek":
        check_kernel(config, dtype, device, allow_reference)
    if attention_dropout_zero and hasattr(config, "attention_dropout"):
        config.attention_dropout = 0.0
    check_attention_dropout(config, attn)
    if attn == "sparsek" and pattern is not None:
        set_pattern(config, pattern)  # validates: ModelSparsity raises on bad fields
    elif attn == "sparsek":
        hf_sparsek.model_sparsity(config)  # validates the stored pattern (or writes the default)
    config.use_cache = False
    return AutoModelForCausalLM.from_pretrained(model_path, config=config, attn_implementation=attn,
                                                dtype=torch.float32)


def set_pattern(target: Any, pattern: Any, option: str = "--pattern") -> Any:
    """``hf_sparsek.set_pattern`` for a command-line string (an error names ``option``) or a pattern object."""
    if isinstance(pattern, str):
        from hf_sparsek.cli import apply_pattern

        return apply_pattern(target, pattern, option)
    import hf_sparsek

    return hf_sparsek.set_pattern(target, pattern)


def add_lora(model: torch.nn.Module, r: int, alpha: int, targets: str, dropout: float = 0.0) -> torch.nn.Module:
    """Wrap ``model`` with a peft LoRA adapter on the named linear layers (``targets``: comma-separated names)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ValueError("LoRA needs peft: pip install 'hf-sparsek[train]'") from exc
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=[t.strip() for t in targets.split(",") if t],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def pattern_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Trainable parameters of the model that belong to the sparsity pattern itself. None exist: a learned
    selector's scorer lives outside the model's modules and trains with ``hf-sparsek distill``."""
    return [p for name, p in model.named_parameters() if "sparsek" in name.lower()]


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model
