#!/usr/bin/env bash
# One 30-minute device lease for the selection, learned-selector and Gemma 3 results (docs/benchmarks.md), as
# back-to-back device calls: `bash scripts/gpu_lease.sh STEP` from the repository root of the carried tree, with the
# folders named below carried. A call carries at most 64 MiB and a machine idle 30 s is given back, so the models
# travel in parts over consecutive calls and each step must follow the previous one at once.
#
#   step  carry                           does                                                      about
#   1     .carry/sm1 .carry/minference    stage SmolLM2 part 1 + gguf (where carried); gpu_selection     2 min
#         (.carry/baseline)               (with MInference's block_sparse_flash_attention.py and an earlier
#                                         kernels package as kernels_baseline where carried; not in git)
#   2     .carry/sm2 .carry/learned       gpu_learned SmolLM2 8K (probe, refine, oracle, learned     6 min
#                                         passkey)
#   3     .carry/g1                       stage Gemma part 1; gpu_decode (SKIP_DECODE=1: not)          3 min
#   4     .carry/g2                       stage Gemma part 2                                         -
#   5     .carry/g3                       stage Gemma part 3                                         -
#   6     .carry/g4                       gpu_learned Gemma 3 32K (12.5% and 6.2% budgets, passkey)  6 min
#   7     .carry/g4                       gpu_eval Gemma 3 16K + 32K perplexity by selector and       9 min
#                                         budget composition, passkey
#   8     .carry/g4                       gpu_learned Gemma 3 16K (24.6% and 12.5% budgets, passkey)  5 min
#   9     -                               gpu_adapt_learned: LoRA under the learned selector vs dense  3 min
#                                         LoRA, on step 2's SmolLM2 model and scorer (right after 2)
#   10    -                               gpu_decode, then gpu_compiled_decode (issue 24's decode        9 min
#                                         table: eager calls, CUDA-graph steps, compiled generate())
#   (gpu_learned's rows: static, mass, probe, refine with strides 16 and 4, oracle, learned, per budget)
#
# Results land under $OUT/<step name>/; commit them under scripts/results/ (one file per benchmark). Run each step as
# `HF_SPARSEK_COMMIT=<git rev-parse HEAD here> OUT=$OUT bash scripts/gpu_lease.sh STEP`.
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: bash scripts/gpu_lease.sh STEP (1-10)}"
out="${OUT:?OUT must name the output folder}"
# the device copy's git history is not this tree's: results files take the commit from here
export HF_SPARSEK_COMMIT="${HF_SPARSEK_COMMIT:?set HF_SPARSEK_COMMIT to the commit of the carried tree}"
export PYTHONUNBUFFERED=1

gemma_site=".carry/g4/gguf-0.19.0-py3-none-any.whl"
budget_a='{"block_size": 64, "sink_tokens": 64, "window": 1024, "topk_blocks": 15}'
# 32K budgets with a short window (step 7's compositions measured them best): 12.5% and 6.2% of the full layers' causal pairs
budget_32k='{"block_size": 64, "sink_tokens": 64, "window": 128, "topk_blocks": 29}'
budget_32k_small='{"block_size": 64, "sink_tokens": 64, "window": 128, "topk_blocks": 13}'
# 16K: the selection issue's 24.6% budget (budget_a) and about 12.5% with the short window
budget_16k_small='{"block_size": 64, "sink_tokens": 64, "window": 128, "topk_blocks": 12}'

case "$step" in
  1)
    if [ -d .carry/sm1 ]; then  # staging for step 2 (not needed by the selection benchmark itself)
      mkdir -p /tmp/hfs && cp .carry/sm1/part_aa /tmp/hfs/part_aa
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/sm1/gguf-0.19.0-py3-none-any.whl
    fi
    minference=.carry/minference/block_sparse_flash_attention.py
    extra=()
    if [ -f "$minference" ]; then extra=(--minference-file "$minference"); fi
    # an earlier kernels package timed beside ours (gpu_selection --baseline-kernels; made with git archive)
    if [ -d .carry/baseline/kernels_baseline ]; then extra+=(--baseline-kernels .carry/baseline); fi
    python3 -m scripts.gpu_selection --out "$out/selection" "${extra[@]}"
    ;;
  2)
    PYTHONPATH="/tmp/site:$PWD" python3 -m scripts.gpu_learned --gguf-parts /tmp/hfs/part_aa .carry/sm2/part_ab \
      --tokens .carry/learned/tokens.pt.xz --train-windows 16 --steps 200 --ppl-tokens 65536 --modes query,query:own \
      --out "$out/learned"
    ;;
  3 | 4 | 5)
    part=$((step - 2))
    mkdir -p /tmp/stage && cp ".carry/g$part/"*.whl /tmp/stage/
    if [ "$step" = 3 ] && [ "${SKIP_DECODE:-0}" != 1 ]; then python3 -m scripts.gpu_decode --out "$out/decode"; fi
    ;;
  6)
    PYTHONPATH="$gemma_site:$PWD" python3 -m scripts.gpu_learned --model gemma3-270m --stage /tmp/stage .carry/g4 \
      --tokens .carry/g4/tokens.pt.xz --seq-len 32768 --train-windows 8 --steps 150 --ppl-tokens 65536 \
      --probe-strides 4 --pattern "$budget_32k" --second-pattern "$budget_32k_small" --out "$out/learned_gemma"
    ;;
  7)
    # one call, one results file: the selectors at sink 64 + window 1024 + top-15 (16K and 32K), then the 32K
    # budget compositions (window 128 / 512 at 12.5%, window 128 at 6.2%); passkey on the first set + window 128
    python3 - "$budget_a" <<'EOF'
import json, sys
budget = json.loads(sys.argv[1])
b = lambda w, k, **kw: json.dumps({"block_size": 64, "sink_tokens": 64, "window": w, "topk_blocks": k, **kw})
rows = ["dense", "default", json.dumps({"block_size": 64, "sink_tokens": 64, "window": 2048}), json.dumps(budget)]
rows += [json.dumps({**budget, "selector": s}) for s in ("probe", "oracle")]
rows.append(json.dumps({**budget, "selector": "probe", "probe_stride": 4}))
needle = rows + [b(128, 29, selector="probe", probe_stride=4)]
rows += [b(128, 29, selector="oracle"), needle[-1], b(128, 29, selector="probe"),
         b(512, 23, selector="probe", probe_stride=4), b(512, 23, selector="oracle"), b(128, 13, selector="oracle"),
         b(128, 13, selector="probe", probe_stride=4)]
with open("/tmp/gemma_patterns.json", "w") as f:
    json.dump(rows, f)
with open("/tmp/gemma_needle.json", "w") as f:
    json.dump(needle, f)
EOF
    PYTHONPATH="$gemma_site:$PWD" python3 -m scripts.gpu_eval --model gemma3-270m --stage /tmp/stage .carry/g4 \
      --tokens .carry/g4/tokens.pt.xz --contexts 16384,32768 --max-tokens 65536 \
      --patterns "$(cat /tmp/gemma_patterns.json)" --needle-patterns "$(cat /tmp/gemma_needle.json)" \
      --out "$out/eval_gemma"
    ;;
  8)
    PYTHONPATH="$gemma_site:$PWD" python3 -m scripts.gpu_learned --model gemma3-270m --stage /tmp/stage .carry/g4 \
      --tokens .carry/g4/tokens.pt.xz --seq-len 16384 --train-windows 8 --steps 150 --ppl-tokens 65536 \
      --probe-strides 4 --pattern "$budget_a" --second-pattern "$budget_16k_small" --out "$out/learned_gemma_16k"
    ;;
  9)
    python3 -m scripts.gpu_adapt_learned --work /tmp/gpu_learned --model smollm2-135m --seq-len 8192 --steps 120 \
      --ppl-tokens 65536 --out "$out/adapt"
    ;;
  10)  # the compiled rows first (never measured on a GPU), the per-call ones before generate()
    python3 -m scripts.gpu_compiled_decode --out "$out/compiled_decode" --max-seconds 360 --calls-first
    python3 -m scripts.gpu_decode --out "$out/decode" --max-seconds 200
    ;;
  *)
    echo "unknown step $step (1-10)" >&2
    exit 2
    ;;
esac
