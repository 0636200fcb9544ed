"""What splitting the probe selector's keys over more programs buys: the kernel alone and the whole call.

    python -m scripts.experiments.probe_split_cost --baseline .carry/baseline_probe --out $OUT   # GPU, ~2 minutes
    python -m scripts.experiments.probe_split_cost --baseline .carry/baseline_probe --cpu-smoke --out /tmp/x

Selector ``"probe"`` ran one program per (query tiles, KV head), each over all the causal keys of its tiles: few
heads (Gemma 3's full layers: 4 query heads on 1 KV head; any ``per_query_head`` pattern), short calls and decode
steps gave fewer programs than the GPU has SMs, and the causal triangle left the early tiles' programs idle. The
kernel now also splits the keys (``hf_sparsek.kernels.probe.probe_splits``) and starts the heavy tiles first.
``--baseline`` holds the kernel before the change (``git show e66e07f:kernels/probe.py > old_probe.py``), loaded
beside the current one and timed in one process on one GPU:

- kernel alone (``select_by_probe``): before, now with one fused launch (``splits=1``), now by the rule; the tile
  sets of every query tile equal to the baseline's (share of rows);
- the whole ``sparse_attention`` forward (selection, index, attention) with the rule on and off
  (``PROBE_PROGRAMS_PER_SM = 0``: never split), beside torch SDPA dense.

The curated result is the key ``probe_split_cost`` of ``scripts/results/selection_cost.json`` (a new run
replaces it).
"""

from __future__ import annotations

import math
import os
import sys

from scripts.ab_args import baseline_args

ARGS = baseline_args(__doc__.splitlines()[0], "folder with old_probe.py", "probe_split_out")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hf_sparsek.kernels import probe  # noqa: E402

from hf_sparsek import SparsePattern, sparse_attention  # noqa: E402
from scripts.common import bench_ms, load_module_as, write_json  # noqa: E402

GEMMA = dict(block_size=64, sink_tokens=64, window=128, topk_blocks=29)  # the Gemma evaluation's budget
ISSUE = dict(block_size=64, sink_tokens=64, window=256, topk_blocks=24)  # issue 22's selection-cost case
SMOL = dict(block_size=64, sink_tokens=64, window=512, topk_blocks=7)  # the llama default's budget


def _same_sets(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of (batch, head, query tile) rows whose tile sets agree."""
    return float((a.sort(-1).values == b.sort(-1).values).all(-1).float().mean())


def kernel_case(old, label: str, batch: int, hq: int, hkv: int, dim: int, q_len: int, kv_len: int, base: dict,
                stride: int, device: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, hq, q_len, dim, generator=gen, device=device).to(dtype)
    k = torch.randn(batch, hkv, kv_len, dim, generator=gen, device=device).to(dtype)
    args = dict(block=base["block_size"], q_offset=kv_len - q_len, kv_offset=0, sink=base["sink_tokens"],
                topk=base["topk_blocks"], window=base["window"], threshold=None, scale=1 / math.sqrt(dim),
                stride=stride)
    n_q = -(-q_len // base["block_size"])
    row = {"case": label, "batch": batch, "hq": hq, "hkv": hkv, "dim": dim, "q_len": q_len, "kv_len": kv_len,
           "stride": stride, **base, "n_q_tiles": n_q}
    before = old.select_by_probe(q, k, None, None, None, **args)
    fused = probe.select_by_probe(q, k, None, None, None, splits=1, **args)
    auto = probe.select_by_probe(q, k, None, None, None, **args)
    row["same_sets_fused"] = _same_sets(before, fused)
    row["same_sets_rule"] = _same_sets(before, auto)
    row["before_ms"] = bench_ms(lambda: old.select_by_probe(q, k, None, None, None, **args))
    row["fused_ms"] = bench_ms(lambda: probe.select_by_probe(q, k, None, None, None, splits=1, **args))
    row["rule_ms"] = bench_ms(lambda: probe.select_by_probe(q, k, None, None, None, **args))
    return row


def call_case(label: str, hq: int, hkv: int, dim: int, seq: int, pattern: dict, device: str,
              dtype: torch.dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, h, seq, dim, generator=gen, device=device).to(dtype) for h in (hq, hkv, hkv))
    sp = SparsePattern(**pattern)
    row = {"case": label, "hq": hq, "hkv": hkv, "dim": dim, "seq_len": seq, "pattern": sp.to_dict()}
    with torch.no_grad():
        row["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                         enable_gqa=hq != hkv))
        saved = probe.PROBE_PROGRAMS_PER_SM
        try:
            probe.PROBE_PROGRAMS_PER_SM = 0
            off = sparse_attention(q, k, v, sp)
            row["rule_off_ms"] = bench_ms(lambda: sparse_attention(q, k, v, sp))
        finally:
            probe.PROBE_PROGRAMS_PER_SM = saved
        on = sparse_attention(q, k, v, sp)
        row["rule_on_ms"] = bench_ms(lambda: sparse_attention(q, k, v, sp))
        row["max_abs_diff_on_off"] = float((on.float() - off.float()).abs().max())
    return row


def main() -> None:
    old = load_module_as("hf_sparsek.kernels.old_probe", os.path.join(ARGS.baseline, "old_probe.py"),
                         "hf_sparsek.kernels")
    device, dtype = ("cpu", torch.float32) if ARGS.cpu_smoke else ("cuda", torch.bfloat16)
    if ARGS.cpu_smoke:
        kernels = [("gemma per head", 1, 4, 4, 256, 300, 300, GEMMA, 16), ("decode", 2, 4, 2, 64, 1, 700, ISSUE, 16)]
        calls = [("gemma per head, probe 16", 4, 1, 256, 300,
                  {**GEMMA, "selector": "probe", "probe_stride": 16, "per_query_head": True})]
    else:
        kernels = []
        for seq in (8192, 16384, 32768):
            for stride in (4, 16):
                kernels.append(("gemma full layer per query head", 1, 4, 4, 256, seq, seq, GEMMA, stride))
        for seq in (16384, 32768):
            for stride in (4, 16):
                kernels.append(("gemma full layer per KV group", 1, 4, 1, 256, seq, seq, GEMMA, stride))
        for seq in (16384, 65536):
            kernels.append(("32/8 heads D128", 1, 32, 8, 128, seq, seq, ISSUE, 16))
        kernels += [("smollm2 per query head", 1, 9, 9, 64, 8192, 8192, SMOL, 4),
                    ("smollm2 per KV group", 1, 9, 3, 64, 8192, 8192, SMOL, 4),
                    ("decode 32/8 D128 B8", 8, 32, 8, 128, 1, 131072, ISSUE, 16),
                    ("decode 32/8 D128 B1", 1, 32, 8, 128, 1, 524288, ISSUE, 16),
                    ("decode smollm2 per query head", 1, 9, 9, 64, 1, 8192, SMOL, 4)]
        calls = []
        for seq in (8192, 16384, 32768):
            for stride in (4, 16):
                for per_head in (True, False):
                    calls.append((f"gemma full layer, probe {stride}, {'per query head' if per_head else 'group'}",
                                  4, 1, 256, seq, {**GEMMA, "selector": "probe", "probe_stride": stride,
                                                   "per_query_head": per_head}))
        for per_head in (True, False):
            calls.append((f"smollm2, probe 4, {'per query head' if per_head else 'group'}", 9, 3, 64, 8192,
                          {**SMOL, "selector": "probe", "probe_stride": 4, "per_query_head": per_head}))
        for seq in (16384, 65536):
            calls.append(("32/8 heads D128, probe 16", 32, 8, 128, seq, {**ISSUE, "selector": "probe"}))
    rows, call_rows = [], []
    for case in kernels:
        row = kernel_case(old, *case, device=device, dtype=dtype)
        rows.append(row)
        print(f"{row['case']:<34} L{row['kv_len']:>7} q{row['q_len']:>6} s{row['stride']:>2} before "
              f"{row['before_ms']:8.3f} fused {row['fused_ms']:8.3f} rule {row['rule_ms']:8.3f} ms  same "
              f"{row['same_sets_fused']:.4f}/{row['same_sets_rule']:.4f}", flush=True)
    for case in calls:
        row = call_case(*case, device=device, dtype=dtype)
        call_rows.append(row)
        print(f"{row['case']:<44} L{row['seq_len']:>6} sdpa {row['sdpa_ms']:8.3f} off {row['rule_off_ms']:8.3f} "
              f"on {row['rule_on_ms']:8.3f} ms  diff {row['max_abs_diff_on_off']:.2e}", flush=True)
    os.makedirs(ARGS.out, exist_ok=True)
    write_json(os.path.join(ARGS.out, "probe_split_cost.json"),
               {"command": " ".join(sys.argv), "kernel_rows": rows, "call_rows": call_rows})


if __name__ == "__main__":
    main()
