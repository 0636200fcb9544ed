"""Where a ``dense_tail`` call's time goes: the whole call beside its parts (the first rows under the pattern on
sliced or contiguous inputs, the tail rows dense in one call or in split-KV runs, the concatenation), at Gemma 3
270M's full-layer shape (batch 1, 4 query / 1 KV heads, D 256, bf16).

    python -m scripts.experiments.dense_tail_cost --out $OUT          # GPU, under a minute
    python -m scripts.experiments.dense_tail_cost --out DIR --cpu-smoke  # tiny sizes, reference backend
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def _time_parts(seq: int, pattern, device: str, dtype: torch.dtype, cpu: bool, runs: list[int]) -> list[dict]:
    """The whole call and its parts at one length, and the split-KV runs one whole call launches."""
    from hf_sparsek import SparsePattern, sparse_attention
    from scripts.experiments.per_query_head_cost import _time_ms

    plain = pattern.replace(dense_tail=0)
    dense = SparsePattern(block_size=pattern.block_size)
    tail = pattern.dense_tail
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, h, seq, 256, device=device, dtype=dtype, generator=g) for h in (4, 1, 1))
    head = seq - tail
    qh, kh, vh = q[:, :, :head], k[:, :, :head], v[:, :, :head]
    qhc, khc, vhc = qh.contiguous(), kh.contiguous(), vh.contiguous()
    qt = q[:, :, head:]
    parts = {
        "whole call": lambda: sparse_attention(q, k, v, pattern),
        "pattern without tail, whole call": lambda: sparse_attention(q, k, v, plain),
        "first rows, sliced inputs": lambda: sparse_attention(qh, kh, vh, plain, q_offset=0),
        "first rows, contiguous inputs": lambda: sparse_attention(qhc, khc, vhc, plain, q_offset=0),
        "tail rows dense, one call": lambda: sparse_attention(qt, k, v, dense, q_offset=head),
        "tail rows dense, runs of 16": lambda: [sparse_attention(qt[:, :, s:s + 16], k, v, dense, q_offset=head + s)
                                                for s in range(0, tail, 16)],
        "concatenation": lambda: torch.cat([qh, qt], 2),
        "torch SDPA, dense causal": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True),
    }
    from scripts.experiments.split_kv_rows import prefill_kernel_over_16_rows

    parts["tail rows dense, one call, prefill kernel over 16 rows"] = lambda: prefill_kernel_over_16_rows(
        lambda: sparse_attention(qt, k, v, dense, q_offset=head))
    parts["whole call, prefill kernel over 16 rows"] = lambda: prefill_kernel_over_16_rows(
        lambda: sparse_attention(q, k, v, pattern))
    parts["whole call, K / V repeated per query head"] = lambda: repeated_kv(lambda: sparse_attention(q, k, v, pattern))
    rows = []
    with torch.no_grad():
        diff = (parts["whole call"]().float() - parts["whole call, K / V repeated per query head"]().float()).abs()
        rows.append({"seq_len": seq, "case": "max abs diff, broadcast view vs repeated K / V",
                     "value": float(diff.max())})
        print(f"{seq:6d} max abs diff, broadcast view vs repeated K / V: {float(diff.max()):.3e}", flush=True)
        for name, fn in parts.items():
            ms = _time_ms(fn, cpu)
            rows.append({"seq_len": seq, "case": name, "ms": ms})
            print(f"{seq:6d} {name:40s} {ms:8.3f} ms", flush=True)
        runs.clear()
        sparse_attention(q, k, v, pattern)
    rows.append({"seq_len": seq, "case": "split-KV runs in one whole call", "runs": list(runs)})
    print(f"{seq:6d} split-KV runs in one whole call: {runs}", flush=True)
    if not cpu:
        for name in ("whole call", "pattern without tail, whole call", "whole call, K / V repeated per query head"):
            rows.append({"seq_len": seq, "case": f"profile: {name}", "kernels": _profile(parts[name])})
    return rows


def repeated_kv(fn):
    """Run ``fn`` with one KV head repeated per query head under ``per_query_head`` (a copy, as before the broadcast
    view; ``ops._broadcast_heads_fit``)."""
    from hf_sparsek import ops

    saved = ops._broadcast_heads_fit
    ops._broadcast_heads_fit = lambda head_dim: False
    try:
        return fn()
    finally:
        ops._broadcast_heads_fit = saved


def _profile(fn) -> list[dict]:
    """GPU time per kernel over 10 calls (torch.profiler), and the host's wall time per call: says whether the
    extra time is kernels or host work."""
    import time

    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        host_ms = 1e3 * (time.perf_counter() - t0) / 10  # launch-bound if this is near the GPU total
        torch.cuda.synchronize()
    stats = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    stats.sort(key=lambda e: -e.device_time_total)
    out = [{"name": e.key[:90], "calls_per_iter": e.count / 10, "gpu_ms_per_iter": e.device_time_total / 1e4}
           for e in stats[:14]]
    out.append({"name": "host wall per call, no sync (ms)", "ms": host_ms})
    for row in out:
        print("   ", row, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--pattern", default='{"block_size": 64, "sink_tokens": 64, "window": 128, "topk_blocks": 28, '
                    '"selector": "probe", "probe_stride": 8, "per_query_head": true, "dense_tail": 64}')
    args = ap.parse_args()
    from hf_sparsek import SparsePattern, triton_ops
    from scripts.common import write_json

    cpu = args.cpu_smoke
    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    pattern = SparsePattern.from_dict(json.loads(args.pattern))
    rows: list[dict] = []
    runs: list[int] = []
    real = triton_ops.triton_decode_without_index
    triton_ops.triton_decode_without_index = lambda q, *a, **kw: runs.append(q.shape[2]) or real(q, *a, **kw)
    for seq in [512] if cpu else [16384, 32768]:
        rows += _time_parts(seq, pattern, device, dtype, cpu, runs)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "dense_tail_cost.json"),
               {"command": "python -m scripts.experiments.dense_tail_cost " + " ".join(sys.argv[1:]),
                "pattern": pattern.to_dict(), "rows": rows})


if __name__ == "__main__":
    main()
