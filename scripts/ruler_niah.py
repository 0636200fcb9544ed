"""RULER needle tasks (lm-evaluation-harness) for dense and sparse patterns on one model, one run.

    python -m scripts.ruler_niah --model smollm2-135m --seq-len 4096 --limit 20 \\
        --patterns dense default '{"block_size": 64, "sink_tokens": 64, "window": 256, "topk_blocks": 3}' \\
        --out scripts/results/ruler_smollm2-135m.json

Needs ``pip install "lm-eval[ruler]>=0.4.13"`` (not a dependency of hf_sparsek: older lm-eval releases do not import
under transformers 5). RULER makes its prompts with the model's own tokenizer (``metadata.tokenizer``: the resolved
model folder, so no hub access); lm-eval's ``HFLM`` runs the loaded model, which ``eval.modeling.apply_pattern``
switches between sdpa (``dense``) and ``attn_implementation="sparsek"`` with each pattern (same syntax as
``hf-sparsek eval``). Every pattern sees the same ``--limit`` samples of each task. Writes JSON (scores, per-sample
correctness, each pattern's density over the layers it covers at ``--seq-len``, seconds) and prints a table.
"""

from __future__ import annotations

import argparse
import time

import torch

from eval.modeling import apply_pattern, layer_densities, load_model, parse_dtype, parse_patterns, resolve_device
from scripts.common import write_json


def _density(model, spec, seq_len: int) -> float | None:
    """Mean over layers of the kept share of causal pairs at ``seq_len`` (dense layers count as 1), or None (dense)."""
    if spec.sparsity is None:
        return None
    values = layer_densities(model.config, spec.sparsity, seq_len)
    return sum(values) / len(values)


def run(args: argparse.Namespace) -> dict:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from hf_sparsek.model_defaults import default_key

    device = resolve_device(args.device)
    model, tok, path = load_model(args.model, device, parse_dtype(args.dtype))
    specs = parse_patterns(args.patterns, default_key(model.config))
    results = []
    for spec in specs:
        apply_pattern(model, spec)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=args.seq_len + args.max_gen_toks,
                  device=str(device))
        start = time.perf_counter()
        out = simple_evaluate(
            model=lm, tasks=args.tasks, limit=args.limit, log_samples=True, bootstrap_iters=0,
            metadata={"max_seq_lengths": [args.seq_len], "tokenizer": path},
            gen_kwargs=f"max_gen_toks={args.max_gen_toks}", random_seed=0, numpy_random_seed=0,
            torch_random_seed=0,
        )
        seconds = time.perf_counter() - start
        row = {"label": spec.label, "pattern": spec.to_dict(), "density": _density(model, spec, args.seq_len),
               "seconds": round(seconds, 1), "tasks": {}}
        for task in args.tasks:
            samples = out["samples"][task]
            correct = [float(s[str(args.seq_len)]) for s in samples]
            row["tasks"][task] = {"score": sum(correct) / len(correct), "n": len(correct), "per_sample": correct,
                                  "first_answers": [s["filtered_resps"][0] for s in samples[:3]]}
        results.append(row)
        scores = " ".join(f"{t} {row['tasks'][t]['score']:.2f}" for t in args.tasks)
        print(f"{spec.label}: {scores} ({seconds:.0f} s)", flush=True)
    return {"model": args.model, "seq_len": args.seq_len, "limit": args.limit, "tasks": args.tasks,
            "dtype": args.dtype, "device": str(device), "results": results}


def table(data: dict) -> str:
    tasks = data["tasks"]
    lines = [f"| pattern | density | {' | '.join(tasks)} |", "|---|---:|" + "---:|" * len(tasks)]
    for row in data["results"]:
        density = "1.000" if row["density"] is None else f"{row['density']:.3f}"
        cells = " | ".join(f"{row['tasks'][t]['score']:.2f} ({row['tasks'][t]['n']})" for t in tasks)
        lines.append(f"| {row['label']} | {density} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--limit", type=int, default=20, help="samples per task (RULER makes 500)")
    ap.add_argument("--tasks", nargs="+", default=["niah_single_1"])
    ap.add_argument("--patterns", nargs="+", default=["dense", "default"])
    ap.add_argument("--max-gen-toks", type=int, default=32, help="RULER's default is 128; answers are short")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.limit < 1 or args.seq_len < 256:
        raise SystemExit("--limit must be >= 1 and --seq-len >= 256")
    torch.manual_seed(0)
    data = run(args)
    data["command"] = "python -m scripts.ruler_niah " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(repr, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items())
    write_json(args.out, data)
    print(table(data))


if __name__ == "__main__":
    main()
