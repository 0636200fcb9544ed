"""Where a sparse pattern loses the passkey (CPU, float32, the PyTorch reference): SmolLM2-135M passkey prompts.

    python -m scripts.experiments.passkey_loss --tokens .carry/learned/tokens.pt.xz --out DIR

Two measurements on prompts that dense attention answers (from ``scripts/gpu_learned.py --make-tokens``):

* ``needle_mass``: on the dense model's q and k (``capture_qk``), of the attention the rows that predict the answer put
  on the passkey's tokens in the prompt, the share each selector's tiles (plus sink and window) keep, over every
  layer and head;
* ``layers``: the teacher-forced passkey answer (``greedy_matches``) with the pattern on a subset of layers only
  (the others dense), to find where the loss happens.

Writes ``passkey_loss.json`` (through ``scripts/common.write_json``: command, commit, date, versions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from hf_sparsek import SparsePattern


def passkey_span(prompt: list[int], answer: list[int]) -> torch.Tensor | None:
    """Positions of the passkey's tokens in the prompt (the answer without its last token, first occurrence)."""
    span = answer[:-1] if len(answer) > 1 else answer
    for s in range(len(prompt) - len(span) + 1):
        if prompt[s: s + len(span)] == span:
            return torch.arange(s, s + len(span))
    return None


def needle_mass(model, prompts, patterns: dict[str, SparsePattern]) -> dict:
    """{selector: share of the answer rows' dense attention on the passkey kept} over the prompts (module doc)."""
    from hf_sparsek.eval.selection_recall import capture_qk

    from hf_sparsek.selection import select_tiles

    kept = dict.fromkeys(patterns, 0.0)
    total = 0.0
    for prompt, answer in prompts:
        needle = passkey_span(prompt, answer)
        if needle is None:
            continue
        ids = torch.tensor([prompt + answer])
        n = ids.shape[1]
        rows = torch.arange(len(prompt) - 1, n - 1)
        pos = torch.arange(n)
        caps = capture_qk(model, ids)
        for q, k, _ in caps.values():
            hq, hkv = q.shape[1], k.shape[1]
            logits = torch.einsum("bhtd,bhsd->bhts", q[:, :, rows].float(),
                                  k.float().repeat_interleave(hq // hkv, 1)) / math.sqrt(q.shape[-1])
            causal = pos.view(1, -1) <= rows.view(-1, 1)
            p = logits.masked_fill(~causal, float("-inf")).softmax(-1)[0][:, :, needle]  # (Hq, rows, needle)
            total += float(p.sum())
            for name, pattern in patterns.items():
                tiles = select_tiles(q, k, pattern, 0, 0, None)[0].repeat_interleave(hq // hkv, 0)
                sel = tiles[:, rows // pattern.block_size]  # (Hq, rows, topk)
                static = (needle < pattern.sink_tokens).view(1, -1) | (
                    (rows.view(-1, 1) - needle.view(1, -1)) < (pattern.window or 0))
                hit = (sel.unsqueeze(-1) == (needle // pattern.block_size).view(1, 1, 1, -1)).any(2) | static
                kept[name] += float((p * hit).sum())
    return {name: value / max(total, 1e-30) for name, value in kept.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", required=True, help="token file with 'needle' prompts (scripts/gpu_learned.py)")
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/hf_sparsek/models/smollm2-135m-v1"))
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--depth", type=float, default=0.9)
    ap.add_argument("--trials", default="1,2,3", help="prompt indices for needle_mass")
    ap.add_argument("--layer-trial", type=int, default=1, help="the prompt of the layer study")
    ap.add_argument("--dense-layers", default="none,0-30,0-15,15-30,7-30,0-7+15-30",
                    help="layer sets kept dense in the layer study: 'none', 'a-b' ranges joined by '+'")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from hf_sparsek.eval.modeling import apply_pattern, parse_patterns
    from hf_sparsek.eval.needle import greedy_matches
    from transformers import AutoModelForCausalLM

    from hf_sparsek.model_defaults import default_key
    from scripts.common import load_token_file, write_json

    torch.set_num_threads(os.cpu_count() or 1)
    data = load_token_file(args.tokens)
    cases = [([int(x) for x in p], [int(x) for x in a]) for p, a in data["needle"][(args.length, args.depth)]]
    base = {"block_size": 64, "sink_tokens": 64, "window": 512, "topk_blocks": 7}
    patterns = {"mass": SparsePattern(**base, selector="mass"),
                "probe stride 16": SparsePattern(**base, selector="probe", probe_stride=16),
                "probe stride 4": SparsePattern(**base, selector="probe", probe_stride=4)}
    results: dict = {"model": args.model, "length": args.length, "depth": args.depth, "pattern": base}
    dense_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    chosen = [cases[int(i)] for i in args.trials.split(",")]
    t0 = time.perf_counter()
    results["needle_mass"] = {"trials": args.trials, **needle_mass(dense_model, chosen, patterns)}
    results["needle_mass"]["seconds"] = time.perf_counter() - t0
    print(json.dumps(results["needle_mass"]), flush=True)

    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sparsek", dtype=torch.float32).eval()
    prompt, answer = cases[args.layer_trial]
    rows = []
    for spec in args.dense_layers.split(","):
        dense = [] if spec == "none" else [i for part in spec.split("+") for i in range(*map(int, part.split("-")))]
        pattern = json.dumps({"default": {**base, "selector": "probe", "probe_stride": 4}, "dense_layers": dense})
        apply_pattern(model, parse_patterns([pattern], default_key(model.config))[0])
        with torch.no_grad():
            found = greedy_matches(model, prompt, answer, torch.device("cpu"))
        rows.append({"dense_layers": spec, "sparse_layers": model.config.num_hidden_layers - len(dense),
                     "found": found})
        print(json.dumps(rows[-1]), flush=True)
    results["layers"] = {"trial": args.layer_trial, "selector": "probe stride 4", "rows": rows}
    write_json(os.path.join(args.out, "passkey_loss.json"), results)
    print(f"wrote {os.path.join(args.out, 'passkey_loss.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
