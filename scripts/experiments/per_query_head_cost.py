"""What ``per_query_head`` costs per attention call: the whole ``sparse_attention`` forward (selection, index,
attention) with one tile list per KV group and per query head, beside torch SDPA dense, at Gemma 3 270M's full-layer
shape (batch 1, 4 query / 1 KV heads, D 256, bf16) and at 32 / 8 heads, D 128; the pattern of the Gemma evaluation
(sink 64 + window 128 + top-29 of 64-token tiles: 25% of the causal pairs at 16K, 12.5% at 32K).

    python -m scripts.experiments.per_query_head_cost --out $OUT          # GPU, about a minute
    python -m scripts.experiments.per_query_head_cost --out DIR --cpu-smoke  # tiny sizes, reference backend

``--shapes gemma --strides 4,8,16 --extra '[{...}]'`` times other probe strides and whole candidate patterns (each
labelled by ``SparsePattern.describe``) beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = {"gemma3-270m full layer (4/1 heads, D 256)": (4, 1, 256), "32/8 heads, D 128": (32, 8, 128)}
BASE = {"block_size": 64, "sink_tokens": 64, "window": 128, "topk_blocks": 29}


def _time_ms(fn: Callable[[], object], cpu: bool) -> float:
    if cpu:
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def _time_cases(hq: int, hkv: int, dim: int, seq: int, device: str, dtype: torch.dtype, cpu: bool,
                strides: list[int], extra: list[dict]) -> dict[str, float]:
    """Milliseconds per forward call of every case at one shape and length."""
    from hf_sparsek import SparsePattern, sparse_attention

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, h, seq, dim, device=device, dtype=dtype, generator=g) for h in (hq, hkv, hkv))
    out = {}
    with torch.no_grad():
        out["sdpa dense"] = _time_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv), cpu)
        for sel in [{"selector": "mass"}] + [{"selector": "probe", "probe_stride": s} for s in strides]:
            for per_head in (False, True):
                pattern = {**BASE, **sel, "per_query_head": per_head}
                label = sel["selector"] + (f" stride {sel['probe_stride']}" if "probe_stride" in sel else "")
                label += ", per query head" if per_head else ", per KV group"
                out[label] = _time_ms(lambda p=pattern: sparse_attention(q, k, v, p), cpu)
        for fields in extra:
            pattern = SparsePattern(**fields)
            out[pattern.describe()] = _time_ms(lambda p=pattern: sparse_attention(q, k, v, p), cpu)
    return out


def main() -> None:
    from hf_sparsek import SparsePattern
    from hf_sparsek.describe import pattern_density
    from scripts.common import write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--shapes", default="", help="comma list of words; shapes whose name holds one (default: all)")
    ap.add_argument("--strides", default="16,4", help="probe strides timed per KV group and per query head")
    ap.add_argument("--extra", default="[]", help="JSON list of whole patterns (SparsePattern fields) to time")
    args = ap.parse_args()
    strides = [int(x) for x in args.strides.split(",") if x]
    extra = json.loads(args.extra)
    words = [w for w in args.shapes.split(",") if w]
    shapes = {name: dims for name, dims in SHAPES.items() if not words or any(w in name for w in words)}
    if not shapes:
        raise SystemExit(f"--shapes {args.shapes!r} matches none of {list(SHAPES)}")
    cpu = args.cpu_smoke
    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    lengths = [2048] if cpu else [16384, 32768]
    own = {SparsePattern(**fields).describe(): SparsePattern(**fields) for fields in extra}
    rows = []
    for shape, (hq, hkv, dim) in shapes.items():
        for seq in lengths:
            density = pattern_density(SparsePattern(**BASE), seq)
            for label, ms in _time_cases(hq, hkv, dim, seq, device, dtype, cpu, strides, extra).items():
                rows.append({"shape": shape, "seq_len": seq, "case": label, "ms": ms,
                             "density": 1.0 if label.startswith("sdpa") else density})
                if label in own:  # a candidate pattern: its own budget (min_sparse_len, tail)
                    rows[-1]["density"] = pattern_density(own[label], seq)
                print(f"{shape:<42} {seq:>6} {label:<36} {ms:9.3f} ms", flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "per_query_head_cost.json"),
               {"command": " ".join(["python -m scripts.experiments.per_query_head_cost", *sys.argv[1:]]),
                "rows": rows})


if __name__ == "__main__":
    main()
