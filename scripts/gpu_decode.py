"""Per-call cost of decode and small shapes (index, selection and launch included) beside torch SDPA, and end-to-end
``generate()`` on a 1B-class Llama with random weights: issue 24's table, re-measured in one run.

    python -m scripts.gpu_decode --out $OUT            # H200: about 4 minutes
    python -m scripts.gpu_decode --cpu-smoke --out /tmp/x   # tiny sizes, Triton interpreter

Per case: SDPA dense (the reference cost), the library's whole call (``hf_sparsek.sparse_attention``: whatever index,
selection and launches it needs), the same call the old way (an index built for the call, then the forward kernel,
no split-KV) and the kernel alone (inputs prepared outside the timing). Decode bandwidth counts the K/V bytes the
call actually reads (the tiles its pattern visits). Each decode row also has ``host_profile``: the host's
microseconds per call (calls issued without synchronising) and cProfile's functions with the most own time. Writes
``decode_<device>.json`` and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--out", default=os.environ.get("OUT", "decode_out"))
ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes in the Triton interpreter on CPU")
ap.add_argument("--skip-generate", action="store_true")
ap.add_argument("--generate-lengths", default="4096,32768,131072")
ap.add_argument("--new-tokens", type=int, default=32)
ap.add_argument("--max-seconds", type=float, default=480.0)
ap.add_argument("--generate-only", action="store_true", help="only generate(): no per-call cases")
ap.add_argument("--generate-pattern", default=None,
                help="pattern JSON for generate() (default: sink 128 + window 4096, block 128)")
ap.add_argument("--generate-shape", default="16,2048,32,8",
                help="layers,hidden,heads,kv_heads of the random Llama generate() runs (default: 1.1B)")
ap.add_argument("--tag", default="", help="suffix of the results file name (decode_<board><tag>.json)")
ARGS = ap.parse_args()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hf_sparsek  # noqa: E402
from hf_sparsek import SparsePattern  # noqa: E402
from hf_sparsek.ops import build_index_for, sparse_attention  # noqa: E402
from hf_sparsek.triton_ops import triton_block_sparse_attention  # noqa: E402
from scripts.common import bench_ms, capture_cuda_graph, options, timed_generate, write_json  # noqa: E402

DEVICE = "cpu" if ARGS.cpu_smoke else "cuda"
START = time.time()
RESULTS: dict = {"cases": [], "small_config_sweep": [], "generate": [], "errors": []}


def _left() -> float:
    return ARGS.max_seconds - (time.time() - START)


def _rand(shape, dtype):
    return torch.randn(shape, device=DEVICE, dtype=torch.float32).to(dtype)


def _visited_tokens(index) -> float:
    """Keys per (batch, KV head) the index lists for its last query tile (decode reads those)."""
    counts = index.full_count[..., -1].float() + index.part_count[..., -1].float()
    return float(counts.mean().item()) * index.block_size


def decode_case(name: str, batch: int, kv_len: int, pattern: SparsePattern, q_len: int = 1, hq: int = 32,
                hkv: int = 8, dim: int = 128, dtype=torch.bfloat16) -> None:
    if _left() < 20:
        return
    q = _rand((batch, hq, q_len, dim), dtype)
    k = _rand((batch, hkv, kv_len, dim), dtype)
    v = _rand((batch, hkv, kv_len, dim), dtype)
    row: dict = {"case": name, "batch": batch, "kv_len": kv_len, "q_len": q_len, "hq": hq, "hkv": hkv, "dim": dim,
                 "dtype": str(dtype).replace("torch.", ""), "pattern": pattern.to_dict()}
    try:
        with torch.no_grad():
            row["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv))
            whole = lambda: sparse_attention(q, k, v, pattern)  # noqa: E731
            row["whole_call_ms"] = bench_ms(whole)
            index = build_index_for(q, k, pattern)
            row["index_build_ms"] = bench_ms(lambda: build_index_for(q, k, pattern))
            scale = dim**-0.5
            with options(split_kv_decode=False):
                row["old_path_ms"] = bench_ms(  # the call before: an index per call, the forward kernel
                    lambda: triton_block_sparse_attention(q, k, v, build_index_for(q, k, pattern), scale))
                row["forward_kernel_ms"] = bench_ms(lambda: triton_block_sparse_attention(q, k, v, index, scale))
            row["split_kv_kernel_ms"] = bench_ms(lambda: triton_block_sparse_attention(q, k, v, index, scale))
            ref = triton_block_sparse_attention(q, k, v, index, scale)
            with options(split_kv_decode=False):
                ref_fwd = triton_block_sparse_attention(q, k, v, index, scale)
            got = whole()
            row["max_abs_diff_vs_forward_kernel"] = float((got.float() - ref_fwd.float()).abs().max().item())
            if DEVICE == "cuda":
                row.update(_graph_replay(whole, got))
            row["host_profile"] = _host_profile(whole)
            row["max_abs_diff_split_vs_forward"] = float((ref.float() - ref_fwd.float()).abs().max().item())
        tokens = _visited_tokens(index)
        row["visited_tokens_per_head"] = tokens
        bytes_read = batch * hkv * tokens * dim * 2 * q.element_size()
        row["sparse_gb"] = bytes_read / 1e9
        row["sparse_tb_s_whole"] = bytes_read / row["whole_call_ms"] / 1e9
        row["sparse_tb_s_kernel"] = bytes_read / row["split_kv_kernel_ms"] / 1e9
        dense_bytes = batch * hkv * kv_len * dim * 2 * q.element_size()
        row["sdpa_tb_s"] = dense_bytes / row["sdpa_ms"] / 1e9
        row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["whole_call_ms"]
    except Exception as exc:  # a case that fails is recorded, the run goes on
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        RESULTS["errors"].append({"case": name, "trace": traceback.format_exc()[-2000:]})
    RESULTS["cases"].append(row)
    _print_row(row)


def _graph_replay(call, expected: torch.Tensor) -> dict:
    """Capture the whole call in a CUDA graph (possible only when it reads nothing on the host) and time a replay:
    the call's GPU time without the Python around it."""
    try:
        graph, out = capture_cuda_graph(call)
        graph.replay()
        torch.cuda.synchronize()
        return {"graph_replay_ms": bench_ms(graph.replay),
                "graph_max_abs_diff": float((out.float() - expected.float()).abs().max().item())}
    except Exception as exc:
        return {"graph_error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def _host_profile(call, iters: int = 50, top: int = 20) -> dict:
    """Where the host's time in a call goes (the eager decode call is host-bound): wall microseconds per call issued
    without synchronising (the host's own pace while the GPU keeps up), and the functions with the most own time
    under cProfile (its overhead inflates Python-heavy rows; the ranking is what it is for)."""
    import cProfile
    import pstats

    call()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    host_us = (time.perf_counter() - start) / iters * 1e6
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        call()
    prof.disable()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    return {"host_us_per_call": host_us, "profiled_iters": iters,
            "top_own_time": [{"function": f"{os.path.basename(f)}:{line}:{name}", "calls_per_call": nc / iters,
                              "own_us_per_call": tt / iters * 1e6, "cum_us_per_call": ct / iters * 1e6}
                             for (f, line, name), (_, nc, tt, ct, _) in rows]}


def decode_store_case(batch: int, kv_len: int, pattern: SparsePattern, hq: int = 32, hkv: int = 8, dim: int = 128,
                      dtype=torch.bfloat16) -> None:
    """Top-k decode with the selection store (issue 24: per-block key metadata kept with the cache): the state is
    filled by one call at the previous position, then a decode call reusing it is timed (its last tile holds
    ``block - 1`` keys, so every call refreshes that tile and checks the fingerprint) beside the same call pooling
    every key, SDPA, the selection alone with / without the store and the refresh alone."""
    from hf_sparsek.selection import SelectionState, select_tiles

    if _left() < 20:
        return
    n = kv_len - 1  # the keys of the timed call: the last tile is still filling
    q = _rand((batch, hq, 1, dim), dtype)
    k, v = _rand((batch, hkv, n, dim), dtype), _rand((batch, hkv, n, dim), dtype)
    size = f"{kv_len // 1024}K" if kv_len >= 1024 else str(kv_len)
    row: dict = {"case": f"decode B{batch} {size} top-{pattern.topk_blocks} of {pattern.block_size} "
                 "(mass, store)", "batch": batch, "kv_len": n, "q_len": 1, "hq": hq, "hkv": hkv, "dim": dim,
                 "dtype": str(dtype).replace("torch.", ""), "pattern": pattern.to_dict()}
    try:
        with torch.no_grad():
            state = SelectionState()
            sparse_attention(q, k[:, :, :-1], v[:, :, :-1], pattern, selection_state=state)  # the step before
            stored = state.tiles
            with_store = lambda: sparse_attention(q, k, v, pattern, selection_state=state)  # noqa: E731
            got = with_store()
            row["reused_all"] = bool(state.reused.all().item()) and state.tiles == stored
            row["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv))
            row["whole_call_ms"] = bench_ms(with_store)
            row["whole_call_no_store_ms"] = bench_ms(lambda: sparse_attention(q, k, v, pattern))
            want = sparse_attention(q, k, v, pattern)
            row["max_abs_diff_vs_no_store"] = float((got.float() - want.float()).abs().max().item())
            select = lambda st=None: select_tiles(q, k, pattern, n - 1, 0, None, selection_state=st)  # noqa: E731
            row["selection_store_ms"] = bench_ms(lambda: select(state))
            if DEVICE == "cuda":  # the same selection by one program per (batch, KV head) (before the split path)
                import hf_sparsek.kernels.selection as selection_kernel

                threshold = selection_kernel.SHORT_MIN_KEY_TILES
                selection_kernel.SHORT_MIN_KEY_TILES = 1 << 40
                try:
                    row["selection_store_one_program_ms"] = bench_ms(lambda: select(state))
                    row["same_tiles_one_program"] = bool(torch.equal(select(state), select()))
                finally:
                    selection_kernel.SHORT_MIN_KEY_TILES = threshold
            row["selection_no_store_ms"] = bench_ms(select)
            row["same_tiles"] = bool(torch.equal(select(state), select()))
            row["refresh_ms"] = bench_ms(lambda: state.key_features(k, None, n - 1, 1, 0, pattern.block_size,
                                                                    q.is_cuda))
            if DEVICE == "cuda":
                row.update(_graph_replay(with_store, got))
            row["host_profile"] = _host_profile(with_store)
            tokens = _visited_tokens(build_index_for(q, k, pattern))
        row["visited_tokens_per_head"] = tokens
        bytes_read = batch * hkv * tokens * dim * 2 * q.element_size()
        row["sparse_tb_s_whole"] = bytes_read / row["whole_call_ms"] / 1e9
        row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["whole_call_ms"]
        row["speedup_vs_no_store"] = row["whole_call_no_store_ms"] / row["whole_call_ms"]
    except Exception as exc:  # a case that fails is recorded, the run goes on
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        RESULTS["errors"].append({"case": row["case"], "trace": traceback.format_exc()[-2000:]})
    RESULTS["cases"].append(row)
    _print_row(row)


def _print_row(row: dict) -> None:
    """A case's numbers on one line (its pattern and host profile left to the JSON)."""
    print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()
                      if k not in ("pattern", "host_profile")}))
    prof = row.get("host_profile")
    if prof:
        print(f"  host {prof['host_us_per_call']:.1f} us a call; own time (cProfile):")
        for entry in prof["top_own_time"][:12]:
            print(f"    {entry['own_us_per_call']:8.1f} us  x{entry['calls_per_call']:.0f}  {entry['function']}")


def prefill_case(name: str, batch: int, hq: int, hkv: int, seq: int, dim: int, dtype, pattern: SparsePattern) -> None:
    if _left() < 20:
        return
    q, k, v = (_rand((batch, h, seq, dim), dtype) for h in (hq, hkv, hkv))
    row: dict = {"case": name, "batch": batch, "seq": seq, "hq": hq, "hkv": hkv, "dim": dim,
                 "dtype": str(dtype).replace("torch.", ""), "pattern": pattern.to_dict()}
    try:
        with torch.no_grad():
            row["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                             enable_gqa=hq != hkv))
            row["whole_call_ms"] = bench_ms(lambda: sparse_attention(q, k, v, pattern))
            with hf_sparsek.settings(dense_via_sdpa=True):
                row["whole_call_dense_via_sdpa_ms"] = bench_ms(lambda: sparse_attention(q, k, v, pattern,
                                                                                        dense_via_sdpa=True))
            row["index_build_ms"] = bench_ms(lambda: build_index_for(q, k, pattern))
            index = build_index_for(q, k, pattern)
            row["kernel_ms"] = bench_ms(lambda: triton_block_sparse_attention(q, k, v, index, dim**-0.5))
            row["whole_over_kernel"] = row["whole_call_ms"] / row["kernel_ms"]
            row["whole_over_sdpa"] = row["whole_call_ms"] / row["sdpa_ms"]
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        RESULTS["errors"].append({"case": name, "trace": traceback.format_exc()[-2000:]})
    RESULTS["cases"].append(row)
    _print_row(row)


def small_config_sweep(batch: int, heads: int, seq: int, dim: int, dtype, pattern: SparsePattern) -> None:
    """The forward kernel's launch configs on the small shape (is a better one there?)."""
    from hf_sparsek.kernels import dispatch
    from hf_sparsek.kernels.attention_fwd import FWD_CANDIDATES, FwdConfig

    from hf_sparsek.runtime import kernel_options

    q, k, v = (_rand((batch, heads, seq, dim), dtype) for _ in range(3))
    index = build_index_for(q, k, pattern)
    cands = list(FWD_CANDIDATES.get(dim, [])) + [FwdConfig(64, 64, 4, 2), FwdConfig(64, 32, 4, 2),
                                                   FwdConfig(64, 64, 2, 2), FwdConfig(32, 64, 4, 2),
                                                   FwdConfig(64, 64, 4, 1), FwdConfig(64, 64, 4, 3),
                                                   FwdConfig(64, 64, 8, 2), FwdConfig(64, 128, 4, 2)]
    for cfg in cands:
        if _left() < 15:
            break
        run = lambda cfg=cfg: dispatch.forward(  # noqa: E731
            q, k, v, index.full_count, index.full_tiles, index.part_count, index.part_tiles, None, None, None,
            index.block_size, index.q_offset, index.kv_offset, index.sink_tokens, index.window or 0, dim**-0.5, 0.0,
            kernel_options(), config=cfg)
        entry = {"config": repr(cfg), "pattern": pattern.to_dict()}
        try:
            entry["ms"] = bench_ms(run)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        RESULTS["small_config_sweep"].append(entry)
        print("sweep", entry)


def generate_case(length: int, impl: str, model) -> None:
    """Prefill seconds and decode milliseconds per token of ``generate()`` (greedy, batch 1). Each step is stamped by
    a logits processor after a device synchronisation: decode time is the median gap between steps (prefill noise
    does not leak into it)."""
    if _left() < 40:
        return
    row: dict = {"prompt": length, "impl": impl, "new_tokens": ARGS.new_tokens}
    try:
        model.set_attn_implementation(impl)
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=DEVICE)

        def run(new: int) -> tuple[float, list[float]]:
            out, prefill, gaps = timed_generate(model, ids, new)
            assert out.shape[1] == length + new
            return prefill, gaps

        run(3)  # warm-up: compiles, allocator
        prefill, gaps = run(ARGS.new_tokens + 1)
        gaps.sort()
        row["prefill_s"] = prefill
        row["decode_ms_per_token"] = gaps[len(gaps) // 2] * 1e3
        row["decode_ms_p10_p90"] = [gaps[len(gaps) // 10] * 1e3, gaps[(9 * len(gaps)) // 10] * 1e3]
        row["tokens_per_s"] = 1e3 / row["decode_ms_per_token"]
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        RESULTS["errors"].append({"case": f"generate {impl} {length}", "trace": traceback.format_exc()[-2000:]})
    RESULTS["generate"].append(row)
    print(json.dumps(row))
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def run_generate(lengths: list[int], pattern: SparsePattern, layers: int, hidden: int, heads: int, kv_heads: int
                 ) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
                         max_position_embeddings=max(lengths) + 64, head_dim=hidden // heads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEVICE, torch.bfloat16 if DEVICE == "cuda" else torch.float32).eval()
    model.generation_config.pad_token_id = 0
    hf_sparsek.set_pattern(model, pattern)
    RESULTS["generate_model"] = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
                                 "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
                                 "pattern": pattern.to_dict()}
    for length in lengths:
        for impl in ("sdpa", "sparsek"):
            generate_case(length, impl, model)


def _warm_up(seconds: float = 3.0) -> None:
    """Kernels compiled and the GPU busy a few seconds before the first timed case (the first case of a cold machine
    read up to 2x slower than the same case later in one run)."""
    q, k = _rand((8, 32, 1, 128), torch.bfloat16), _rand((8, 8, 131072, 128), torch.bfloat16)
    pattern = SparsePattern(block_size=128, sink_tokens=128, window=8192)
    end = time.time() + seconds
    with torch.no_grad():
        while time.time() < end:
            sparse_attention(q, k, k, pattern)
            F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    torch.cuda.synchronize()


def table() -> str:
    lines = ["| case | SDPA ms | whole call ms | old path ms | index build ms | split-KV kernel ms | "
             "forward kernel ms | whole call as CUDA graph ms | x SDPA | TB/s (whole) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k, p="%.3f": (p % r[k]) if isinstance(r.get(k), float) else ""  # noqa: E731
    for r in RESULTS["cases"]:
        if "q_len" in r:
            lines.append(f"| {r['case']} | {f(r, 'sdpa_ms')} | {f(r, 'whole_call_ms')} | {f(r, 'old_path_ms')} | "
                         f"{f(r, 'index_build_ms')} | {f(r, 'split_kv_kernel_ms')} | {f(r, 'forward_kernel_ms')} | "
                         f"{f(r, 'graph_replay_ms')} | {f(r, 'speedup_vs_sdpa', '%.2f')} | "
                         f"{f(r, 'sparse_tb_s_whole', '%.2f')} |"
                         + (f" {r['error'][:60]}" if "error" in r else ""))
        else:
            lines.append(f"| {r['case']} | {f(r, 'sdpa_ms')} | {f(r, 'whole_call_ms')} | | {f(r, 'index_build_ms')}"
                         f" | | {f(r, 'kernel_ms')} | | {f(r, 'whole_over_sdpa', '%.2f')} (time / SDPA) | |")
    lines += ["", "| prompt | impl | prefill s | decode ms/token | tokens/s |", "|---|---|---|---|---|"]
    for r in RESULTS["generate"]:
        lines.append(f"| {r['prompt']} | {r['impl']} | {f(r, 'prefill_s')} | {f(r, 'decode_ms_per_token')} | "
                     f"{f(r, 'tokens_per_s', '%.1f')} |" + (f" {r['error'][:60]}" if "error" in r else ""))
    return "\n".join(lines)


def _generate_pattern() -> SparsePattern:
    if ARGS.generate_pattern is None:
        return SparsePattern(block_size=128, sink_tokens=128, window=4096)
    return SparsePattern.from_dict(json.loads(ARGS.generate_pattern))


def _generate_shape() -> tuple[int, int, int, int]:
    layers, hidden, heads, kv_heads = (int(x) for x in ARGS.generate_shape.split(","))
    return layers, hidden, heads, kv_heads


def main() -> int:
    window8k = SparsePattern(block_size=128, sink_tokens=128, window=8192)
    topk56 = SparsePattern(block_size=128, sink_tokens=128, window=1024, topk_blocks=56)
    if ARGS.generate_only:  # e.g. a top-k pattern or another model shape: generate() alone
        if not ARGS.cpu_smoke:
            _warm_up()
        lengths = [int(x) for x in ARGS.generate_lengths.split(",") if x]
        run_generate(lengths, _generate_pattern(), *_generate_shape())
    elif ARGS.cpu_smoke:
        small = SparsePattern(block_size=64, sink_tokens=8, window=128)
        decode_case("smoke decode B2", 2, 700, small, hq=4, hkv=2, dim=64, dtype=torch.float32)
        decode_case("smoke decode topk", 1, 700, SparsePattern(block_size=64, sink_tokens=8, window=64, topk_blocks=3),
                    hq=4, hkv=2, dim=64, dtype=torch.float32)
        decode_store_case(2, 700, small.replace(topk_blocks=3), hq=4, hkv=2, dim=64, dtype=torch.float32)
        prefill_case("smoke prefill", 1, 4, 2, 256, 64, torch.float32, small)
        if not ARGS.skip_generate:
            run_generate([300], SparsePattern(block_size=64, sink_tokens=8, window=128), 2, 64, 4, 2)
    else:
        _warm_up()
        decode_case("decode B8 128K sink128+win8192", 8, 131072, window8k)
        decode_case("decode B1 512K sink128+win8192", 1, 524288, window8k)
        decode_case("decode B1 512K top-56 of 128 (mass)", 1, 524288, topk56)
        decode_case("decode B1 512K top-56 of 128 (meanpool)", 1, 524288, topk56.replace(selector="meanpool"))
        decode_case("decode B8 128K top-56 of 128 (mass)", 8, 131072, topk56)
        decode_store_case(1, 524288, topk56)
        decode_store_case(8, 131072, topk56)
        decode_case("decode B8 128K sink128+win8192 q_len 4", 8, 131072, window8k, q_len=4)
        prefill_case("prefill 16K sink128+win4096", 1, 32, 8, 16384, 128, torch.bfloat16,
                     SparsePattern(block_size=128, sink_tokens=128, window=4096))
        orig_dense = SparsePattern(block_size=64)
        orig_sw = SparsePattern(block_size=64, sink_tokens=64, window=128)
        prefill_case("brief B16 H96 S512 D64 fp16 dense", 16, 96, 96, 512, 64, torch.float16, orig_dense)
        prefill_case("brief B16 H96 S512 D64 fp16 sink64+win128", 16, 96, 96, 512, 64, torch.float16, orig_sw)
        small_config_sweep(16, 96, 512, 64, torch.float16, orig_dense)
        small_config_sweep(16, 96, 512, 64, torch.float16, orig_sw)
        if not ARGS.skip_generate:
            lengths = [int(x) for x in ARGS.generate_lengths.split(",") if x]
            run_generate(lengths, _generate_pattern(), *_generate_shape())
    RESULTS["elapsed_s"] = time.time() - START
    board = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    board = next((b for b in ("h200", "h100", "a100", "b200") if b in board.lower()),
                 "".join(c for c in board.lower() if c.isalnum())[:16] or "gpu")
    name = "decode_" + ("cpu-smoke" if ARGS.cpu_smoke else board) + ARGS.tag + ".json"
    RESULTS["table"] = table()
    write_json(os.path.join(ARGS.out, name), RESULTS)
    print(RESULTS["table"])
    print("errors:", len(RESULTS["errors"]))
    for e in RESULTS["errors"]:
        print(e["case"], e["trace"][-600:])
    return 0


if __name__ == "__main__":
    sys.exit(main())

