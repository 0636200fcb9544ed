#!/usr/bin/env bash
# One 30-minute device lease for the selection, learned-selector and Gemma 3 results (docs/benchmarks.md), as
# back-to-back device calls: `bash scripts/gpu_lease.sh STEP` from the repository root of the carried tree, with the
# folders named below carried. A call carries at most 64 MiB and a machine idle 30 s is given back, so the models
# travel in parts over consecutive calls and each step must follow the previous one at once.
#
#   step  carry                           does                                                      about
#   1     .carry/sm1                      stage SmolLM2 part 1 + gguf; gpu_selection                 2 min
#   2     .carry/sm2 .carry/learned       gpu_learned SmolLM2 8K (probe, oracle, learned, passkey)   4 min
#   3     .carry/g1                       stage Gemma part 1; gpu_decode                             3 min
#   4     .carry/g2                       stage Gemma part 2                                         -
#   5     .carry/g3                       stage Gemma part 3                                         -
#   6     .carry/g4                       gpu_learned Gemma 3 32K (12.4% and 6.2% budgets, passkey)  8 min
#   7     .carry/g4                       gpu_eval Gemma 3 16K + 32K perplexity, passkey              6 min
#
# Results land under $OUT/<step name>/; commit them under scripts/results/ (one file per benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: bash scripts/gpu_lease.sh STEP (1-7)}"
out="${OUT:?OUT must name the output folder}"
export PYTHONUNBUFFERED=1

gemma_site=".carry/g4/gguf-0.19.0-py3-none-any.whl"
budget_a='{"block_size": 64, "sink_tokens": 64, "window": 1024, "topk_blocks": 15}'
budget_b='{"block_size": 64, "sink_tokens": 64, "window": 512, "topk_blocks": 7}'

case "$step" in
  1)
    mkdir -p /tmp/hfs && cp .carry/sm1/part_aa /tmp/hfs/part_aa
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/sm1/gguf-0.19.0-py3-none-any.whl
    python3 -m scripts.gpu_selection --out "$out/selection"
    ;;
  2)
    PYTHONPATH="/tmp/site:$PWD" python3 -m scripts.gpu_learned --gguf-parts /tmp/hfs/part_aa .carry/sm2/part_ab \
      --tokens .carry/learned/tokens.pt.xz --train-windows 16 --steps 200 --ppl-tokens 65536 --out "$out/learned"
    ;;
  3 | 4 | 5)
    part=$((step - 2))
    mkdir -p /tmp/stage && cp ".carry/g$part/"*.whl /tmp/stage/
    if [ "$step" = 3 ]; then python3 -m scripts.gpu_decode --out "$out/decode"; fi
    ;;
  6)
    PYTHONPATH="$gemma_site:$PWD" python3 -m scripts.gpu_learned --model gemma3-270m --stage /tmp/stage .carry/g4 \
      --tokens .carry/g4/tokens.pt.xz --seq-len 32768 --train-windows 8 --steps 200 --ppl-tokens 65536 \
      --pattern "$budget_a" --second-pattern "$budget_b" --static-window 2048 --out "$out/learned_gemma"
    ;;
  7)
    static='{"block_size": 64, "sink_tokens": 64, "window": 2048}'
    patterns=$(python3 - "$budget_a" "$static" <<'EOF'
import json, sys
budget, static = json.loads(sys.argv[1]), sys.argv[2]
rows = ["dense", "default", static, json.dumps(budget)]
rows += [json.dumps({**budget, "selector": s}) for s in ("probe", "oracle")]
rows.append(json.dumps({**budget, "selector": "probe", "probe_stride": 4}))
print(json.dumps(rows))
EOF
)
    PYTHONPATH="$gemma_site:$PWD" python3 -m scripts.gpu_eval --model gemma3-270m --stage /tmp/stage .carry/g4 \
      --tokens .carry/g4/tokens.pt.xz --contexts 16384,32768 --max-tokens 65536 --patterns "$patterns" \
      --out "$out/eval_gemma"
    ;;
  *)
    echo "unknown step $step (1-7)" >&2
    exit 2
    ;;
esac
