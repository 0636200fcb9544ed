"""Command line: ``hf-sparsek describe | eval {ppl,needle,layers,selection} | finetune | distill``.

Subcommands live beside their code: ``hf_sparsek.eval.cli.register(subparsers)`` adds ``eval``,
``hf_sparsek.finetune.cli.register(subparsers)`` adds ``finetune``. Building the parser imports no torch or
transformers (those modules import them inside the functions that run a command), so ``--help`` answers at once.

Every error a user can cause prints ONE line, ``hf-sparsek <command>: error: <what is wrong>``, and exits with 2:
bad options and numbers (argparse), bad patterns, missing files, unknown models, failed downloads.
``HF_SPARSEK_DEBUG=1`` raises instead, with the traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

PROG = "hf-sparsek"
DEBUG_ENV = "HF_SPARSEK_DEBUG"
EXIT_ERROR = 2


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (no usage block) with exit code 2.

    ``add_subparsers`` creates its subparsers with this class too, so ``eval`` and ``finetune`` behave the same.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def apply_pattern(model_or_config: Any, value: str, option: str = "--pattern") -> Any:
    """``hf_sparsek.set_pattern`` for a command-line value (preset name, JSON object or JSON file).

    Returns the ModelSparsity; ValueError naming the option and the accepted forms for anything else.
    """
    import hf_sparsek

    try:
        return hf_sparsek.set_pattern(model_or_config, value)
    except (ValueError, TypeError, OSError) as err:
        raise ValueError(
            f"{option} {value!r}: {one_line(err)} (accepted: a preset {sorted(hf_sparsek.PRESETS)}, a JSON object "
            "such as '{\"sink_tokens\": 128, \"window\": 1024}', or a JSON file)"
        ) from err


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(err).split()) or type(err).__name__


def _describe(args: argparse.Namespace) -> int:
    import hf_sparsek
    from hf_sparsek.eval.offline import resolve_config

    config = resolve_config(args.model, args.cache_dir)
    if args.pattern is not None:
        apply_pattern(config, args.pattern)
    print(hf_sparsek.describe(config, seq_len=args.seq_len))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-sparsek`` parser with every subcommand; imports no torch or transformers."""
    from hf_sparsek.eval.cli import register as register_eval
    from hf_sparsek.finetune.cli import register as register_finetune
    from hf_sparsek.learned.cli import register as register_distill

    parser = CliParser(prog=PROG, description="Sparse attention for HuggingFace Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    describe = sub.add_parser("describe", help="print a model's resolved per-layer pattern and density")
    describe.add_argument("model", help="offline name (smollm2-135m, gemma3-270m), hub id or local folder (only its "
                          "config is read)")
    describe.add_argument("--seq-len", type=positive_int, default=8192, help="length for the densities (default "
                          "%(default)s)")
    describe.add_argument("--pattern", default=None, help="preset name, JSON string or JSON file (default: the "
                          "model's stored pattern, else its model type's default)")
    describe.add_argument("--cache-dir", default=None, help="cache of the offline models (default $HF_SPARSEK_CACHE "
                          "or ~/.cache/hf_sparsek)")
    describe.set_defaults(func=_describe)
    register_eval(sub)
    register_finetune(sub)
    register_distill(sub)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    words = [PROG, getattr(args, "command", None), getattr(args, "eval_command", None)]
    return " ".join(w for w in words if w)


def run_command(args: argparse.Namespace, name: str) -> int:
    """Call ``args.func(args)``; an exception prints ``<name>: error: <message>`` on one line and returns 2.

    ``HF_SPARSEK_DEBUG=1`` re-raises it (with the traceback) instead.
    """
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        message = one_line(exc)
        if not isinstance(exc, ValueError):  # our own checks raise ValueError; name anything else
            message = f"{type(exc).__name__}: {message} (set {DEBUG_ENV}=1 for the traceback)"
        print(f"{name}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; an error prints one line to stderr and returns 2 (``HF_SPARSEK_DEBUG=1`` re-raises)."""
    args = build_parser().parse_args(argv)
    return run_command(args, _command_name(args))


if __name__ == "__main__":
    sys.exit(main())
