"""``hf-sparsek distill`` (and ``python -m hf_sparsek.learned``): options -> :class:`DistillConfig` -> run.

Why a sibling of ``finetune`` and not a ``finetune`` mode: distillation trains only the scorer, against the frozen
model's dense block attention mass, in its own small loop (no LM loss, no HF Trainer, no LoRA, no packing); its
options (budget, windows, scorer mode) are not the Trainer's. It reuses finetune's model and data resolution.
Imports no torch at parse time, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from hf_sparsek.cli import CliParser, non_negative_float, non_negative_int, positive_float, positive_int, run_command

from .config import DEFAULT_PATTERN, DistillConfig

MODULE_PROG = "python -m hf_sparsek.learned"
HELP = "distil the learned block selector from a frozen model's dense attention (SparseK scorer)"
_SKIP = {"extra"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``distill`` options; each dest is the DistillConfig field it sets, defaults from the dataclass."""
    d = {f.name: f.default for f in fields(DistillConfig)}
    p.add_argument("--model", required=True, help="local checkpoint dir, offline name (smollm2-135m) or hub id")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--pattern", default=None, help="JSON object / file or preset with topk_blocks (default: the "
                   "model's own where it already selects with a learned scorer, else "
                   f"{json.dumps(DEFAULT_PATTERN)})")
    p.add_argument("--train-data", default=d["train_data"], help="token file or text source (shakespeare)")
    p.add_argument("--heldout-docs", type=non_negative_int, default=d["heldout_docs"],
                   help="hold out the last N documents for the recall measurement")
    p.add_argument("--seq-len", type=positive_int, default=d["seq_len"])
    p.add_argument("--train-windows", type=positive_int, default=d["train_windows"],
                   help="training windows (one dense pass each gives the targets)")
    p.add_argument("--eval-windows", type=non_negative_int, default=d["eval_windows"])
    p.add_argument("--steps", type=positive_int, default=d["steps"])
    p.add_argument("--query-tile-stride", type=positive_int, default=d["query_tile_stride"],
                   help="targets of every N-th query tile only (cheaper dense passes on CPU)")
    p.add_argument("--no-compare-library", dest="compare_library", action="store_false",
                   help="skip measuring the package's training-free selectors on the held-out windows")
    p.add_argument("--lr", type=positive_float, default=d["lr"])
    p.add_argument("--mode", choices=("query", "key"), default=d["mode"],
                   help="query: query-aware gate (default); key: query-independent score of pooled keys")
    p.add_argument("--query-rows", choices=("previous", "own"), default=d["query_rows"],
                   help="rows a query tile's feature pools: previous (the tile before it; every cut of a sequence "
                   "into calls selects alike; default) or own (its own rows so far: retrieval rows can point at "
                   "their far tile)")
    p.add_argument("--coverage-weight", type=non_negative_float, default=d["coverage_weight"],
                   help="weight of the soft SPARSEK coverage term beside the KL")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=d["dtype"],
                   help="dtype of the frozen model's dense passes")
    p.add_argument("--log-every", type=positive_int, default=d["log_every"])
    p.add_argument("--save-every", type=positive_int, default=d["save_every"])
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint")
    p.add_argument("--init-scorer", default=None, metavar="PATH",
                   help="start from this scorer (file or folder, e.g. a LoRA fine-tune's final/): re-fit it to the "
                   "adapted model")
    p.add_argument("--no-save-model", dest="save_model", action="store_false",
                   help="write only the scorer file, not final/ with the model")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--seed", type=non_negative_int, default=d["seed"])
    p.add_argument("--bos-token-id", type=non_negative_int, default=None,
                   help="prepend this token id to every window (models trained with a BOS, e.g. Gemma)")


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    return DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig) if f.name not in _SKIP})


def run(args: argparse.Namespace) -> int:
    from .distill import distill

    metrics = distill(config_from_args(args)).metrics
    losses = metrics["losses"]  # empty when --resume finds the run already finished
    summary = {"final_loss": losses[-1] if losses else None, "train_seconds": metrics["train_seconds"],
               "capture_seconds": metrics["capture_seconds"]}
    if "heldout" in metrics:
        summary["heldout_coverage"] = metrics["heldout"]["coverage"]
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add ``distill`` to the ``hf-sparsek`` command line."""
    p = subparsers.add_parser("distill", help=HELP)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = CliParser(prog=MODULE_PROG, description=HELP)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return run_command(parser.parse_args(argv), parser.prog)
