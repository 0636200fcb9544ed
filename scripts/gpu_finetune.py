"""GPU evidence for ``hf-sparsek finetune``: training throughput / peak memory, and the 1-GPU vs 2-GPU loss curves.

``throughput``: tokens per second and peak memory of full fine-tuning steps (AdamW, fp32 master weights, bf16
autocast, gradient checkpointing, one document per row) with ``attn_implementation="sparsek"`` (the model type's
default pattern) vs ``sdpa``, at 16K and 32K, for models with the exact configs of SmolLM2-135M and Gemma 3 270M
and random weights (throughput does not depend on weight values; no weights need to travel to the GPU machine).
SmolLM2's config covers 8K positions: it is raised to 32K here (RoPE extends; a real run at 32K needs a model whose
positions cover it, which the ``finetune`` command checks).

``multi``: the same ``finetune`` command on 1 GPU (batch 2) and through ``accelerate launch`` on 2 GPUs (batch 1
each, same global batch) with DDP and FSDP configs; writes both loss curves and their largest difference.

``tokenize``: the Shakespeare plays as token files for ``finetune`` (training plays / held-out plays).

``adapt``: does fine-tuning under a pattern adapt the model to it beyond domain fit? Per pattern, a LoRA fine-tune
under the pattern and the same fine-tune with dense attention, both evaluated before and after with both
attentions on held-out plays (``summarize``: the same table from two existing ``finetune`` outputs).

Writes JSON and a markdown table to ``--out`` (default: scripts/results). Run from the repository root:
``python -m scripts.gpu_finetune MODE ...``; the fine-tunes it starts run ``python -m hf_sparsek.finetune``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import hf_sparsek

SMOLLM2_135M = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
GEMMA3_270M = {
    "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "max_position_embeddings": 32768, "sliding_window": 512, "query_pre_attn_scalar": 256,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
    "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
}
MODELS = {"smollm2-135m": SMOLLM2_135M, "gemma3-270m": GEMMA3_270M}
FINETUNE_MODULE = "hf_sparsek.finetune"  # `python -m` / `accelerate launch -m` this: the `hf-sparsek finetune` command


def model_config(name: str, seq_len: int) -> Any:
    """The named model's config with positions raised to ``seq_len`` where they fall short (random init only)."""
    from transformers import AutoConfig

    spec = dict(MODELS[name])
    spec["max_position_embeddings"] = max(spec["max_position_embeddings"], seq_len)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    config.use_cache = False
    return config


def measure(name: str, attn: str, seq_len: int, steps: int, warmup: int, device: str) -> dict[str, Any]:
    """Time full fine-tuning steps of a random-init model; returns tokens/s, peak memory and the backend."""
    from hf_sparsek.eval.modeling import density_summary
    from transformers import AutoModelForCausalLM

    from hf_sparsek.finetune.checks import check_kernel

    config = model_config(name, seq_len)
    row: dict[str, Any] = {"model": name, "attn": attn, "seq_len": seq_len, "batch": 1}
    if attn == "sparsek":
        sparsity = hf_sparsek.model_sparsity(config)
        row["sparsity"] = sparsity.to_dict()  # the whole per-model choice, dense layers included
        row["pattern"] = sparsity.default.to_dict()
        # Mean over the full-attention layers, dense ones counted as 1 (top-k: an upper bound).
        row["density_full_layers"] = density_summary(config, sparsity, seq_len)["density"]
        row["backend"] = check_kernel(config, "bf16", device, allow_reference=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for step in range(warmup + steps):
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as exc:
        row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
    if times:
        row["step_seconds"] = sum(times) / len(times)
        row["tokens_per_second"] = seq_len / row["step_seconds"]
        row["loss"] = float(loss.detach())
    if device == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    deadline = time.time() + args.budget_s
    for name in args.models:
        for seq_len in args.seq_lens:
            for attn in ("sparsek", "sdpa"):
                if time.time() > deadline:
                    rows.append({"model": name, "attn": attn, "seq_len": seq_len, "error": "skipped: time budget"})
                    continue
                row = measure(name, attn, seq_len, args.steps, args.warmup, device)
                row["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def _short_error(error: str) -> str:
    """"out of memory (tried to allocate 32.00 GiB)" from a CUDA OOM message; other errors as they are."""
    match = re.search(r"Tried to allocate ([0-9.]+ [GM]iB)", error)
    return f"out of memory (tried to allocate {match.group(1)})" if match else error


def throughput_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | seq len | attention | backend | density (full layers) | tokens/s | step s | peak GiB |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        tps = f"{r['tokens_per_second']:.0f}" if "tokens_per_second" in r else _short_error(r.get("error", ""))
        lines.append(
            f"| {r['model']} | {r['seq_len']} | {r['attn']} | {r.get('backend', 'torch sdpa')} | "
            f"{r.get('density_full_layers', 1.0):.3f} | {tps} | {r.get('step_seconds', float('nan')):.3f} | "
            f"{r.get('peak_memory_gib', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def multi(args: argparse.Namespace) -> dict[str, Any]:
    """Same fine-tune on 1 GPU and on 2 GPUs (DDP, FSDP) via accelerate; compares the loss curves."""
    from transformers import AutoModelForCausalLM

    root = Path(args.work)
    model_dir = root / "model"
    config = model_config(args.models[0], args.seq_len)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--train-data", args.train_data, "--seq-len", str(args.seq_len),
              "--max-steps", str(args.max_steps), "--lr", "1e-3", "--scheduler", "constant", "--dtype", "bf16",
              "--save-steps", "0", "--no-eval-before", "--pattern", args.pattern]
    from transformers import TrainingArguments

    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        common += ["--data-order", "sequential"]  # the same rows in every global batch on 1 and 2 GPUs
    runs = {"1gpu": (None, ["--batch-size", "2"]), "ddp": ("accelerate_ddp.yaml", ["--batch-size", "1"]),
            "fsdp": ("accelerate_fsdp.yaml", ["--batch-size", "1"])}
    result: dict[str, Any] = {"seq_len": args.seq_len, "pattern": args.pattern, "runs": {},
                              "data_order": "sequential" if "--data-order" in common else "random"}
    here = Path(__file__).resolve().parent
    for tag in args.runs:
        accel_config, extra = runs[tag]
        out = root / tag
        if accel_config is None:
            cmd = [sys.executable, "-m", FINETUNE_MODULE]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(here / accel_config),
                   "-m", FINETUNE_MODULE]
            env = dict(os.environ)
        start = time.time()
        proc = subprocess.run(cmd + common + extra + ["--output-dir", str(out)], env=env, capture_output=True,
                              text=True)
        entry: dict[str, Any] = {"returncode": proc.returncode, "wall_seconds": time.time() - start}
        if proc.returncode != 0:
            entry["stderr_tail"] = proc.stderr[-3000:]
        else:
            metrics = json.loads((out / "metrics.json").read_text())
            entry.update({k: metrics[k] for k in ("losses", "train_tokens_per_second", "world_size", "backend",
                                                  "train_rows")})
            entry["final_reload"] = check_reload(out / "final", args.pattern)
        result["runs"][tag] = entry
        print(tag, json.dumps({k: v for k, v in entry.items() if k != "losses"})[:2000], flush=True)
    rows = next((r["train_rows"] for r in result["runs"].values() if "train_rows" in r), None)
    compare_curves(result, None if rows is None else rows // 2)
    return result


def compare_curves(result: dict[str, Any], same_rows_steps: int | None) -> None:
    """Largest loss difference from the 1-GPU run, over the steps where both saw the same rows.

    Global batch 2 over ``train_rows`` rows: the first ``train_rows // 2`` steps take the same rows on 1 and 2 GPUs
    (sequential order); at an odd epoch end the 1-GPU batch holds one row while accelerate's even_batches pads the
    2-GPU batch with the first row again, so the curves part there by design.
    """
    base = dict(result["runs"].get("1gpu", {}).get("losses") or [])
    result["same_rows_steps"] = same_rows_steps
    for tag, entry in result["runs"].items():
        if tag == "1gpu" or not base or not entry.get("losses"):
            continue
        diffs = [(s, abs(base[s] - v)) for s, v in entry["losses"] if s in base]
        same = [d for s, d in diffs if same_rows_steps is None or s <= same_rows_steps]
        entry["max_abs_loss_diff_vs_1gpu"] = max(same)
        entry["mean_abs_loss_diff_vs_1gpu"] = sum(same) / len(same)
        entry["max_abs_loss_diff_vs_1gpu_all_steps"] = max(d for _, d in diffs)


def check_reload(final_dir: Path, pattern: str) -> dict[str, Any]:
    """The final checkpoint loads with attn_implementation="sparsek", keeps its pattern, and gives finite logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final_dir, attn_implementation="sparsek").cuda()
    stored = hf_sparsek.model_sparsity(model.config).default
    ids = torch.randint(0, model.config.vocab_size, (1, 8192), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    return {"pattern_kept": stored == hf_sparsek.SparsePattern.from_dict(json.loads(pattern)),
            "finite_logits": bool(torch.isfinite(logits).all())}


def multi_table(result: dict[str, Any]) -> str:
    """Loss at a few steps of each run, and the largest difference from the 1-GPU curve."""
    runs = result["runs"]
    steps = sorted({s for r in runs.values() for s, _ in r.get("losses", [])})
    shown = sorted({steps[0], steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]}) if steps else []
    same = result.get("same_rows_steps")
    label = "max abs diff vs 1 GPU" + (f" (steps 1-{same}, same rows)" if same else "")
    head = "| run | GPUs | tokens/s | " + " | ".join(f"loss @{s}" for s in shown) + f" | {label} |"
    lines = [head, "| --- | ---: | ---: | " + " | ".join("---:" for _ in shown) + " | ---: |"]
    for tag, r in runs.items():
        if r.get("returncode"):
            lines.append(f"| {tag} | failed (rc {r['returncode']}) |")
            continue
        loss = dict(r["losses"])
        cells = " | ".join(f"{loss[s]:.4f}" if s in loss else "" for s in shown)
        diff = r.get("max_abs_loss_diff_vs_1gpu")
        lines.append(f"| {tag} | {r['world_size']} | {r['train_tokens_per_second']:.0f} | {cells} | "
                     f"{'' if diff is None else f'{diff:.4f}'} |")
    return "\n".join(lines)


def summarize(sparse_dir: str, dense_dir: str) -> tuple[dict[str, Any], str]:
    """Before/after held-out perplexity of a sparse-trained and a dense-trained run (each evaluated both ways)."""
    metrics = [json.loads((Path(folder) / "metrics.json").read_text()) for folder in (sparse_dir, dense_dir)]
    return summarize_metrics(*metrics)


def summarize_metrics(sparse: dict[str, Any], dense: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """:func:`summarize` on two ``finetune`` metrics dicts: per run, ``ppl[attn] = (before, after)`` and a table."""
    runs = {}
    for tag, m in (("trained sparse", sparse), ("trained dense (sdpa)", dense)):
        other = "sdpa" if m["attn"] == "sparsek" else "sparsek"
        ppl = {m["attn"]: (m["eval_before"]["ppl"], m["eval_after"]["ppl"])}
        if f"eval_before_{other}" in m:
            ppl[other] = (m[f"eval_before_{other}"]["ppl"], m[f"eval_after_{other}"]["ppl"])
        runs[tag] = {"metrics": {k: v for k, v in m.items() if k != "losses"}, "losses": m["losses"], "ppl": ppl}
    lines = ["| run | eval attention | ppl before | ppl after | sparse/dense ppl ratio after |",
             "| --- | --- | ---: | ---: | ---: |"]
    for tag, r in runs.items():
        ratio = r["ppl"]["sparsek"][1] / r["ppl"]["sdpa"][1] if len(r["ppl"]) == 2 else float("nan")
        for attn, (before, after) in r["ppl"].items():
            lines.append(f"| {tag} | {attn} | {before:.3f} | {after:.3f} | {ratio:.4f} |")
    return runs, "\n".join(lines)


def adaptation_verdict(runs: dict[str, Any]) -> dict[str, Any]:
    """Does training under the pattern beat the dense-trained model evaluated under the same pattern?

    ``runs``: :func:`summarize_metrics`' first result. Compares the sparse perplexity after training of the
    sparse-trained run with that of the dense-trained run (same data, steps, seed; so domain fit is in both), and
    reports what the sparse training costs the dense perplexity of the same weights.
    """
    sparse, dense = runs["trained sparse"]["ppl"], runs["trained dense (sdpa)"]["ppl"]
    out: dict[str, Any] = {
        "sparse_ppl_before": sparse["sparsek"][0],
        "dense_ppl_before": sparse.get("sdpa", dense["sdpa"])[0],
        "sparse_ppl_after_sparse_trained": sparse["sparsek"][1],
        "sparse_ppl_after_dense_trained": dense["sparsek"][1] if "sparsek" in dense else None,
        "dense_ppl_after_dense_trained": dense["sdpa"][1],
        "dense_ppl_after_sparse_trained": sparse["sdpa"][1] if "sdpa" in sparse else None,
    }
    if out["sparse_ppl_after_dense_trained"] is None:
        out["sparse_trained_wins"] = None
        out["line"] = "the dense-trained run was not evaluated under the pattern: no comparison"
        return out
    ratio = out["sparse_ppl_after_sparse_trained"] / out["sparse_ppl_after_dense_trained"]
    out["sparse_ppl_ratio_sparse_vs_dense_trained"] = ratio
    out["sparse_trained_wins"] = ratio < 1.0
    gap_before = out["sparse_ppl_before"] / out["dense_ppl_before"] - 1
    gap_dense_trained = out["sparse_ppl_after_dense_trained"] / out["dense_ppl_after_dense_trained"] - 1
    gap_sparse_trained = out["sparse_ppl_after_sparse_trained"] / out["dense_ppl_after_dense_trained"] - 1
    out.update(gap_before=gap_before, gap_after_dense_trained=gap_dense_trained,
               gap_after_sparse_trained=gap_sparse_trained)
    verb = "lower" if ratio < 1 else "not lower"
    out["line"] = (
        f"training under the pattern gives sparse ppl {out['sparse_ppl_after_sparse_trained']:.3f}, {verb} than "
        f"the dense-trained model under the same pattern ({out['sparse_ppl_after_dense_trained']:.3f}; "
        f"{100 * (ratio - 1):+.2f}%). Gap to the dense-trained model's dense ppl "
        f"({out['dense_ppl_after_dense_trained']:.3f}): {100 * gap_before:+.1f}% before training, "
        f"{100 * gap_dense_trained:+.1f}% for the dense-trained model under the pattern, "
        f"{100 * gap_sparse_trained:+.1f}% for the sparse-trained model"
    )
    return out


def split_plays(titles: list[str], heldout: list[str]) -> tuple[list[str], list[str]]:
    """(training titles, held-out titles) in the corpus order; ValueError for a held-out name not in it."""
    missing = sorted(set(heldout) - set(titles))
    if missing:
        raise ValueError(f"held-out plays {missing} are not in the corpus; plays: {sorted(titles)}")
    return [t for t in titles if t not in heldout], [t for t in titles if t in heldout]


def tokenize_plays(args: argparse.Namespace) -> dict[str, Any]:
    """Token files for ``finetune --train-data/--eval-data``: the Shakespeare plays split into training plays and
    held-out plays, each play one document, tokenized whole with the model's tokenizer (no special tokens)."""
    from hf_sparsek.eval.offline import shakespeare_plays
    from transformers import AutoTokenizer

    from hf_sparsek.finetune.model import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    plays = shakespeare_plays()
    train, held = split_plays(list(plays), args.heldout)
    folder = Path(args.out)
    info: dict[str, Any] = {"model": args.model, "tokenizer": type(tok).__name__}
    for name, titles in (("train", train), ("eval", held)):
        docs = [tok(plays[t], add_special_tokens=False)["input_ids"] for t in titles]
        torch.save(docs, folder / f"{name}.pt")
        info[name] = {"plays": titles, "tokens": [len(d) for d in docs], "total_tokens": sum(map(len, docs))}
    (folder / "plays.json").write_text(json.dumps(info, indent=2))
    return info


def _pattern_spec(spec: str) -> str | None:
    """A --patterns value's pattern: None for "default" (the model type's shipped default, dense layers included)."""
    return None if spec == "default" else spec


def adapt(args: argparse.Namespace, save: Any = None) -> dict[str, Any]:
    """Adaptation to the pattern: for each pattern, a LoRA fine-tune under the pattern and the same fine-tune with
    dense attention evaluated under the pattern (same data, seed, row order and steps), each evaluated before and
    after with both attentions on held-out documents. Each run is one ``finetune`` process; ``save(result)`` is
    called after each (partial results survive a killed command)."""
    from hf_sparsek.eval.modeling import density_summary
    from transformers import AutoConfig

    from hf_sparsek.finetune.data import load_token_documents
    from hf_sparsek.finetune.model import resolve_model_path
    from hf_sparsek.finetune.packing import pack_documents

    start = time.time()
    model = resolve_model_path(args.model)  # an offline name: the GGUF is converted once, here
    rows = len(pack_documents(load_token_documents(args.train_data), args.seq_len))
    steps = args.max_steps or rows
    result: dict[str, Any] = {
        "model": args.model, "seq_len": args.seq_len, "train_rows": rows, "max_steps": steps,
        "epochs": steps / rows, "lr": args.lr, "warmup_steps": args.warmup_steps, "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha, "lora_targets": args.lora_targets, "dtype": args.dtype, "seed": 0,
        "train_data": args.train_data, "eval_data": args.eval_data, "patterns": {}, "runs": {},
        "convert_seconds": time.time() - start,
    }
    common = ["--model", model, "--train-data", args.train_data, "--eval-data", args.eval_data,
              "--seq-len", str(args.seq_len), "--max-steps", str(steps), "--batch-size", "1", "--lr", str(args.lr),
              "--warmup-steps", str(args.warmup_steps), "--lora-r", str(args.lora_r),
              "--lora-alpha", str(args.lora_alpha), "--lora-targets", args.lora_targets, "--dtype", args.dtype,
              "--save-steps", "0", "--no-merge", "--logging-steps", str(args.logging_steps), "--seed", "0"]
    if args.eval_max_windows:
        common += ["--eval-max-windows", str(args.eval_max_windows)]
    if args.cpu:
        common += ["--cpu", "--no-gradient-checkpointing"]
    from hf_sparsek.model_defaults import default_key

    config = AutoConfig.from_pretrained(model)
    deadline = start + args.budget_s
    durations: dict[str, float] = {}
    for item in args.patterns:
        name, spec = item.split("=", 1)
        pattern = _pattern_spec(spec)
        # The choice the finetune command will make: set_pattern parses presets/JSON like --pattern does.
        sparsity = (hf_sparsek.set_pattern(copy.deepcopy(config), pattern) if pattern else
                    hf_sparsek.default_sparsity(default_key(config)))
        result["patterns"][name] = {"spec": spec, "sparsity": sparsity.to_dict(),
                                    "describe": sparsity.default.describe(),
                                    **density_summary(config, sparsity, args.seq_len)}
        pat = ["--pattern", pattern] if pattern else []
        plan = {"sparse": ["--attn", "sparsek", *pat, "--eval-also-attn", "sdpa"],
                "dense": ["--attn", "sdpa", "--eval-also-attn", "sparsek"] + (["--eval-pattern", pattern] if pattern
                                                                             else [])}
        for kind, extra in plan.items():
            tag = f"{kind}_{name}"
            # A pattern's sparse run starts only if its dense run is expected to fit too (a pair or nothing).
            expected = durations.get(kind, 0.0) + (durations.get("dense", 0.0) if kind == "sparse" else 0.0)
            # The dense run still goes when its sparse run failed (it needs only the forward under the pattern), not
            # when the sparse run was skipped for time: half a pair answers nothing and spends device time.
            skipped_pair = kind == "dense" and "skipped" in result["runs"].get(f"sparse_{name}", {})
            if skipped_pair or time.time() + expected > deadline:
                result["runs"][tag] = {"skipped": f"time budget ({args.budget_s:.0f} s)"}
                print(f"== {tag}: skipped (time budget)", flush=True)
                continue
            out = Path(args.work) / tag
            cmd = [sys.executable, "-m", FINETUNE_MODULE, *common, *extra, "--output-dir", str(out)]
            print(f"== {tag}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.STDOUT)
            durations[kind] = max(durations.get(kind, 0.0), time.time() - t0)
            entry: dict[str, Any] = {"returncode": proc.returncode, "wall_seconds": time.time() - t0,
                                     "command": cmd[1:]}
            if proc.returncode == 0:
                entry["metrics"] = json.loads((out / "metrics.json").read_text())
            result["runs"][tag] = entry
            print(f"== {tag}: rc {proc.returncode}, {entry['wall_seconds']:.0f} s", flush=True)
            if save is not None:
                save(result)
    result["summary"] = {}
    for name in result["patterns"]:
        sparse, dense = result["runs"].get(f"sparse_{name}", {}), result["runs"].get(f"dense_{name}", {})
        if "metrics" in sparse and "metrics" in dense:
            runs, table = summarize_metrics(sparse["metrics"], dense["metrics"])
            result["summary"][name] = {"table": table, "verdict": adaptation_verdict(runs)}
    result["wall_seconds"] = time.time() - start
    return result


def adapt_markdown(result: dict[str, Any]) -> str:
    """The ``adapt`` result as markdown: settings, then per pattern the before/after table and the verdict line."""
    env = result.get("env", {})
    lines = [
        f"Model {result['model']}, LoRA r={result['lora_r']} alpha={result['lora_alpha']} on "
        f"{result['lora_targets']}, {result['dtype']}, seq len {result['seq_len']}, batch 1, {result['max_steps']} "
        f"steps ({result['epochs']:.2f} epochs of {result['train_rows']} packed rows), lr {result['lr']} "
        f"(cosine, {result['warmup_steps']} warmup), seed 0, same row order in every run. Device: "
        f"{env.get('device', '?')}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}.",
        "",
    ]
    for name, pattern in result["patterns"].items():
        lines.append(f"### Pattern {name}: {pattern['describe']}, dense layers {pattern['sparsity']['dense_layers']} "
                     f"(density over layers at {result['seq_len']}: {pattern['density']:.3f})")
        lines.append("")
        summary = result["summary"].get(name)
        if summary is None:
            states = {t: r.get("skipped") or f"rc {r.get('returncode')}" for t, r in result["runs"].items()
                      if t.endswith(f"_{name}")}
            lines += [f"incomplete: {states}", ""]
            continue
        lines += [summary["table"], "", summary["verdict"]["line"], ""]
        for kind in ("sparse", "dense"):
            m = result["runs"][f"{kind}_{name}"]["metrics"]
            lines.append(f"- {kind}-trained: {m['train_tokens_per_second']:.0f} tokens/s, {m['train_seconds']:.0f} s "
                         f"training, train loss {m['train_loss']:.4f}, backend {m.get('backend') or 'torch sdpa'}")
        lines.append("")
    return "\n".join(lines)


def packcheck(seq_len: int, restart: int) -> dict[str, Any]:
    """Batch of 2 packed rows (row 0 restarts at ``restart``, row 1 is one document): does each row of the batched
    forward/backward equal the row alone, and does the kernel equal the reference on the same inputs?"""
    from transformers import AutoModelForCausalLM

    from hf_sparsek.finetune.packing import segment_ids

    pattern = hf_sparsek.SparsePattern(block_size=128, sink_tokens=128, window=1024)
    out: dict[str, Any] = {"seq_len": seq_len, "restart": restart, "pattern": pattern.to_dict()}
    pos = torch.stack([torch.cat([torch.arange(restart), torch.arange(seq_len - restart)]), torch.arange(seq_len)])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pos = pos.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    b, h, hk, d = 2, 9, 3, 64
    q = torch.randn(b, h, seq_len, d, device=dev, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, hk, seq_len, d, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(b, hk, seq_len, d, device=dev, dtype=torch.bfloat16, generator=gen)
    seg = segment_ids(pos)
    for backend in ("triton", "reference"):
        res = []
        for rows in ((0, 1), (0,), (1,)):
            qq, kk, vv = (t[list(rows)].clone().requires_grad_() for t in (q, k, v))
            o = hf_sparsek.sparse_attention(qq, kk, vv, pattern, segment_ids=seg[list(rows)], backend=backend)
            o.float().square().sum().backward()
            res.append((o.detach(), qq.grad, kk.grad, vv.grad))
        both, r0, r1 = res
        out[f"{backend}_batched_vs_alone_max_abs"] = {
            name: max(float((both[i][0] - r0[i][0]).abs().max()), float((both[i][1] - r1[i][0]).abs().max()))
            for i, name in enumerate(("o", "dq", "dk", "dv"))}
        out[f"{backend}_batched"] = both
    tri, ref = out.pop("triton_batched"), out.pop("reference_batched")
    out["triton_vs_reference_max_abs"] = {name: [float((tri[i][r] - ref[i][r]).abs().max()) for r in range(2)]
                                          for i, name in enumerate(("o", "dq", "dk", "dv"))}
    config = model_config("smollm2-135m", seq_len)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sparsek").to(dev)
    hf_sparsek.set_pattern(model, pattern)
    ids = torch.randint(0, config.vocab_size, (2, seq_len), device=dev, generator=gen)
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
        both = model(input_ids=ids, position_ids=pos).logits.float()
        alone = [model(input_ids=ids[r : r + 1], position_ids=pos[r : r + 1]).logits.float() for r in range(2)]
    out["model_logits_batched_vs_alone_max_abs"] = [float((both[r] - alone[r][0]).abs().max()) for r in range(2)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("throughput", "multi", "summarize", "packcheck", "tokenize", "adapt"))
    p.add_argument("--runs-dirs", nargs=2, metavar=("SPARSE_DIR", "DENSE_DIR"), help="summarize: two finetune outputs")
    p.add_argument("--name", default="finetune_shakespeare", help="summarize: result file stem")
    p.add_argument("--models", nargs="+", default=["smollm2-135m"], choices=sorted(MODELS))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[16384, 32768])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=240,
                   help="throughput/adapt: start no new measurement or run that would end after this")
    p.add_argument("--seq-len", type=int, default=8192, help="multi: training length")
    p.add_argument("--max-steps", type=int, default=30, help="multi/adapt: optimizer steps (adapt, 0: one epoch)")
    p.add_argument("--train-data", default="synthetic", help="multi: token file or 'synthetic'")
    p.add_argument("--pattern", default='{"block_size": 128, "sink_tokens": 128, "window": 1024}')
    p.add_argument("--runs", nargs="+", default=["1gpu", "ddp", "fsdp"])
    p.add_argument("--work", default="/tmp/hf_sparsek_multi")
    p.add_argument("--model", default="smollm2-135m", help="tokenize/adapt: model dir or offline name")
    p.add_argument("--heldout", nargs="+", default=["hamlet", "macbeth", "othello", "tempest"],
                   help="tokenize: plays held out for evaluation")
    p.add_argument("--eval-data", default=None, help="adapt: held-out token file")
    p.add_argument("--patterns", nargs="+", default=["A=default", 'B={"block_size":128,"sink_tokens":64,"window":256}'],
                   help="adapt: NAME=SPEC (SPEC: 'default' = the model type's shipped default, a preset or JSON)")
    p.add_argument("--lr", type=float, default=1e-3, help="adapt")
    p.add_argument("--warmup-steps", type=int, default=10, help="adapt")
    p.add_argument("--lora-r", type=int, default=16, help="adapt")
    p.add_argument("--lora-alpha", type=int, default=32, help="adapt")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="adapt")
    p.add_argument("--dtype", default="bf16", help="adapt")
    p.add_argument("--logging-steps", type=int, default=10, help="adapt")
    p.add_argument("--eval-max-windows", type=int, default=None, help="adapt: cap on evaluation windows (CPU tests)")
    p.add_argument("--cpu", action="store_true", help="adapt: run the fine-tunes on CPU (tests)")
    p.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).resolve().parent / "results")))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "gpus": torch.cuda.device_count()}
    import transformers

    env["transformers"] = transformers.__version__
    if args.mode == "throughput":
        rows = throughput(args)
        (out / "finetune_throughput.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
        (out / "finetune_throughput.md").write_text(throughput_table(rows) + "\n")
        print(throughput_table(rows))
    elif args.mode == "packcheck":
        result = packcheck(args.seq_len, 338)
        result["env"] = env
        (out / "finetune_packcheck.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    elif args.mode == "tokenize":
        print(json.dumps(tokenize_plays(args), indent=2)[:3000])
    elif args.mode == "adapt":
        result = adapt(args, save=lambda r: (out / f"{args.name}.json").write_text(json.dumps(r | {"env": env})))
        result["env"] = env
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
        (out / f"{args.name}.md").write_text(adapt_markdown(result) + "\n")
        print(adapt_markdown(result))
    elif args.mode == "summarize":
        runs, table = summarize(*args.runs_dirs)
        (out / f"{args.name}.json").write_text(json.dumps(runs, indent=2))
        (out / f"{args.name}.md").write_text(table + "\n")
        print(table)
    else:
        result = multi(args)
        result["env"] = env
        (out / "finetune_multi_gpu.json").write_text(json.dumps(result, indent=2))
        (out / "finetune_multi_gpu.md").write_text(multi_table(result) + "\n")
        print(multi_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
