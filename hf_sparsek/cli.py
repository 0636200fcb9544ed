"""Command line: ``hf-sparsek describe | eval {ppl,needle,layers} | finetune``.

Subcommands live beside their code: ``hf_sparsek.eval.cli.register(subparsers)`` adds ``eval``,
``hf_sparsek.scripts.finetune.register(subparsers)`` adds ``finetune``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _describe(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    import hf_sparsek

    config = AutoConfig.from_pretrained(args.model)
    if args.pattern:
        hf_sparsek.set_pattern(config, args.pattern)
    print(hf_sparsek.describe(config, seq_len=args.seq_len))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sparsek", description="Sparse attention for HuggingFace Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    describe = sub.add_parser("describe", help="print a model's resolved per-layer pattern and density")
    describe.add_argument("model", help="model name or local path (its config is read)")
    describe.add_argument("--seq-len", type=int, default=8192)
    describe.add_argument("--pattern", default=None, help="preset name, JSON string or JSON file")
    describe.set_defaults(func=_describe)
    try:
        from hf_sparsek.eval.cli import register as register_eval
    except ImportError:  # the evaluation package is optional at import time
        register_eval = None
    if register_eval is not None:
        register_eval(sub)
    try:
        from hf_sparsek.scripts.finetune import register as register_finetune
    except ImportError:
        register_finetune = None
    if register_finetune is not None:
        register_finetune(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand. Bad input (ValueError) prints one line to stderr and returns 2, no traceback;
    ``HF_SPARSEK_DEBUG=1`` re-raises it."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        if os.environ.get("HF_SPARSEK_DEBUG") == "1":
            raise
        print(f"hf-sparsek {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
