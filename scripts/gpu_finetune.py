"""GPU evidence for ``hf-sparsek finetune``: training throughput / peak memory, and the 1-GPU vs 2-GPU loss curves.

``throughput``: tokens per second and peak memory of full fine-tuning steps (AdamW, fp32 master weights, bf16
autocast, gradient checkpointing, one document per row) with ``attn_implementation="sparsek"`` (the model type's
default pattern) vs ``sdpa``, at 16K and 32K, for models with the exact configs of SmolLM2-135M and Gemma 3 270M
and random weights (throughput does not depend on weight values; no weights need to travel to the GPU machine).
SmolLM2's config covers 8K positions: it is raised to 32K here (RoPE extends; a real run at 32K needs a model whose
positions cover it, which the ``finetune`` command checks).

``multi``: the same ``finetune`` command on 1 GPU (batch 2) and through ``accelerate launch`` on 2 GPUs (batch 1
each, same global batch) with DDP and FSDP configs; writes both loss curves and their largest difference.

Writes JSON and a markdown table to ``--out`` (default: scripts/results).
"""

from __future__ import annotations

import argparse
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
    from hf_sparsek.scripts.finetune import check_kernel
    from transformers import AutoModelForCausalLM

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
            cmd = [sys.executable, "-m", "hf_sparsek.scripts.finetune"]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(here / accel_config),
                   "-m", "hf_sparsek.scripts.finetune"]
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
    runs = {}
    for tag, folder in (("trained sparse", sparse_dir), ("trained dense (sdpa)", dense_dir)):
        m = json.loads((Path(folder) / "metrics.json").read_text())
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


def packcheck(seq_len: int, restart: int) -> dict[str, Any]:
    """Batch of 2 packed rows (row 0 restarts at ``restart``, row 1 is one document): does each row of the batched
    forward/backward equal the row alone, and does the kernel equal the reference on the same inputs?"""
    from hf_sparsek.scripts.packing import segment_ids
    from transformers import AutoModelForCausalLM

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
    p.add_argument("mode", choices=("throughput", "multi", "summarize", "packcheck"))
    p.add_argument("--runs-dirs", nargs=2, metavar=("SPARSE_DIR", "DENSE_DIR"), help="summarize: two finetune outputs")
    p.add_argument("--name", default="finetune_shakespeare", help="summarize: result file stem")
    p.add_argument("--models", nargs="+", default=["smollm2-135m"], choices=sorted(MODELS))
    p.add_argument("--seq-lens", nargs="+", type=int, default=[16384, 32768])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=240, help="stop starting new measurements after this")
    p.add_argument("--seq-len", type=int, default=8192, help="multi: training length")
    p.add_argument("--max-steps", type=int, default=30, help="multi: optimizer steps")
    p.add_argument("--train-data", default="synthetic", help="multi: token file or 'synthetic'")
    p.add_argument("--pattern", default='{"block_size": 128, "sink_tokens": 128, "window": 1024}')
    p.add_argument("--runs", nargs="+", default=["1gpu", "ddp", "fsdp"])
    p.add_argument("--work", default="/tmp/hf_sparsek_multi")
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
