"""``FinetuneConfig``: every setting of one fine-tune, typed and checked when it is built.

Why a dataclass and not the argparse Namespace: the same run is started from Python
(``finetune(FinetuneConfig(model=..., output_dir=...))``) and from ``hf-sparsek finetune`` (which builds one from
its options), and a bad value fails here, naming the field, before any model is loaded. Checks that need the model
(its position range, the kernel's head dims, the pattern against the model) happen in :func:`load_model`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_sparsek.patterns import ModelSparsity, SparsePattern

ATTN_CHOICES = ("sparsek", "sdpa", "eager")
DTYPE_CHOICES = ("bf16", "fp16", "fp32")
DATA_ORDERS = ("random", "sequential")
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tune: the model, the data, the attention it trains under and the Trainer's settings.

    The fields are ``hf-sparsek finetune``'s options (``--lora-r`` is ``lora_r``; ``--no-merge`` is
    ``merge_lora=False``; ``--no-eval-before`` is ``eval_before=False``; ``--no-gradient-checkpointing`` is
    ``gradient_checkpointing=False``), with the same defaults. Frozen: derive variants with ``dataclasses.replace``.
    """

    model: str
    """Local checkpoint folder, offline name (smollm2-135m, gemma3-270m) or hub id."""
    output_dir: str
    """Where checkpoints, ``loss_log.jsonl``, ``metrics.json`` and ``final/`` go."""
    attn: str = "sparsek"
    """``sparsek``, or ``sdpa`` / ``eager`` for the dense baseline."""
    pattern: str | dict | SparsePattern | ModelSparsity | None = None
    """Preset name, JSON string or file, dict, SparsePattern or ModelSparsity (default: the model's)."""
    train_data: str = "shakespeare"
    """Token file (.pt/.json: a list of token-id lists), a text source name, or ``synthetic``."""
    eval_data: str | None = None
    """Held-out token file or text source (default: the last ``heldout_docs`` training documents)."""
    heldout_docs: int = 0
    synthetic_docs: int = 64
    seq_len: int = 8192
    """Training length: documents are packed to it."""
    eval_seq_len: int | None = None
    """Evaluation window (default: ``seq_len``)."""
    eval_steps: int = 0
    """Held-out perplexity every N steps (0: only before and after)."""
    eval_max_windows: int | None = None
    eval_before: bool = True
    eval_also_attn: str | None = None
    """Before and after, also evaluate the same weights with this attention."""
    eval_pattern: str | dict | SparsePattern | ModelSparsity | None = None
    """Pattern for ``eval_also_attn="sparsek"`` (default: ``pattern``)."""
    max_steps: int = 100
    data_order: str = "random"
    """``sequential``: the same rows per global batch on any number of GPUs (to compare runs)."""
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    dtype: str = "bf16"
    """Mixed-precision compute dtype; the weights stay fp32."""
    gradient_checkpointing: bool = True
    lora_r: int = 0
    """LoRA rank (0: full fine-tuning)."""
    lora_alpha: int = 32
    lora_targets: str = DEFAULT_LORA_TARGETS
    """Comma-separated module names the LoRA adapter wraps."""
    merge_lora: bool = True
    """LoRA: also save the merged model in ``final/`` (the adapter is always saved in ``final/adapter``)."""
    train_only_pattern: bool = False
    single_documents: bool = False
    """Rows cut from single documents instead of packed across them (always so under selector "learned", which
    scores a row as one sequence); to give a dense run the same rows as a learned-selector run."""
    attention_dropout_zero: bool = False
    logging_steps: int = 1
    save_steps: int = 50
    """Trainer checkpoint every N steps (0: none)."""
    save_total_limit: int = 2
    resume: str | None = None
    """``last`` or a checkpoint folder to resume from."""
    allow_reference: bool = False
    """On CUDA, train with the PyTorch reference where the Triton kernel cannot run the model."""
    cpu: bool = False
    """Train on CPU even where CUDA is available."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("model", "output_dir", "train_data", "eval_data", "resume"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        for name in ("model", "output_dir", "train_data", "scheduler", "lora_targets"):
            _text(name, getattr(self, name))
        for name in ("eval_data", "resume"):
            if getattr(self, name) is not None:
                _text(name, getattr(self, name))
        if not [t for t in self.lora_targets.split(",") if t.strip()]:
            _fail("lora_targets", self.lora_targets, "comma-separated module names such as 'q_proj,v_proj'")
        _choice("attn", self.attn, ATTN_CHOICES)
        _choice("dtype", self.dtype, DTYPE_CHOICES)
        _choice("data_order", self.data_order, DATA_ORDERS)
        if self.eval_also_attn is not None:
            _choice("eval_also_attn", self.eval_also_attn, ATTN_CHOICES, allow_none=True)
        for name in ("pattern", "eval_pattern"):
            _pattern(name, getattr(self, name))
        if self.pattern is not None and self.attn != "sparsek":
            _fail("pattern", self.pattern, f"None with attn={self.attn!r} (a pattern applies to attn='sparsek' only; "
                  "to evaluate the dense-trained weights under it, pass eval_also_attn='sparsek' and eval_pattern)")
        if self.eval_pattern is not None and self.eval_also_attn != "sparsek":
            _fail("eval_pattern", self.eval_pattern, "None unless eval_also_attn='sparsek' (the only evaluation it "
                  f"applies to; eval_also_attn is {self.eval_also_attn!r})")
        for name, minimum in (("seq_len", 2), ("synthetic_docs", 1), ("max_steps", 1), ("batch_size", 1),
                              ("grad_accum", 1), ("lora_alpha", 1), ("logging_steps", 1), ("save_total_limit", 1),
                              ("heldout_docs", 0), ("eval_steps", 0), ("warmup_steps", 0), ("lora_r", 0),
                              ("save_steps", 0), ("seed", 0)):
            _int(name, getattr(self, name), minimum)
        for name, minimum in (("eval_seq_len", 2), ("eval_max_windows", 1)):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), minimum)
        _number("lr", self.lr, positive=True)
        _number("weight_decay", self.weight_decay, positive=False)
        for name in ("eval_before", "gradient_checkpointing", "merge_lora", "train_only_pattern",
                     "single_documents", "attention_dropout_zero", "allow_reference", "cpu"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")


FIELD_NAMES = tuple(f.name for f in fields(FinetuneConfig))


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"FinetuneConfig.{name}={value!r}: expected {expected}")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        _fail(name, value, "a non-empty string")


def _choice(name: str, value: Any, choices: tuple[str, ...], allow_none: bool = False) -> None:
    if value not in choices:
        _fail(name, value, f"one of {choices}" + (" or None" if allow_none else ""))


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, f"a whole number >= {minimum}")


def _number(name: str, value: Any, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        _fail(name, value, "a finite number " + ("> 0" if positive else ">= 0"))


def _pattern(name: str, value: Any) -> None:
    from hf_sparsek.patterns import ModelSparsity, SparsePattern

    if value is not None and not isinstance(value, (str, dict, SparsePattern, ModelSparsity)):
        _fail(name, value, "None, a preset name, a JSON string or file, a dict, a SparsePattern or a ModelSparsity")
    if value is not None:  # parsed now, so a typo fails before any model is loaded or step is trained
        from hf_sparsek.model_defaults import resolve_pattern

        try:
            resolve_pattern(value)
        except (ValueError, TypeError, OSError) as err:  # json's decode error is a ValueError
            _fail(name, value, f"a valid pattern ({err})")
