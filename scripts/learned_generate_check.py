"""Issue 23's last check on real weights: distil a learned scorer, reload the saved model with
``from_pretrained(final, attn_implementation="sparsek")`` and run ``generate()`` with it.

A short distillation of SmolLM2-135M (``hf_sparsek.learned.distill``, the ``hf-sparsek distill`` command) writes
``final/``; the reloaded model then generates greedily from a held-out prompt with its cache (the learned selector's
decode store), and each step's logits are compared with one uncached forward over the prompt and the tokens so far
(with ``query_rows="previous"`` every cut of a sequence selects the same tiles, so they must agree), and with the
in-memory model the distillation returned. CPU is enough (a few minutes)::

    python -m scripts.learned_generate_check --out OUT.json

(kept as the key ``smollm2-135m_generate_cpu`` of ``scripts/results/learned_selector.json``)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True, help="results JSON (the readable table goes to stdout)")
    ap.add_argument("--work", default=None, help="folder for the distillation (default: a temporary one)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--pattern", default='{"block_size": 64, "sink_tokens": 64, "window": 256, "topk_blocks": 2}')
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import hf_sparsek
    from hf_sparsek.finetune.data import load_token_documents
    from hf_sparsek.learned import DistillConfig, distill
    from scripts.common import write_json

    t0 = time.perf_counter()
    work = args.work or tempfile.mkdtemp(prefix="learned_generate_")
    config = DistillConfig(model=args.model, output_dir=os.path.join(work, "run"), pattern=json.loads(args.pattern),
                           seq_len=args.seq_len, train_windows=2, eval_windows=1, steps=args.steps,
                           query_tile_stride=4, cpu=not torch.cuda.is_available(), compare_library=False)
    result = distill(config)
    final = os.path.join(config.output_dir, "final")
    reloaded = AutoModelForCausalLM.from_pretrained(final, attn_implementation="sparsek").eval()
    trained = result.model.eval()
    trained.set_attn_implementation("sparsek")
    hf_sparsek.set_pattern(trained, reloaded.config.sparsek)

    docs = load_token_documents(config.train_data, final)
    held = docs[len(docs) - config.heldout_docs]  # the first held-out play: never trained on
    ids = torch.tensor([held[: args.prompt_len]])
    with torch.no_grad():
        out = reloaded.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                do_sample=False, output_logits=True, return_dict_in_generate=True)
        steps = []
        for i, logits in enumerate(out.logits):
            seq = out.sequences[:, : args.prompt_len + i]
            uncached = reloaded(seq).logits[:, -1]
            in_memory = trained(seq).logits[:, -1]
            steps.append({"step": i, "token": int(out.sequences[0, args.prompt_len + i]),
                          "max_abs_diff_uncached": float((logits - uncached).abs().max()),
                          "max_abs_diff_in_memory": float((uncached - in_memory).abs().max()),
                          "same_argmax": bool(logits.argmax(-1).eq(uncached.argmax(-1)).all())})
    worst = max(s["max_abs_diff_uncached"] for s in steps)
    import transformers

    results = {
        "command": " ".join(["python -m scripts.learned_generate_check", *sys.argv[1:]]),
        "transformers": transformers.__version__,
        "model": args.model, "pattern": json.loads(args.pattern), "seq_len": args.seq_len, "steps": args.steps,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "distill_seconds": result.metrics.get("train_seconds"), "loss_first_last": [result.metrics["losses"][0],
                                                                                  result.metrics["losses"][-1]],
        "scorer_file": os.path.exists(os.path.join(final, "sparsek_scorer.safetensors")),
        "selector_in_config": reloaded.config.sparsek["default"].get("selector"),
        "generated_text_tokens": out.sequences[0, args.prompt_len:].tolist(),
        "all_steps_same_argmax": all(s["same_argmax"] for s in steps),
        "max_abs_diff_cached_vs_uncached": worst,
        "max_abs_diff_reloaded_vs_in_memory": max(s["max_abs_diff_in_memory"] for s in steps),
        "per_step": steps, "total_seconds": time.perf_counter() - t0,
    }
    write_json(args.out, results)
    table = ["| check | result |", "|---|---|",
             f"| scorer saved beside the model / config names selector | {results['scorer_file']} / "
             f"{results['selector_in_config']} |",
             f"| generate() {args.new_tokens} tokens from a {args.prompt_len}-token held-out prompt | ran |",
             f"| every step's argmax = uncached forward's | {results['all_steps_same_argmax']} |",
             f"| max abs logit diff, cached vs uncached | {worst:.2e} |",
             f"| max abs logit diff, reloaded vs in-memory model | "
             f"{results['max_abs_diff_reloaded_vs_in_memory']:.2e} |"]
    print("\n".join(table))
    return 0 if results["all_steps_same_argmax"] else 1


if __name__ == "__main__":
    sys.exit(main())
