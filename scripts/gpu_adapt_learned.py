"""LoRA under the learned selector (issue 23's "continue with LoRA under the LM loss with sparse attention on"), beside
the same LoRA with dense attention, on the model and scorer that ``scripts/gpu_learned.py`` left in its work folder.

Does adapting the model to its learned selection close the gap to dense that selection alone leaves? Both fine-tunes
run ``hf_sparsek.finetune.finetune`` (the ``hf-sparsek finetune`` command) on the training plays with the same rows,
steps and seed: rows cut from single documents (the learned selector refuses packed rows, so the dense run gets the
same rows). Then held-out perplexity on the held-out plays, the same windows for every row of the table:

- the base model, dense (gpu_learned's reference) and under the learned selector (its scorer, no LoRA);
- the dense-trained LoRA, dense (the fair reference after training: the plays' domain fit alone) and under the
  learned selector;
- the LoRA trained under the learned selector, under it (the result) and dense;
- the same LoRA under its scorer re-fitted to the adapted model (``hf-sparsek distill --init-scorer``: the distilled
  scorer as the start, ``--refit-steps`` steps against the adapted model's dense attention; 0: not run).

Run on the GPU machine right after ``gpu_learned`` (lease step 9; its files stay in /tmp/gpu_learned)::

    python -m scripts.gpu_adapt_learned --work /tmp/gpu_learned --model smollm2-135m --steps 100 --out $OUT/adapt

``--cpu-smoke`` runs the same on the folder ``gpu_learned --cpu-smoke`` leaves (CPU, tiny, fp32).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch


def _finetune(model: str, attn: str, out: str, args: argparse.Namespace, seq_len: int, steps: int, on_cpu: bool,
              token_file: str, heldout: int) -> dict[str, Any]:
    """One LoRA fine-tune through the package's command; the model's own pattern (the distilled folder's learned
    one for ``attn="sparsek"``); returns its metrics."""
    from hf_sparsek.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        model=model, output_dir=out, attn=attn, train_data=token_file, heldout_docs=heldout, seq_len=seq_len,
        max_steps=steps, batch_size=1, lr=args.lr, warmup_steps=max(1, steps // 10), lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r, dtype="fp32" if on_cpu else "bf16", save_steps=0, eval_before=False,
        eval_max_windows=2, logging_steps=max(1, steps // 10), cpu=on_cpu, seed=0, single_documents=True)
    t0 = time.perf_counter()
    metrics = finetune(config).metrics
    metrics["wall_seconds"] = time.perf_counter() - t0
    return metrics


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/gpu_learned", help="gpu_learned's work folder")
    ap.add_argument("--model", default="smollm2-135m", help="the base folder's name in --work")
    ap.add_argument("--mode", default="query", help="the distilled scorer's mode (run_<mode>/final in --work)")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--heldout", type=int, default=4, help="held-out documents (the last ones), as gpu_learned")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--ppl-tokens", type=int, default=65536)
    ap.add_argument("--refit-steps", type=int, default=100, help="re-fit the scorer to the adapted model (0: no)")
    ap.add_argument("--refit-windows", type=int, default=16)
    ap.add_argument("--bos", type=int, default=None, help="BOS id prepended to every window (Gemma: 2)")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from hf_sparsek.eval import report
    from hf_sparsek.eval.modeling import PatternSpec, environment
    from hf_sparsek.eval.ppl import run_ppl
    from transformers import AutoModelForCausalLM

    import hf_sparsek
    from hf_sparsek.learned import attach_selector, load_selector
    from scripts.common import write_json

    on_cpu = args.cpu_smoke
    device = torch.device("cpu" if on_cpu else "cuda")
    dtype = torch.float32 if on_cpu else torch.bfloat16
    base = os.path.join(args.work, "smoke-llama" if args.cpu_smoke else args.model)
    distilled = os.path.join(args.work, f"run_{args.mode}", "final")
    token_file = os.path.join(args.work, "docs.pt")
    seq_len, steps, ppl_tokens = (512, 4, 1024) if args.cpu_smoke else (args.seq_len, args.steps, args.ppl_tokens)
    heldout = 2 if args.cpu_smoke else args.heldout
    for path in (base, distilled, token_file):
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: run scripts/gpu_learned.py first (same machine, same --work)")
    os.makedirs(args.out, exist_ok=True)
    docs = torch.load(token_file)
    held = docs[len(docs) - heldout :]
    learned = hf_sparsek.model_sparsity(AutoModelForCausalLM.from_pretrained(distilled).config)
    results: dict[str, Any] = {"command": " ".join(sys.argv), "environment": environment(device, dtype),
                               "seq_len": seq_len, "steps": steps, "lr": args.lr, "lora_r": args.lora_r,
                               "pattern": learned.to_dict()}
    tables: list[str] = []

    def save() -> None:
        write_json(os.path.join(args.out, "adapt_learned.json"), results)
        with open(os.path.join(args.out, "adapt_learned.md"), "w") as f:
            f.write("\n\n".join(tables) + "\n")

    runs = {"dense_lora": (base, "sdpa"), "learned_lora": (distilled, "sparsek")}
    for name, (model, attn) in runs.items():
        results[name] = _finetune(model, attn, os.path.join(args.work, f"adapt_{name}"), args, seq_len, steps, on_cpu,
                                  token_file, heldout)
        save()
    scorer = load_selector(distilled)
    adapted = os.path.join(args.work, "adapt_learned_lora", "final")
    refit = None
    if args.refit_steps:  # the distilled scorer, re-fitted to the adapted model's own dense attention
        from hf_sparsek.learned import DistillConfig, distill

        refit_dir = os.path.join(args.work, "adapt_refit")
        metrics = distill(DistillConfig(
            model=adapted, output_dir=refit_dir, pattern=learned.default.to_dict(), train_data=token_file,
            heldout_docs=heldout, seq_len=seq_len, train_windows=2 if on_cpu else args.refit_windows, eval_windows=0,
            steps=2 if on_cpu else args.refit_steps, dtype="fp32" if on_cpu else "bf16", cpu=on_cpu,
            compare_library=False, save_model=False, init_scorer=distilled, bos_token_id=args.bos)).metrics
        results["refit"] = {k: metrics[k] for k in ("capture_seconds", "train_seconds")}
        results["refit"]["loss_first_last"] = [metrics["losses"][0], metrics["losses"][-1]]
        refit = load_selector(refit_dir)
        save()
    rows = []
    evaluated = {"base": (base, scorer), "dense LoRA": (os.path.join(args.work, "adapt_dense_lora", "final"), scorer),
                 "learned LoRA": (adapted, scorer)}
    if refit is not None:
        evaluated["learned LoRA, re-fitted scorer"] = (adapted, refit)
    for name, (folder, selector) in evaluated.items():
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sparsek", dtype=dtype).to(device)
        attach_selector(model, selector)  # the distilled scorer (the learned LoRA's final/ carries it) or re-fitted
        specs = [PatternSpec(f"{name}: learned selector", learned)]
        if selector is scorer:
            specs.insert(0, PatternSpec(f"{name}: dense", None))
        rows += run_ppl(model.eval(), held, [seq_len], specs, device, args.bos, ppl_tokens)
        del model
    reference = next(r["ppl"] for r in rows if r["pattern"] == "dense LoRA: dense")
    for r in rows:  # against the dense-trained LoRA, dense: what training on the plays alone gives
        r["delta_vs_dense_lora_pct"] = 100.0 * (r["ppl"] / reference - 1.0)
    results["ppl"] = rows
    tables += [f"## LoRA under the learned selector vs dense LoRA ({steps} steps at {seq_len}, r {args.lora_r})",
               report.ppl_table(rows),
               "delta vs the dense LoRA's dense ppl: " + ", ".join(
                   f"{r['pattern']} {r['delta_vs_dense_lora_pct']:+.2f}%" for r in rows)]
    save()
    print("\n\n".join(tables), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
