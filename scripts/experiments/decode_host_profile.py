"""Where the host time of an eager top-k decode step goes (issue 24), and a sweep of forward configs for the brief's
small shape: one GPU call, two questions.

    python -m scripts.experiments.decode_host_profile --out $OUT          # H200: about 1 minute
    python -m scripts.experiments.decode_host_profile --cpu-smoke --out /tmp/x

Part 1 (decode, B=1, 512K keys, 32 / 8 heads, D 128, bf16, sink 128 + window 1024 + top-56 of 128, selector mass
with the selection store): per piece of the call, the host time per call (``perf_counter`` over 200 enqueued
calls, then one synchronisation: the GPU work of a call is shorter than its host work, so the queue never fills)
beside the GPU time (``do_bench``, CUDA events), and a cProfile of 200 whole calls (top functions by own time).
Part 2 (B=16, H=96, S=512, D=64, fp16, causal, sink 64 + window 128, block 64): forward configs x TMA on / off,
kernel alone with a prebuilt index, beside SDPA. Writes ``decode_host_profile.json`` (the cProfile text in it).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--out", default=os.environ.get("OUT", "host_profile_out"))
ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, Triton interpreter")
ARGS = ap.parse_args()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_sparsek import SparsePattern  # noqa: E402
from hf_sparsek.ops import build_index_for, sparse_attention  # noqa: E402
from hf_sparsek.selection import SelectionState, select_tiles  # noqa: E402
from hf_sparsek.triton_ops import triton_block_sparse_attention  # noqa: E402
from scripts.common import bench_ms, options, write_json  # noqa: E402

CUDA = torch.cuda.is_available() and not ARGS.cpu_smoke
DEVICE = "cuda" if CUDA else "cpu"
RESULTS: dict = {"decode_pieces": [], "small_config": [], "errors": []}


def host_us(fn, calls: int = 200) -> float:
    """Microseconds of host time per call: ``calls`` enqueued back to back, one synchronisation at the end."""
    fn()
    if CUDA:
        torch.cuda.synchronize()
    calls = calls if CUDA else 3
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    if CUDA:
        torch.cuda.synchronize()
    return host / calls * 1e6


def piece(name: str, fn) -> None:
    try:
        row = {"piece": name, "host_us": host_us(fn), "gpu_ms": bench_ms(fn)}
    except Exception as exc:  # recorded, the run goes on
        row = {"piece": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    RESULTS["decode_pieces"].append(row)
    print(json.dumps(row))


def decode_pieces() -> None:
    from hf_sparsek.kernels import selection as sel_kernel

    from hf_sparsek.ops import _decode_without_index

    batch, hq, hkv, dim = 1, 32, 8, 128
    kv_len = (1 << 19) if CUDA else 2048
    block, topk = (128, 56) if CUDA else (64, 4)
    pattern = SparsePattern(block_size=block, sink_tokens=128, window=1024 if CUDA else 128, topk_blocks=topk)
    n = kv_len - 1
    dtype = torch.bfloat16 if CUDA else torch.float32
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(batch, hq, 1, dim, generator=gen, device=DEVICE).to(dtype)
    k = torch.randn(batch, hkv, n, dim, generator=gen, device=DEVICE).to(dtype)
    v = torch.randn(batch, hkv, n, dim, generator=gen, device=DEVICE).to(dtype)
    with torch.no_grad():
        state = SelectionState()
        sparse_attention(q, k[:, :, :-1], v[:, :, :-1], pattern, selection_state=state)
        whole = lambda: sparse_attention(q, k, v, pattern, selection_state=state)  # noqa: E731
        piece("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        piece("whole call (store)", whole)
        piece("select_tiles (store)", lambda: select_tiles(q, k, pattern, n - 1, 0, None, selection_state=state))
        piece("state.key_features", lambda: state.key_features(k, None, n - 1, 1, 0, block, CUDA))
        piece("pool_features(q)", lambda: sel_kernel.pool_features(q, n - 1, block, None, 0, True))
        selected = select_tiles(q, k, pattern, n - 1, 0, None, selection_state=state)
        kf = state.key_features(k, None, n - 1, 1, 0, block, CUDA)
        qf = sel_kernel.pool_features(q, n - 1, block, None, 0, True)
        n_k = kf.shape[2]
        if CUDA:
            piece("_select_short", lambda: sel_kernel._select_short(
                qf, kf, selected, selected, False, batch=batch, hkv=hkv, group=hq // hkv, n_q=1, n_k=n_k,
                q_offset=n - 1, q_len=1, kv_offset=0, kv_len=n, block=block, sink=128, topk=topk, window=1024,
                threshold=None, scale=dim**-0.5))
            mass = torch.rand(batch, hkv, 1, n_k, device=DEVICE)
            piece("torch.topk+where+to", lambda: torch.where(torch.topk(mass, topk, -1)[0] >= 0,
                                                             torch.topk(mass, topk, -1)[1], -1).to(torch.int32))
        piece("decode kernel with selected (no selection)", lambda: _decode_with(q, k, v, pattern, selected))
        piece("decode static sink+window (same ranges)", lambda: _decode_without_index(
            q, k, v, SparsePattern(block_size=block, sink_tokens=128, window=pattern.window), n - 1, 0, None, None,
            None, None, None, dim**-0.5, None, "auto", False))
        piece("torch.empty x1", lambda: torch.empty(1, 8, 1, 64, device=DEVICE))
        if CUDA:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                whole()
            prof.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("tottime").print_stats(45)
            stats.sort_stats("cumulative").print_stats(45)
            RESULTS["cprofile_whole_call_x200"] = text.getvalue().splitlines()


def _decode_with(q, k, v, pattern, selected):
    from hf_sparsek.triton_ops import triton_decode_without_index

    block = pattern.block_size
    q_offset = k.shape[2] - 1
    last_tile = q_offset // block + 1
    first = max(0, q_offset - pattern.window + 1) // block
    return triton_decode_without_index(q, k, v, block=block, q_offset=q_offset, kv_offset=0, sink=128,
                                       window=pattern.window, scale=q.shape[-1] ** -0.5, softcap=None,
                                       ranges=(0, 1, first, last_tile), selected=selected)


def small_config() -> None:
    from hf_sparsek.kernels.attention_fwd import FwdConfig
    from hf_sparsek.kernels.dispatch import forward

    batch, heads, seq, dim = (16, 96, 512, 64) if CUDA else (1, 2, 128, 64)
    dtype = torch.float16 if CUDA else torch.float32
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=gen, device=DEVICE).to(dtype) for _ in range(3))
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=128)
    index = build_index_for(q, k, pattern)
    scale = dim**-0.5
    lists = (index.full_count, index.full_tiles, index.part_count, index.part_tiles)
    with torch.no_grad():
        want = triton_block_sparse_attention(q, k, v, index, scale)
        RESULTS["small_sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        RESULTS["small_whole_call_ms"] = bench_ms(lambda: sparse_attention(q, k, v, pattern))
        configs = [None, FwdConfig(64, 64, 4, 2), FwdConfig(64, 64, 4, 3), FwdConfig(64, 64, 4, 4),
                   FwdConfig(64, 64, 4, 1), FwdConfig(64, 32, 4, 3), FwdConfig(64, 64, 8, 2),
                   FwdConfig(128, 64, 4, 2), FwdConfig(128, 32, 4, 2), FwdConfig(64, 32, 2, 2)]
        for tma in (None, False):
            for cfg in configs:
                row = {"config": str(cfg), "tma": tma}
                try:
                    with options(tma=tma) as opts:
                        call = lambda o=opts, c=cfg: forward(q, k, v, *lists, None, None, None, 64, 0, 0, 64,  # noqa
                                                             128, scale, 0.0, o, c)
                        got = call()[0]
                        row["max_abs_diff"] = float((got.float() - want.float()).abs().max().item())
                        row["ms"] = bench_ms(call)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                RESULTS["small_config"].append(row)
                print(json.dumps(row))


def main() -> int:
    os.makedirs(ARGS.out, exist_ok=True)
    for part in (decode_pieces, small_config):
        try:
            part()
        except Exception as exc:
            import traceback

            RESULTS["errors"].append({"part": part.__name__, "trace": traceback.format_exc()[-2000:]})
            print(f"{part.__name__} failed: {exc}")
    write_json(os.path.join(ARGS.out, "decode_host_profile.json"), RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
