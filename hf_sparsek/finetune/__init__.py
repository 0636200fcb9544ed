"""Fine-tuning with ``attn_implementation="sparsek"`` through the HF Trainer (``hf-sparsek finetune``).

Why: a model fine-tuned under its sparsity pattern loses less perplexity than one that meets the pattern only at
inference, and sparse attention trains at lengths where dense attention is too slow or too big.

What a run does: loads a causal LM with the chosen attention (``sparsek`` with a pattern, or ``sdpa``/``eager`` as
the dense baseline), packs token-id documents to the training length (positions restart per document, no attention
across documents, see :mod:`hf_sparsek.finetune.packing`), trains in full or with LoRA (peft) in bf16 with gradient
checkpointing, evaluates held-out perplexity before, periodically and after, logs the loss to ``loss_log.jsonl`` and
writes resumable Trainer checkpoints. Multi-GPU: ``accelerate launch --config_file scripts/accelerate_ddp.yaml -m
hf_sparsek.finetune ...`` (or ``accelerate_fsdp.yaml``)::

    from hf_sparsek.finetune import FinetuneConfig, finetune, load_finetuned

    result = finetune(FinetuneConfig(model="smollm2-135m", output_dir="runs/smol", seq_len=8192, lora_r=16))
    result.metrics["eval_after"]                       # held-out nll / ppl (with heldout_docs or eval_data)
    model = load_finetuned("runs/smol/final/adapter")  # the adapter on its base, under the pattern it trained with

The final model goes to ``<output_dir>/final``: a full checkpoint (``from_pretrained(final,
attn_implementation="sparsek")`` restores the pattern from ``config.sparsek``), or for LoRA the merged model there
plus the adapter in ``final/adapter`` with ``sparsek_pattern.json`` (see :mod:`hf_sparsek.finetune.checkpoint`).

Modules: ``config`` (FinetuneConfig), ``checks`` (model/device checks), ``model`` (loading, LoRA), ``data``
(documents), ``packing`` (rows), ``evaluation`` (held-out perplexity), ``train`` (the Trainer run), ``checkpoint``
(save and reload), ``cli`` (the command). Importing this package imports no torch or transformers.
"""

from __future__ import annotations

from .checkpoint import PATTERN_FILE, load_finetuned, write_adapter_pattern
from .config import ATTN_CHOICES, DTYPE_CHOICES, FinetuneConfig
from .model import add_lora, load_model
from .train import FinetuneResult, finetune

__all__ = [
    "ATTN_CHOICES", "DTYPE_CHOICES", "PATTERN_FILE", "FinetuneConfig", "FinetuneResult", "add_lora", "finetune",
    "load_finetuned", "load_model", "write_adapter_pattern",
]
