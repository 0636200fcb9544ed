"""``hf-sparsek eval {ppl,needle,layers,selection,calibrate,sensitivity}``: long-context evaluation, sparse vs dense,
with JSON, markdown and plots.

The defaults need no model hub: SmolLM2-135M (GGUF from PyPI, converted once) on the Shakespeare plays, short
contexts, so ``hf-sparsek eval ppl`` finishes in a few minutes on a 2-core CPU. At 1K-2K tokens the shipped default
pattern (tuned for 8K-32K) is still mostly dense (87% / 58% density), so the CPU demo adds two short-context
patterns (sink 64 + window 256, and window 256 alone, in 64-token blocks) to show sparsity at work.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import TYPE_CHECKING, Any

from hf_sparsek.cli import non_negative_int, positive_int
from hf_sparsek.model_support import check_positions

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2-135m"
DEMO_PATTERNS = [
    "dense",
    "default",
    '{"block_size": 64, "sink_tokens": 64, "window": 256}',
    '{"block_size": 64, "window": 256}',
]


NEEDLE_PATTERNS = ["dense", "default", '{"block_size": 64, "window": 256}']


def _ints(text: str) -> list[int]:
    """argparse type: comma-separated token counts such as ``1K,2K,4096`` (K = 1024), each >= 2."""
    out = []
    for part in text.split(","):
        word = part.strip().lower()
        mult = 1024 if word.endswith("k") else 1
        try:
            value = float(word.rstrip("k")) * mult
        except ValueError:
            value = float("nan")
        if not value.is_integer() or value < 2:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated lengths >= 2 tokens such as 1K,2K,4096; got {part.strip()!r} in {text!r}"
            )
        out.append(int(value))
    return out


def _counts(text: str) -> list[int]:
    """argparse type: comma-separated counts >= 0 such as ``0,3,7``."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated counts >= 0 such as 0,3,7; got {text!r}")
    return values


def _fractions(text: str) -> list[float]:
    """argparse type: comma-separated depths in [0, 1] such as ``0.1,0.5,0.9``."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in [0, 1] such as 0.1,0.5,0.9; got "
                                         f"{text!r}")
    return values


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="offline name (smollm2-135m, gemma3-270m), hub id or local checkpoint (default %(default)s)")
    p.add_argument("--patterns", nargs="+", default=None,
                   help="'dense', 'default' (the model type's shipped file), preset names, JSON strings or files")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                   help="sparse attention backend (auto: Triton on CUDA, reference on CPU)")
    p.add_argument("--out", default="results/eval", help="folder for JSON, markdown and PNG (default %(default)s)")
    p.add_argument("--cache-dir", default=None, help="cache for converted models/data (default $HF_SPARSEK_CACHE "
                   "or ~/.cache/hf_sparsek)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="shakespeare",
                   help="'shakespeare' (offline plays), a .txt file/folder, or a datasets name (default %(default)s)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--split", default="test")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--max-documents", type=positive_int, default=None)


def register(subparsers: Any) -> None:
    """Add ``eval`` with sub-subcommands ``ppl``, ``needle``, ``layers``, ``selection``, ``calibrate`` and
    ``sensitivity`` to the ``hf-sparsek`` parser."""
    ev = subparsers.add_parser("eval", help="long-context evaluation: perplexity, needle retrieval, per-layer error")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    ppl = sub.add_parser("ppl", help="perplexity at several context lengths, dense vs patterns")
    _common(ppl)
    _data_args(ppl)
    ppl.add_argument("--contexts", type=_ints, default=[1024, 2048], help="e.g. 1K,2K,4K (default 1K,2K)")
    ppl.add_argument("--max-tokens", type=non_negative_int, default=2048,
                     help="scored tokens per (context, pattern), as full windows (>= 1); 0 = every token of every "
                          "document (default %(default)s)")
    ppl.add_argument("--stride", type=positive_int, default=None,
                     help="window stride (default: the window, no overlap)")
    ppl.set_defaults(func=cmd_ppl)

    needle = sub.add_parser("needle", help="passkey retrieval accuracy per (length, depth)")
    _common(needle)
    needle.add_argument("--lengths", type=_ints, default=[1024, 2048])
    needle.add_argument("--depths", type=_fractions, default=[0.1, 0.5, 0.9])
    needle.add_argument("--trials", type=positive_int, default=1, help="passkeys per (length, depth) (default 1)")
    needle.add_argument("--seed", type=int, default=0)
    needle.add_argument("--answer-check", choices=["generate", "forward"], default="generate",
                        help="generate: model.generate() with its cache, as a user runs it (default); forward: one "
                             "teacher-forced forward (cheaper; equal for dense and static patterns, not for dynamic "
                             "selection, whose decode steps choose tiles per query row)")
    needle.add_argument("--recall", action="store_true",
                        help="also measure, per layer and query head, the share of the last prompt row's dense "
                             "attention on the needle that each pattern's selection keeps (where a miss is lost)")
    needle.add_argument("--recall-activations", choices=["dense", "sparse"], default="dense",
                        help="--recall: score each pattern on one dense forward's q and k (default), or on its own "
                             "sparse forward's (what the sparse layers below a layer make of the prompt)")
    needle.set_defaults(func=cmd_needle)

    layers = sub.add_parser("layers", help="per-layer attention-output error and logit KL, pattern vs dense")
    _common(layers)
    _data_args(layers)
    layers.add_argument("--seq-len", type=positive_int, default=2048)
    layers.add_argument("--isolate", action="store_true",
                        help="also measure the KL with only one layer sparse at a time (one forward per layer)")
    layers.set_defaults(func=cmd_layers)

    selection = sub.add_parser("selection", help="per layer and KV head: attention mass the selected blocks cover, "
                               "beside the oracle (most true mass) at the same tile budget")
    _common(selection)
    _data_args(selection)
    selection.add_argument("--seq-len", type=positive_int, default=2048)
    selection.add_argument("--local-blocks", type=non_negative_int, default=2,
                           help="most recent blocks the oracle always keeps, besides the sink block (default 2)")
    selection.set_defaults(func=cmd_selection)

    calib = sub.add_parser("calibrate", help="per-layer top-k budgets: move a uniform budget to the layers where a "
                           "tile buys the most attention mass; writes a pattern file (ModelSparsity). Maximises mass "
                           "covered, which on SmolLM2 raised perplexity (docs/evaluation.md): measure before use")
    _calibration_args(calib, "the uniform pattern (JSON or file, with topk_blocks): its selector ranks the tiles and "
                      "its density is the target unless --density is given", windows=2)
    calib.add_argument("--max-topk", type=positive_int, default=None,
                       help="largest budget a layer may get (default: 4x the pattern's topk_blocks)")
    calib.add_argument("--density", type=float, default=None,
                       help="mean density over the layers to reach (default: the uniform pattern's)")
    calib.set_defaults(func=cmd_calibrate)

    sens = sub.add_parser("sensitivity", help="per-layer patterns by measured sensitivity: each candidate's final-"
                          "logit KL with only that layer changed, then the least summed KL under a mean density; "
                          "writes one pattern file (ModelSparsity) per density")
    _calibration_args(sens, "the base pattern (JSON or file): its sink, block, selector; its density is the target "
                      "unless --densities is given", windows=1)
    sens.add_argument("--topks", type=_counts, default=None,
                      help="candidate top-k budgets, e.g. 0,3,7 (default: 0 and the pattern's own)")
    sens.add_argument("--window-sizes", type=_ints, default=None,
                      help="candidate windows in tokens, e.g. 256,512 (default: the pattern's own)")
    sens.add_argument("--no-dense-heads", action="store_true", help="no candidates with one KV head dense")
    sens.add_argument("--densities", type=_fractions, default=None,
                      help="mean densities over the full-attention layers to allocate, e.g. 0.25,0.125")
    sens.set_defaults(func=cmd_sensitivity)


def _calibration_args(p: argparse.ArgumentParser, pattern_help: str, windows: int) -> None:
    """What the offline calibrations share: model and data, the pattern they start from, how much text they read."""
    _common(p)
    _data_args(p)
    p.add_argument("--pattern", required=True, help=pattern_help)
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--windows", type=positive_int, default=windows,
                   help=f"windows of --seq-len tokens (default {windows})")


def _write_pattern_file(path: str, sparsity: Any) -> None:
    """A chosen ModelSparsity as a pattern file (for --patterns, set_pattern or a per-model file)."""
    from hf_sparsek.patterns import as_model_sparsity

    with open(path, "w", encoding="utf-8") as f:
        f.write(as_model_sparsity(sparsity).to_json() + "\n")
    print(f"[hf-sparsek] pattern file (use with --patterns, or as a per-model file): {path}")


def _setup(args: argparse.Namespace) -> tuple[Any, Any, torch.device, torch.dtype, str]:
    import torch

    import hf_sparsek

    from .modeling import load_model, parse_dtype, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    _check_patterns(args)
    start = time.perf_counter()
    model, tok, path = load_model(args.model, device, dtype, args.cache_dir)
    print(f"[hf-sparsek] loaded {args.model} ({path}) on {device} in {time.perf_counter() - start:.1f}s", flush=True)
    if args.backend == "triton":  # refuse now, not after the dense pass
        from hf_sparsek.ops import triton_unsupported_reason

        config = getattr(model.config, "text_config", None) or model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        probe = torch.zeros(1, 1, 16, head_dim, device=device, dtype=dtype)
        reason = triton_unsupported_reason(probe, probe, probe)
        if reason is not None:
            raise ValueError(f"--backend triton cannot run here: {reason}")
    hf_sparsek.set_settings(backend=args.backend)  # process-wide: only once the choice is known to run
    os.makedirs(args.out, exist_ok=True)
    return model, tok, device, dtype, path


def _check_patterns(args: argparse.Namespace) -> None:
    """Refuse a malformed ``--patterns`` entry before the model loads (a large one takes minutes): every entry but
    "default", which resolves from the model's config, is parsed as :func:`_specs` will parse it."""
    from .modeling import parse_patterns

    names = [name for name in (getattr(args, "patterns", None) or []) if name != "default"]
    if names:
        parse_patterns(names, None)


def bos_id(tok: Any) -> int | None:
    """The BOS id when the tokenizer itself prepends one (Gemma, Llama 3), else None (SmolLM2, GPT-2)."""
    if tok is None or tok.bos_token_id is None:
        return None
    ids = tok("a")["input_ids"]
    return tok.bos_token_id if ids and ids[0] == tok.bos_token_id else None


def _encode(tok: Any):
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


def _specs(args: argparse.Namespace, model: Any, default: list[str]) -> list:
    from hf_sparsek.model_defaults import default_key

    from .modeling import parse_patterns, text_config

    names = args.patterns or default
    if "dense" not in names:
        names = ["dense", *names]
    return parse_patterns(names, default_key(text_config(model)))


def _meta(args: argparse.Namespace, model: Any, path: str, device: torch.device, dtype: torch.dtype,
          specs: list) -> dict[str, Any]:
    from .modeling import environment

    return {"command": args.eval_command, "model": args.model, "model_path": path,
            "model_type": getattr(model.config, "model_type", None),
            "patterns": [s.to_dict() for s in specs], "environment": environment(device, dtype),
            "arguments": {k: v for k, v in vars(args).items() if k != "func"}}


def _write(args: argparse.Namespace, name: str, data: dict[str, Any], table: str) -> None:
    from .modeling import dump_json

    base = os.path.join(args.out, name)
    dump_json(base + ".json", data)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table)
    print(f"[hf-sparsek] wrote {base}.json and {base}.md")


def _tag(args: argparse.Namespace) -> str:
    return os.path.basename(str(args.model).rstrip("/")).replace("/", "_")


def cmd_ppl(args: argparse.Namespace) -> int:
    from .offline import load_documents
    from .ppl import run_ppl
    from .report import ppl_table

    model, tok, device, dtype, path = _setup(args)
    specs = _specs(args, model, DEMO_PATTERNS)
    docs_text = load_documents(args.data, args.text_column, args.split, args.dataset_config, args.max_documents,
                               args.cache_dir)
    encode = _encode(tok)
    docs = [encode(d) for d in docs_text]
    check_positions(model.config, max(args.contexts), "--contexts")
    start = time.perf_counter()
    rows = run_ppl(model, docs, args.contexts, specs, device, bos_id(tok), args.max_tokens or None, args.stride)
    data = {**_meta(args, model, path, device, dtype, specs), "documents": len(docs),
            "document_tokens": sum(map(len, docs)), "seconds": time.perf_counter() - start, "results": rows}
    tag = f"ppl_{_tag(args)}"
    _write(args, tag, data, ppl_table(rows))
    if not args.no_plots:
        from .plots import block_layout, ppl_vs_context, ppl_vs_density

        ppl_vs_context(rows, os.path.join(args.out, tag + "_context.png"), f"{args.model}: PPL vs context")
        ppl_vs_density(rows, os.path.join(args.out, tag + "_density.png"), f"{args.model}: PPL vs density")
        for spec in specs:
            if spec.sparsity is not None:
                pattern = spec.sparsity.default.replace(topk_blocks=None)
                block_layout(pattern, max(args.contexts),
                             os.path.join(args.out, f"{tag}_layout_{_safe(spec.label)}.png"))
    return 0


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def cmd_needle(args: argparse.Namespace) -> int:
    from .needle import needle_cases, paired_with_dense, run_needle_prompts
    from .report import needle_table

    model, tok, device, dtype, path = _setup(args)
    check_positions(model.config, max(args.lengths), "--lengths")
    specs = _specs(args, model, NEEDLE_PATTERNS)
    start = time.perf_counter()
    cases = needle_cases(_encode(tok), args.lengths, args.depths, bos_id(tok), args.trials, args.seed)
    rows = run_needle_prompts(model, cases, specs, device, args.answer_check)
    data = {**_meta(args, model, path, device, dtype, specs), "seconds": time.perf_counter() - start,
            "results": rows, "vs_dense": paired_with_dense(rows)}
    markdown = needle_table(rows)
    if args.recall:
        from .needle_recall import needle_recall, needle_recall_table

        data["recall"] = needle_recall(model, cases, specs, activations=args.recall_activations)
        markdown += (f"\n\nNeedle recall ({args.recall_activations} activations): the share of the prompt's last "
                     "row's attention on the needle that each pattern's prefill selection keeps\n\n"
                     + needle_recall_table(data["recall"], rows))
    tag = f"needle_{_tag(args)}"
    _write(args, tag, data, markdown)
    if not args.no_plots:
        from .plots import needle_heatmap

        needle_heatmap(rows, os.path.join(args.out, tag + ".png"), f"{args.model}: passkey retrieval")
    return 0


def _first_window(args: argparse.Namespace, tok: Any, device: torch.device) -> torch.Tensor:
    """(1, seq_len) token ids: the start of the first document with at least ``--seq-len`` tokens."""
    return _windows(args, tok, device, 1)


def cmd_selection(args: argparse.Namespace) -> int:
    from .selection_recall import recall_plot, recall_table, selection_recall

    model, tok, device, dtype, path = _setup(args)
    check_positions(model.config, args.seq_len, "--seq-len")
    specs = [s for s in _specs(args, model, ["default"]) if s.sparsity is not None]
    if not specs:
        raise ValueError("selection compares sparse patterns with the oracle: pass a pattern other than 'dense'")
    ids = _first_window(args, tok, device)
    start = time.perf_counter()
    rows = selection_recall(model, ids, specs, args.local_blocks)
    data = {**_meta(args, model, path, device, dtype, specs), "seq_len": args.seq_len,
            "seconds": time.perf_counter() - start, "results": rows}
    tag = f"selection_{_tag(args)}"
    _write(args, tag, data, recall_table(rows))
    if not args.no_plots:
        recall_plot(rows, os.path.join(args.out, tag + ".png"), f"{args.model}: attention mass covered, "
                    f"{args.seq_len} tokens")
    return 0


def _windows(args: argparse.Namespace, tok: Any, device: torch.device, count: int) -> torch.Tensor:
    """(count, seq_len) token ids: the first ``seq_len`` tokens of the first documents long enough."""
    import torch

    from .offline import load_documents

    docs = load_documents(args.data, args.text_column, args.split, args.dataset_config, args.max_documents,
                          args.cache_dir)
    encode, bos, rows = _encode(tok), bos_id(tok), []
    for text in docs:
        tokens = ([bos] if bos is not None else []) + encode(text)
        if len(tokens) >= args.seq_len:
            rows.append(tokens[: args.seq_len])
        if len(rows) == count:
            return torch.tensor(rows, device=device)
    raise ValueError(f"only {len(rows)} document(s) have {args.seq_len} tokens, {count} window(s) asked; lower "
                     "--seq-len or --windows")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from hf_sparsek.patterns import as_model_sparsity

    from .calibrate import calibrate, calibration_table

    base = as_model_sparsity(args.pattern).default
    if base.topk_blocks is None:
        raise ValueError(f"--pattern needs topk_blocks (the uniform budget to redistribute), got {args.pattern!r}")
    if args.density is not None and not 0.0 < args.density <= 1.0:
        raise ValueError(f"--density must be in (0, 1], got {args.density}")
    model, tok, device, dtype, path = _setup(args)
    check_positions(model.config, args.seq_len, "--seq-len")
    ids = _windows(args, tok, device, args.windows)
    start = time.perf_counter()
    result = calibrate(model, ids, base, args.max_topk or 4 * base.topk_blocks, args.density)
    tag = f"calibrate_{_tag(args)}_{args.seq_len}"
    data = {**_meta(args, model, path, device, dtype, []), "seq_len": args.seq_len, "windows": args.windows,
            "seconds": time.perf_counter() - start, **result}
    _write(args, tag, data, calibration_table(result))
    _write_pattern_file(os.path.join(args.out, tag + "_pattern.json"), result["sparsity"])
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from hf_sparsek.describe import kv_head_count, pattern_density
    from hf_sparsek.patterns import as_model_sparsity

    from .modeling import text_config
    from .sensitivity import calibrate_by_sensitivity, candidate_choices, sensitivity_table

    base = as_model_sparsity(args.pattern).default
    if base.is_dense:
        raise ValueError(f"--pattern must be sparse (sink, window or top-k), got {args.pattern!r}")
    topks = args.topks if args.topks is not None else sorted({0, base.topk_blocks or 0})
    model, tok, device, dtype, path = _setup(args)
    check_positions(model.config, args.seq_len, "--seq-len")
    heads = kv_head_count(text_config(model))
    choices = candidate_choices(base, topks, args.window_sizes, kv_heads=heads,
                                dense_head_choices=not args.no_dense_heads)
    densities = args.densities or [pattern_density(base, args.seq_len, heads)]
    ids = _windows(args, tok, device, args.windows)
    start = time.perf_counter()
    result = calibrate_by_sensitivity(model, ids, choices, densities, uniform=base)
    tag = f"sensitivity_{_tag(args)}_{args.seq_len}"
    data = {**_meta(args, model, path, device, dtype, []), "seq_len": args.seq_len, "windows": args.windows,
            "seconds": time.perf_counter() - start, **result}
    tables = [f"## Target density {a['target_density']:.4f}\n\n{sensitivity_table(result, a)}"
              for a in result["allocations"]]
    _write(args, tag, data, "\n\n".join(tables))
    for alloc in result["allocations"]:
        _write_pattern_file(os.path.join(args.out, f"{tag}_pattern_{alloc['target_density']:.4f}.json"),
                            alloc["sparsity"])
    return 0


def cmd_layers(args: argparse.Namespace) -> int:

    from .layers import compare_layers, isolate_layers
    from .report import layers_table

    model, tok, device, dtype, path = _setup(args)
    check_positions(model.config, args.seq_len, "--seq-len")
    specs = [s for s in _specs(args, model, ["default"]) if s.sparsity is not None]
    ids = _first_window(args, tok, device)
    results, tables = [], []
    for spec in specs:
        res = compare_layers(model, ids, spec)
        iso = isolate_layers(model, ids, spec) if args.isolate else None
        res["isolated"] = iso
        results.append(res)
        tables.append(layers_table(res, iso))
    data = {**_meta(args, model, path, device, dtype, specs), "results": results}
    _write(args, f"layers_{_tag(args)}", data, "\n\n".join(tables))
    return 0


def main_json(path: str) -> dict[str, Any]:
    """Read a results JSON (helper for scripts and tests)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
