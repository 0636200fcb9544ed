"""Score candidate SmolLM2 patterns at 8K on the same window as scripts/results/eval_cpu_tune_smollm2_8k.json."""
import json
import sys

import torch
from hf_sparsek.eval.cli import _encode
from hf_sparsek.eval.modeling import load_model, parse_patterns
from hf_sparsek.eval.offline import load_documents
from hf_sparsek.eval.ppl import run_ppl

model, tok, path = load_model("smollm2-135m", torch.device("cpu"), torch.float32)
docs = [_encode(tok)(d) for d in load_documents()]
specs = parse_patterns(sys.argv[2:], "llama")
rows = run_ppl(model, docs, [8192], specs, torch.device("cpu"), None, 8192)
dense = 34.85401477059919  # dense PPL on this window (eval_cpu_tune_smollm2_8k.json)
for r in rows:
    r["delta_vs_dense_run_pct"] = 100 * (r["ppl"] / dense - 1)
    print(r["pattern"], round(r["ppl"], 3), round(r["delta_vs_dense_run_pct"], 2), round(r["density"], 3))
out = {"dense_ppl_same_window": dense, "results": rows, "patterns": [s.to_dict() for s in specs]}
json.dump(out, open(sys.argv[1], "w"), indent=2)
