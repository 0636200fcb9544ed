"""The Triton kernels at every head dim and block size in float32 (and 16-bit beside), against the reference.

    python -m scripts.gpu_dtype_coverage [--out DIR] [--cpu-smoke]

The tile tables are tuned for 16-bit inputs; float32 needs twice the shared memory per tile, so some tables do not
fit (Gemma 3's head dim 256 in float32 raised OutOfResources in the forward on an H100). Per (dtype, head dim,
block): a prefill of 2 x 700 tokens (4 query / 2 KV heads, the second row left-padded by 37) with sink 64 +
window 128 + top-2 "mass" tiles, output and gradients; a decode step (q_len 1, then 4) against 1,500 cached keys
with the same pattern, and with the "probe" selector per query head. Each against ``backend="reference"`` on the
same inputs; every case is recorded with its error, a failure never ends the run. Writes ``dtype_coverage.json``.
"""

from __future__ import annotations

import argparse
import os
import time
import traceback

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--out", default=os.environ.get("OUT", "dtype_coverage_out"))
ap.add_argument("--cpu-smoke", action="store_true", help="Triton interpreter, one small case")
ap.add_argument("--dims", default="64,128,256", help="float32 head dims to check")
ARGS = ap.parse_args()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from hf_sparsek import SparsePattern, sparse_attention  # noqa: E402
from scripts.common import write_json  # noqa: E402

DEVICE = "cpu" if ARGS.cpu_smoke else "cuda"
TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12)).item()


def case(dtype: torch.dtype, dim: int, block: int) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(dim + block)
    length = 300 if ARGS.cpu_smoke else 700
    topk = SparsePattern(block_size=block, sink_tokens=64, window=128, topk_blocks=2, selector="mass")
    probe = SparsePattern(block_size=block, sink_tokens=64, window=128, topk_blocks=2, selector="probe",
                          per_query_head=True)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEVICE, generator=gen).to(dtype)

    row: dict = {"dtype": str(dtype).removeprefix("torch."), "head_dim": dim, "block": block}
    mask = torch.ones(2, length, dtype=torch.bool, device=DEVICE)
    mask[1, :37] = False
    q, k, v = (rand(2, h, length, dim).requires_grad_() for h in (4, 2, 2))
    grad = rand(2, 4, length, dim)
    try:
        outs = {}
        for backend in ("triton", "reference"):
            out = sparse_attention(q, k, v, topk, attention_mask=mask, backend=backend)
            outs[backend] = (out, *torch.autograd.grad(out, (q, k, v), grad))
        row["prefill"] = max(rel_err(a, b) for a, b in zip(outs["triton"], outs["reference"], strict=True))
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        row["prefill"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["prefill_trace"] = traceback.format_exc()[-1500:]
    kv = 900 if ARGS.cpu_smoke else 1500
    kc, vc = rand(2, 2, kv, dim), rand(2, 2, kv, dim)
    for name, pattern in (("decode_mass", topk), ("decode_probe_per_query_head", probe)):
        for q_len in (1, 4):
            key = f"{name}_q{q_len}"
            try:
                qd = rand(2, 4, q_len, dim)
                got = sparse_attention(qd, kc, vc, pattern, backend="triton")
                want = sparse_attention(qd, kc, vc, pattern, backend="reference")
                row[key] = rel_err(got, want)
            except Exception as exc:  # noqa: BLE001
                row[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
    row["ok"] = all(isinstance(v, float) and v < TOL[dtype] for k, v in row.items()
                    if k not in ("dtype", "head_dim", "block", "prefill_trace"))
    return row


def main() -> None:
    os.makedirs(ARGS.out, exist_ok=True)
    start = time.perf_counter()
    if ARGS.cpu_smoke:
        grid = [(torch.float32, 64, 64)]
    else:
        grid = [(torch.float32, int(d), b) for d in ARGS.dims.split(",") for b in (64, 128)]
        grid += [(torch.bfloat16, 256, 128), (torch.float16, 256, 64)]
    rows = []
    for dtype, dim, block in grid:
        row = case(dtype, dim, block)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "prefill_trace"}, flush=True)
        write_json(os.path.join(ARGS.out, "dtype_coverage.json"),  # after every row: a cut-off run keeps its rows
                   {"rows": rows, "all_ok": all(r["ok"] for r in rows),
                    "elapsed_s": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    main()
