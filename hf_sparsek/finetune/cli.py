"""``hf-sparsek finetune`` (and ``python -m hf_sparsek.finetune``): options -> :class:`FinetuneConfig` -> run.

Imports no torch or transformers (:func:`finetune` imports them when it runs), so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from hf_sparsek.cli import (
    CliParser,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
)

from .config import ATTN_CHOICES, DATA_ORDERS, DTYPE_CHOICES, FIELD_NAMES, FinetuneConfig

MODULE_PROG = "python -m hf_sparsek.finetune"
DEFAULTS = {f.name: f.default for f in fields(FinetuneConfig)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``finetune`` options; each one's dest is the :class:`FinetuneConfig` field it sets, with its default."""
    p.add_argument("--model", required=True, help="local checkpoint dir or offline name (smollm2-135m, gemma3-270m)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--attn", choices=ATTN_CHOICES, default=DEFAULTS["attn"],
                   help="sparsek, or sdpa/eager: dense baseline")
    p.add_argument("--pattern", default=DEFAULTS["pattern"],
                   help="preset name, JSON string or JSON file (default: the model's)")
    p.add_argument("--train-data", default=DEFAULTS["train_data"],
                   help="token file (.pt/.json: list of token-id lists), a text source name, or 'synthetic'")
    p.add_argument("--eval-data", default=DEFAULTS["eval_data"],
                   help="held-out token file or text source (default: --heldout-docs)")
    p.add_argument("--heldout-docs", type=non_negative_int, default=DEFAULTS["heldout_docs"],
                   help="hold out the last N training documents for eval")
    p.add_argument("--synthetic-docs", type=positive_int, default=DEFAULTS["synthetic_docs"])
    p.add_argument("--seq-len", type=positive_int, default=DEFAULTS["seq_len"],
                   help="training length: documents are packed to it")
    p.add_argument("--eval-seq-len", type=positive_int, default=DEFAULTS["eval_seq_len"],
                   help="evaluation window (default: --seq-len)")
    p.add_argument("--eval-steps", type=non_negative_int, default=DEFAULTS["eval_steps"],
                   help="held-out perplexity every N steps (0: only before/after)")
    p.add_argument("--eval-max-windows", type=positive_int, default=DEFAULTS["eval_max_windows"],
                   help="cap on evaluation windows (speed)")
    p.add_argument("--no-eval-before", dest="eval_before", action="store_false")
    p.add_argument("--eval-also-attn", choices=ATTN_CHOICES, default=DEFAULTS["eval_also_attn"],
                   help="before/after, also evaluate with this attention (same weights), e.g. sparsek for a dense run")
    p.add_argument("--eval-pattern", default=DEFAULTS["eval_pattern"],
                   help="pattern for --eval-also-attn sparsek (default: --pattern)")
    p.add_argument("--max-steps", type=positive_int, default=DEFAULTS["max_steps"])
    p.add_argument("--data-order", choices=DATA_ORDERS, default=DEFAULTS["data_order"],
                   help="row order (sequential: same rows per global batch on any number of GPUs, to compare runs)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"])
    p.add_argument("--grad-accum", type=positive_int, default=DEFAULTS["grad_accum"])
    p.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"])
    p.add_argument("--scheduler", default=DEFAULTS["scheduler"])
    p.add_argument("--warmup-steps", type=non_negative_int, default=DEFAULTS["warmup_steps"])
    p.add_argument("--weight-decay", type=non_negative_float, default=DEFAULTS["weight_decay"])
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=DEFAULTS["dtype"], help="mixed-precision compute dtype")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--lora-r", type=non_negative_int, default=DEFAULTS["lora_r"],
                   help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=positive_int, default=DEFAULTS["lora_alpha"])
    p.add_argument("--lora-targets", default=DEFAULTS["lora_targets"])
    p.add_argument("--no-merge", dest="merge_lora", action="store_false",
                   help="LoRA: save only the adapter, not the merged model")
    p.add_argument("--train-only-pattern", action="store_true",
                   help="freeze the model and train only the pattern's own parameters (errors: none are the model's; "
                   "a learned selector's scorer trains with hf-sparsek distill)")
    p.add_argument("--single-documents", action="store_true",
                   help="rows cut from single documents, not packed across them (always so under selector 'learned')")
    p.add_argument("--attention-dropout-zero", action="store_true", help="set the config's attention_dropout to 0")
    p.add_argument("--logging-steps", type=positive_int, default=DEFAULTS["logging_steps"])
    p.add_argument("--save-steps", type=non_negative_int, default=DEFAULTS["save_steps"],
                   help="checkpoint every N steps (0: none)")
    p.add_argument("--save-total-limit", type=positive_int, default=DEFAULTS["save_total_limit"])
    p.add_argument("--resume", default=DEFAULTS["resume"], help="'last' or a checkpoint dir to resume from")
    p.add_argument("--allow-reference", action="store_true",
                   help="on CUDA, train sparse layers with the PyTorch reference where the kernel cannot run them")
    p.add_argument("--cpu", action="store_true", help="train on CPU even where CUDA is available")
    p.add_argument("--seed", type=non_negative_int, default=DEFAULTS["seed"])


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of parsed ``finetune`` options (other attributes, such as ``func``, are ignored);
    a field's ValueError names its option (``--eval-pattern`` for ``FinetuneConfig.eval_pattern``)."""
    try:
        return FinetuneConfig(**{name: getattr(args, name) for name in FIELD_NAMES})
    except ValueError as err:
        text = str(err)
        for name in FIELD_NAMES:
            prefix = f"FinetuneConfig.{name}="
            if text.startswith(prefix):
                raise ValueError(f"--{name.replace('_', '-')} {text[len(prefix):]}") from err
        raise


def run(args: argparse.Namespace) -> int:
    """Run the fine-tune of parsed options; prints the loss, throughput and held-out perplexities as JSON."""
    from .train import finetune

    metrics = finetune(config_from_args(args)).metrics
    keys = ("train_loss", "train_tokens_per_second", "train_seconds")
    print(json.dumps({k: metrics[k] for k in keys} | {
        k: v["ppl"] for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, dict)}, indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add ``finetune`` to the ``hf-sparsek`` command line."""
    p = subparsers.add_parser("finetune", help="fine-tune a causal LM with sparse attention (HF Trainer)")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hf_sparsek.finetune``: the same options and one-line errors as ``hf-sparsek finetune``."""
    parser = CliParser(prog=MODULE_PROG, description="fine-tune a causal LM with sparse attention (HF Trainer)")
    add_arguments(parser)
    parser.set_defaults(func=run)
    return run_command(parser.parse_args(argv), parser.prog)
