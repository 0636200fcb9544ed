"""GPU correctness sweep + benchmark of the Triton block-sparse attention kernels (one script, one device call).

    PYTHONUNBUFFERED=1 python -m scripts.gpu_kernels [--quick] [--max-seconds 450] [--out DIR]
    TRITON_INTERPRET=1 python -m scripts.gpu_kernels --cpu-smoke       # tiny sizes, CPU interpreter, fp32

(a) correctness: bf16 kernel vs the fp32 reference (forward and dQ/dK/dV) at realistic sizes; per-case max abs and
relative-norm errors; exits non-zero when any case fails. (b) benchmark: sparsek vs FlexAttention (same mask),
cuDNN SDPA and SDPA flash (dense causal), forward and forward+backward, TFLOP/s counted on attended pairs
(4*D*pairs forward, 2.5x that forward+backward). Writes ``bench.json`` (with the run's metadata: command, commit,
date, device, versions, kernel options) and ``bench.md`` to --out ($OUT by default) and prints the table last.
Every case runs in try/except and is recorded, an error never ends the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes (4K, 16K, 64K) and cases")
    ap.add_argument("--max-seconds", type=float, default=450.0, help="stop starting new cases after this budget")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes in the Triton interpreter on CPU")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--skip-check", action="store_true", help="skip the correctness sweep")
    ap.add_argument("--only", default="", help="comma-separated benchmark groups: main,orig,dims,long")
    ap.add_argument("--tune", action="store_true", help="time candidate kernel configs first and keep the fastest")
    ap.add_argument("--sizes", default="", help="comma-separated sequence lengths for the main group")
    ap.add_argument("--tune-dims", default="128,64,256", help="head dims --tune covers")
    ap.add_argument("--runtime-autotune", action="store_true",
                    help="time the kernels with HF_SPARSEK_AUTOTUNE on (choices saved to OUT/autotune.json)")
    ap.add_argument("--bwd-ab", action="store_true",
                    help="also time forward+backward with dQ and dK/dV launched one after the other (same run)")
    ap.add_argument("--rows-tma-ab", action="store_true",
                    help="also time forward+backward with the dK/dV kernel's query/dO rows loaded by pointers "
                         "(method sparsek-ptrrows) beside the default TMA rows")
    ap.add_argument("--gluon-ab", action="store_true",
                    help="also time the kernels with the Gluon forward off (method sparsek-tritonfwd) beside the "
                         "default, and run the checks both ways")
    ap.add_argument("--tma-ab", action="store_true",
                    help="also check and time the kernels with TMA loads off (method sparsek-ptr) beside the default")
    return ap.parse_args()


ARGS = _parse()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from hf_sparsek.kernels import attention_bwd_gluon, attention_fwd_gluon, autotune, tma  # noqa: E402
from hf_sparsek.kernels.attention_bwd import BWD_CANDIDATES, BWD_CONFIGS  # noqa: E402
from hf_sparsek.kernels.attention_fwd import FWD_CANDIDATES, FWD_CONFIGS  # noqa: E402

import hf_sparsek  # noqa: E402
from hf_sparsek import BlockLayout, SparsePattern  # noqa: E402
from hf_sparsek.block_index import BlockIndex, attended_pairs, causal_pairs, random_layout_keep  # noqa: E402
from hf_sparsek.ops import build_index_for  # noqa: E402
from hf_sparsek.reference import reference_attention  # noqa: E402
from hf_sparsek.runtime import kernel_options  # noqa: E402
from hf_sparsek.triton_ops import triton_block_sparse_attention  # noqa: E402
from scripts.common import bench_ms, gluon_forward_runs, options, run_metadata, write_json  # noqa: E402

DEVICE = "cpu" if ARGS.cpu_smoke else "cuda"
START = time.time()
RESULTS: dict = {"checks": [], "bench": [], "errors": []}


def _left() -> float:
    return ARGS.max_seconds - (time.time() - START)


def _rand(shape, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def _pairs(index: BlockIndex, batch: int, hq: int, hkv: int) -> int:
    """Attended (query, key) pairs over all query heads (exact, from the index)."""
    group = hq // hkv
    n_h = index.full_count.shape[1]
    if n_h == 1:
        return attended_pairs(index) * batch * hq
    return sum(attended_pairs(index, head=h) for h in range(n_h)) * batch * group


# ---------------------------------------------------------------- (a) correctness ---------------------------------

def _rand_heads(batch, heads, length, dim, dtype, gen, seq_major: bool) -> torch.Tensor:
    """(B, H, S, D); ``seq_major``: transformers' layout, a transposed view of a (B, S, H, D) tensor."""
    if seq_major:
        return _rand((batch, length, heads, dim), dtype, gen).transpose(1, 2)
    return _rand((batch, heads, length, dim), dtype, gen)


def check_case(name, batch, hq, hkv, q_len, kv_len, dim, pattern, dtype, softcap=None, pad=0,
               seq_major=False) -> bool:
    gen = torch.Generator(device=DEVICE).manual_seed(sum(map(ord, name)))
    q = _rand_heads(batch, hq, q_len, dim, dtype, gen, seq_major).requires_grad_()
    k = _rand_heads(batch, hkv, kv_len, dim, dtype, gen, seq_major).requires_grad_()
    v = _rand_heads(batch, hkv, kv_len, dim, dtype, gen, seq_major).requires_grad_()
    mask = None
    if pad:
        mask = torch.ones(batch, kv_len, dtype=torch.bool, device=DEVICE)
        mask[0, :pad] = False
    index = build_index_for(q, k, pattern, attention_mask=mask)
    scale = dim**-0.5
    out = triton_block_sparse_attention(q, k, v, index, scale, softcap)
    d_out = _rand(out.shape, dtype, gen)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q32, k32, v32, index, scale=scale, softcap=softcap)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), d_out.float())
    row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "tma": _tma(k, v),
           "gluon_fwd": gluon_forward_runs(q, k, v, index, softcap or 0.0)}
    ok = True
    tol = 1e-2 if dtype != torch.float32 else 1e-4
    for key, got, want in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref,) + ref_grads, strict=True):
        got, want = got.detach().float(), want.detach().float()
        finite = bool(torch.isfinite(got).all())
        rel = float((got - want).norm() / want.norm().clamp_min(1.0))
        row[key] = {"max_abs": float((got - want).abs().max()), "rel": rel, "finite": finite}
        ok &= finite and rel < tol
    row["ok"] = ok
    RESULTS["checks"].append(row)
    print(f"check {name:48s} {'OK ' if ok else 'FAIL'} "
          + " ".join(f"{k}: rel {row[k]['rel']:.2e} max {row[k]['max_abs']:.2e}" for k in ("out", "dq", "dk", "dv")))
    return ok


def run_checks() -> bool:
    dt = torch.float32 if ARGS.cpu_smoke else torch.bfloat16
    s = 130 if ARGS.cpu_smoke else 2048
    sw = SparsePattern(sink_tokens=128 if not ARGS.cpu_smoke else 4, window=512 if not ARGS.cpu_smoke else 40)
    cases = [
        ("dense-D128-GQA4", 1, 8, 2, s, s, 128, SparsePattern(), dt, None, 0),
        ("sinkwin-D128-GQA4", 2, 8, 2, s, s, 128, sw, dt, None, 0),
        ("sinkwin-D64-MQA", 1, 8, 1, s + 17, s + 17, 64, sw, dt, None, 0),
        ("sinkwin-D256-MQA", 1, 4, 1, s - 3, s - 3, 256, sw, dt, None, 0),
        ("strided-D128", 1, 4, 2, s, s, 128,
         SparsePattern(window=256, layout=BlockLayout("strided", stride=4)), dt, None, 0),
        ("random10-D128-b64", 1, 4, 2, s, s, 128,
         SparsePattern(block_size=64, layout=BlockLayout("random", density=0.1)), dt, None, 0),
        ("softcap-D128", 1, 4, 2, s, s, 128, sw, dt, 30.0, 0),
        ("leftpad-D128", 2, 4, 2, s, s, 128, sw, dt, None, 300 if not ARGS.cpu_smoke else 20),
        ("decode-D128", 2, 8, 2, 1, s + 5, 128, sw, dt, None, 0),
        ("chunked-D128", 1, 8, 2, 300 if not ARGS.cpu_smoke else 40, s, 128, sw, dt, None, 0),
        ("fp16-D128", 1, 8, 2, s, s, 128, sw, torch.float16, None, 0),
        ("bshd-view-D128-GQA4", 2, 8, 2, s + 9, s + 9, 128, sw, dt, None, 0, True),
        ("bshd-view-chunked-D64", 1, 8, 2, 200 if not ARGS.cpu_smoke else 33, s, 64, sw, dt, None, 0, True),
    ]
    # default loads (TMA where the kernels pick it), then with --tma-ab the pointer loads, and TMA forced at D=256
    modes = [("", None)] + ([("ptr-", False), ("tma-forced-", True)] if ARGS.tma_ab else [])
    modes += [("tritonfwd-", "triton-forward")] if ARGS.gluon_ab else []
    all_ok = True
    for prefix, setting in modes:
        for case in cases:
            if prefix == "tma-forced-" and case[6] != 256:
                continue
            name = prefix + case[0]
            triton_fwd = setting == "triton-forward"  # --gluon-ab: the Triton forward where Gluon would run
            mode = {"gluon_fwd": False} if triton_fwd else {"tma": setting}
            try:
                with options(**mode):
                    all_ok &= check_case(name, *case[1:])
            except Exception as exc:  # record and go on
                all_ok = False
                RESULTS["errors"].append({"case": name, "error": repr(exc), "trace": traceback.format_exc()[-2000:]})
                print(f"check {name} ERROR {exc!r}")
    return all_ok


def _tma(*tensors: torch.Tensor) -> bool:
    """Whether the kernels load these tensors through TMA with the current options."""
    return tma.use_tma(*tensors, setting=kernel_options().tma)


# ---------------------------------------------------------------- (b) benchmark -----------------------------------

def pattern_set(seq: int) -> dict[str, SparsePattern]:
    if ARGS.cpu_smoke:
        return {"dense": SparsePattern(), "sink-window": SparsePattern(sink_tokens=4, window=64)}
    return {
        "dense": SparsePattern(),
        "sink128-win4096": SparsePattern(sink_tokens=128, window=4096),
        "strided16-win512": SparsePattern(window=512, layout=BlockLayout("strided", stride=16)),
        "random10": SparsePattern(layout=BlockLayout("random", density=0.1, seed=1)),
    }


def flex_mask_mod(pattern: SparsePattern, seq: int, hkv: int, group: int):
    """The same token-level mask for FlexAttention (causal & (sink | window | selected block))."""
    block = pattern.block_size
    sink, window = pattern.sink_tokens, pattern.window or 0
    table = None
    if pattern.layout is not None:
        nb = (seq + block - 1) // block
        qb = torch.arange(nb, device=DEVICE).view(1, -1, 1)
        kb = torch.arange(nb, device=DEVICE).view(1, 1, -1)
        if pattern.layout.kind == "strided":
            table = ((kb % pattern.layout.stride) == pattern.layout.offset).expand(1, nb, nb).contiguous()
        else:
            heads = torch.arange(hkv, device=DEVICE).view(-1, 1, 1)
            table = random_layout_keep(qb, kb, heads, pattern.layout.seed, pattern.layout.density)
    dense = pattern.is_dense

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        if dense:
            return keep
        sel = kv_idx < 0  # all-False tensor of the right kind
        if sink:
            sel = sel | (kv_idx < sink)
        if window:
            sel = sel | (q_idx - kv_idx < window)
        if table is not None:
            hk = (h // group) if table.shape[0] > 1 else h * 0
            sel = sel | table[hk, q_idx // block, kv_idx // block]
        return keep & sel

    return mask_mod


def flex_block_mask_from_index(index, mask_mod, seq: int, group: int):
    """A FlexAttention BlockMask with exactly our index's full and partial tiles (BlockMask.from_kv_blocks)."""
    from torch.nn.attention.flex_attention import BlockMask

    n_k = index.n_k_tiles

    def widen(tiles: torch.Tensor, decode: bool) -> torch.Tensor:
        t = tiles.long()
        if decode:
            t = torch.where(t < 0, -t - 1, t)
        t = torch.nn.functional.pad(t, (0, max(0, n_k - t.shape[-1])))[..., :n_k]
        if t.shape[1] > 1:  # per-KV-head layout -> per query head
            t = t.repeat_interleave(group, dim=1)
        return t.to(torch.int32).contiguous()

    def counts(c: torch.Tensor) -> torch.Tensor:
        return (c.repeat_interleave(group, dim=1) if c.shape[1] > 1 else c).to(torch.int32).contiguous()

    return BlockMask.from_kv_blocks(
        counts(index.part_count), widen(index.part_tiles, True), counts(index.full_count),
        widen(index.full_tiles, False), BLOCK_SIZE=index.block_size, mask_mod=mask_mod, seq_lengths=(seq, seq),
    )


_FLEX = None


def _flex():
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # one compile per shape and mask: the default limit (8) made later shapes run Flex's unfused eager path
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _record(row: dict) -> None:
    if torch.cuda.is_available() and DEVICE == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    RESULTS["bench"].append(row)
    ms = ", ".join(f"{k}={row[k]:.3f}" for k in ("fwd_ms", "fwdbwd_ms") if isinstance(row.get(k), float))
    print(f"bench {row['group']:6s} {row['case']:40s} {row['method']:10s} {ms} {row.get('error', '')[:200]}")


def bench_method(group, case, method, fn_fwd, make_loss_grad, pairs, dim, extra=None) -> None:
    """Time forward and forward+backward of one method; failures are recorded, never raised."""
    row = {"group": group, "case": case, "method": method, "pairs": pairs, **(extra or {})}
    if _left() < 0:
        row["error"] = "skipped: time budget"
        _record(row)
        return
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        row["fwd_ms"] = bench_ms(fn_fwd)
        row["fwd_tflops"] = 4 * dim * pairs / (row["fwd_ms"] * 1e-3) / 1e12
        if make_loss_grad is not None and _left() > 0:
            row["fwdbwd_ms"] = bench_ms(make_loss_grad)
            # FlashAttention's convention: the backward's five matmuls are 2.5x the forward's two (runs before
            # this line's commit counted 1.5x and 2.5x: their bwd and fwd+bwd TFLOP/s read 5/3 and 7/5 higher here)
            row["fwdbwd_tflops"] = 3.5 * 4 * dim * pairs / (row["fwdbwd_ms"] * 1e-3) / 1e12
            row["bwd_ms"] = row["fwdbwd_ms"] - row["fwd_ms"]
            row["bwd_tflops"] = 2.5 * 4 * dim * pairs / (max(row["bwd_ms"], 1e-6) * 1e-3) / 1e12
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if "out of memory" in str(exc).lower():
            torch.cuda.empty_cache()
    _record(row)


def _bench_switched(changes: dict, method: str, group, case, fn, loss_grad, pairs, dim, extra) -> None:
    """Time ``method`` with these kernel options changed (the A/B rows of one run)."""
    with options(**changes):
        bench_method(group, case, method, fn, loss_grad, pairs, dim, extra)


def bench_case(*args, **kwargs) -> None:
    """One shape: every pattern and method; an allocation or setup failure is recorded, not raised."""
    try:
        _bench_case(*args, **kwargs)
    except Exception as exc:
        RESULTS["errors"].append({"case": repr(args[:6]), "error": repr(exc)[:500]})
        print(f"bench case {args[:6]} ERROR {exc!r}")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def _bench_case(group, batch, hq, hkv, seq, dim, dtype, patterns, methods=("sparsek", "flex", "cudnn", "flash"),
               backward=True) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(seq)
    q = _rand((batch, hq, seq, dim), dtype, gen).requires_grad_(backward)
    k = _rand((batch, hkv, seq, dim), dtype, gen).requires_grad_(backward)
    v = _rand((batch, hkv, seq, dim), dtype, gen).requires_grad_(backward)
    d_out = _rand((batch, hq, seq, dim), dtype, gen)
    scale = dim**-0.5
    group_size = hq // hkv
    shape = f"B{batch}-S{seq}-Hq{hq}-Hk{hkv}-D{dim}-{str(dtype).replace('torch.', '')}"
    extra = {"batch": batch, "hq": hq, "hkv": hkv, "seq": seq, "dim": dim}

    def fwdbwd(fn):
        def run():
            out = fn()
            torch.autograd.grad(out, (q, k, v), d_out)
        return run if backward else None

    dense_pairs = causal_pairs(seq, seq, 0, 0) * batch * hq
    for pname, pattern in patterns.items():
        if _left() < 0:
            break
        case = f"{shape}-{pname}"
        try:
            t0 = time.time()
            index = build_index_for(q, k, pattern)
            index.transposed()
            build_s = time.time() - t0
            pairs = _pairs(index, batch, hq, hkv)
        except Exception as exc:
            RESULTS["bench"].append({"group": group, "case": case, "method": "index", "error": repr(exc)[:300]})
            continue
        ex = {**extra, "pattern": pname, "density": pairs / dense_pairs, "index_build_s": build_s}
        if "sparsek" in methods:
            fn = lambda: triton_block_sparse_attention(q, k, v, index, scale)  # noqa: B023
            gluon = gluon_forward_runs(q, k, v, index, 0.0)
            bench_method(group, case, "sparsek", fn, fwdbwd(fn), pairs, dim,
                         {**ex, "tma": _tma(k, v), "gluon_fwd": gluon})
            same = (group, case, fn, fwdbwd(fn), pairs, dim)
            if ARGS.gluon_ab and gluon:
                _bench_switched({"gluon_fwd": False}, "sparsek-tritonfwd", *same, {**ex, "gluon_fwd": False})
            if ARGS.bwd_ab and backward and DEVICE == "cuda":
                _bench_switched({"concurrent_dq": False}, "sparsek-serialbwd", *same,
                                {**ex, "tma": _tma(k, v), "concurrent_dq": False})
            if ARGS.rows_tma_ab and backward and _tma(q, d_out):
                _bench_switched({"dkdv_tma_rows": False}, "sparsek-ptrrows", *same, {**ex, "rows_tma": False})
            if ARGS.tma_ab and _tma(k, v):
                _bench_switched({"tma": False}, "sparsek-ptr", *same, {**ex, "tma": False})
        if "flex" in methods and DEVICE == "cuda" and _left() > 0:
            try:
                mod = flex_mask_mod(pattern, seq, hkv, group_size)
                # Flex gets our own block index (same mask, O(S/B x k) memory): its create_block_mask evaluates
                # the mask densely and ran out of memory at 64K+ in this harness.
                bm = flex_block_mask_from_index(index, mod, seq, group_size)
                flex = _flex()
                fn = lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)  # noqa: B023
                bench_method(group, case, "flex", fn, fwdbwd(fn), pairs, dim, ex)
                del bm
            except Exception as exc:
                _record({"group": group, "case": case, "method": "flex", **ex,
                         "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                torch.cuda.empty_cache()
        if pattern.is_dense and DEVICE == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            from torch.nn.functional import scaled_dot_product_attention as sdpa

            for meth, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                if meth not in methods or _left() < 0:
                    continue

                def fn(backend=backend):
                    with sdpa_kernel(backend):
                        return sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=group_size > 1)

                bench_method(group, case, meth, fn, fwdbwd(fn), pairs, dim, ex)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def run_bench() -> None:
    only = set(filter(None, ARGS.only.split(",")))
    want = lambda g: not only or g in only  # noqa: E731
    if ARGS.cpu_smoke:
        bench_case("main", 1, 4, 1, 256, 64, torch.float32, pattern_set(256), methods=("sparsek",))
        return
    bf16 = torch.bfloat16
    sizes = [int(s) for s in ARGS.sizes.split(",") if s] or ([4096, 16384, 65536] if ARGS.quick
                                                            else [4096, 16384, 65536, 131072])
    if want("main"):
        for seq in sizes:
            bench_case("main", 1, 32, 8, seq, 128, bf16, pattern_set(seq))
    if want("long") and not ARGS.quick:
        sw = {"sink128-win4096": SparsePattern(sink_tokens=128, window=4096),
              "random10": SparsePattern(layout=BlockLayout("random", density=0.1, seed=1))}
        bench_case("long", 1, 32, 8, 1 << 20, 128, bf16, sw, methods=("sparsek",), backward=False)
    if want("orig"):
        orig = {"dense": SparsePattern(block_size=64), "sink64-win128": SparsePattern(block_size=64, sink_tokens=64,
                                                                                       window=128)}
        bench_case("orig", 16, 96, 96, 512, 64, torch.float16, orig, methods=("sparsek", "cudnn", "flash", "flex"))
    if want("dims"):
        sw = {"dense": SparsePattern(), "sink128-win4096": SparsePattern(sink_tokens=128, window=4096)}
        bench_case("dims", 1, 32, 8, 16384, 64, bf16, sw)
        bench_case("dims", 1, 32, 8, 16384, 256, bf16, sw)
        bench_case("dims", 1, 4, 1, 16384, 256, bf16, sw)


# ---------------------------------------------------------------- (c) config tuning -------------------------------

def tune() -> None:
    """Time each candidate config on sink128+window4096 (64K for D=128, 16K otherwise); keep the fastest."""
    RESULTS["tune"] = []
    dims = {int(d) for d in ARGS.tune_dims.split(",") if d}
    for dim, seq in ((128, 65536), (64, 16384), (256, 16384)):
        if dim not in dims:
            continue
        _tune_dim(dim, seq)
        torch.cuda.empty_cache()
    RESULTS["tuned_fwd"] = {d: repr(c) for d, c in FWD_CONFIGS.items()}
    RESULTS["tuned_bwd"] = {d: repr(c) for d, c in BWD_CONFIGS.items()}


def _tune_dim(dim: int, seq: int) -> None:
    """Tune the configs of one head dim on one shape."""
    gen = torch.Generator(device=DEVICE).manual_seed(dim)
    q = _rand((1, 32, seq, dim), torch.bfloat16, gen).requires_grad_()
    k = _rand((1, 8, seq, dim), torch.bfloat16, gen).requires_grad_()
    v = _rand((1, 8, seq, dim), torch.bfloat16, gen).requires_grad_()
    d_out = _rand(q.shape, torch.bfloat16, gen)
    index = build_index_for(q, k, SparsePattern(sink_tokens=128, window=4096))
    index.transposed()
    fn = lambda: triton_block_sparse_attention(q, k, v, index, dim**-0.5)  # noqa: B023
    fb = lambda: torch.autograd.grad(fn(), (q, k, v), d_out)  # noqa: B023
    for kind, cands, table, bench in (("fwd", FWD_CANDIDATES, FWD_CONFIGS, fn),
                                      ("fwdbwd", BWD_CANDIDATES, BWD_CONFIGS, fb)):
        best = None
        for cfg in cands[dim]:
            if _left() < 60:
                break
            table[dim] = cfg
            row = {"dim": dim, "seq": seq, "kind": kind, "config": repr(cfg)}
            try:
                row["ms"] = bench_ms(bench)
                if best is None or row["ms"] < best[0]:
                    best = (row["ms"], cfg)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            RESULTS["tune"].append(row)
            print(f"tune D{dim} S{seq} {kind} {row.get('ms', float('nan')):8.3f} ms {cfg} {row.get('error', '')}")
        table[dim] = best[1] if best else cands[dim][0]
        print(f"tune D{dim} {kind}: keep {table[dim]}")


# ---------------------------------------------------------------- report ------------------------------------------

def environment() -> dict:
    """The run's environment in the keys earlier bench.json files used (the full record is under "meta")."""
    import triton

    opts = kernel_options()
    env = {"torch": torch.__version__, "triton": triton.__version__, "device": DEVICE,
           "interpreter": os.environ.get("TRITON_INTERPRET", "0"),
           "flops": "fwd 4*D*pairs, bwd 2.5x fwd, fwd+bwd 3.5x fwd (FlashAttention's convention)",
           "concurrent_dq": opts.concurrent_dq, "dkdv_tma_rows": opts.dkdv_tma_rows,
           "gluon_fwd": opts.gluon_fwd and attention_fwd_gluon.AVAILABLE,
           "gluon_dkdv": opts.gluon_dkdv and attention_bwd_gluon.AVAILABLE,
           "gluon_dq": list(opts.gluon_dq_head_dims) if opts.gluon_dq and attention_bwd_gluon.AVAILABLE else [],
           # (runs up to v14 shipped None: persistent for rows shorter than LONG_ROW_TILES only)
           "gluon_fwd_persistent": opts.gluon_fwd_persistent, "gluon_fwd_q_slots": opts.gluon_fwd_q_slots,
           "gluon_dq_persistent": opts.gluon_dq_persistent, "gluon_dq_q_slots": opts.gluon_dq_q_slots}
    if DEVICE == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
        env["cuda"] = torch.version.cuda
    return env


def table() -> str:
    lines = ["| group | case | method | density | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | bwd TFLOP/s "
             "| peak GiB | note |", "|" + "---|" * 11]
    fmt = lambda x, f: (f % x) if isinstance(x, float) else ""  # noqa: E731
    for r in RESULTS["bench"]:
        lines.append(
            f"| {r['group']} | {r['case']} | {r['method']} | {fmt(r.get('density'), '%.3f')} "
            f"| {fmt(r.get('fwd_ms'), '%.3f')} | {fmt(r.get('fwd_tflops'), '%.0f')} "
            f"| {fmt(r.get('fwdbwd_ms'), '%.3f')} | {fmt(r.get('fwdbwd_tflops'), '%.0f')} "
            f"| {fmt(r.get('bwd_tflops'), '%.0f')} | {fmt(r.get('peak_mem_gib'), '%.1f')} "
            f"| {r.get('error', '')[:80].replace('|', '/')} |"
        )
    return "\n".join(lines)


def main() -> int:
    os.makedirs(ARGS.out, exist_ok=True)
    if ARGS.runtime_autotune:  # each shape class tunes on its first (warm-up) call; the timings then use the choice
        os.environ["HF_SPARSEK_AUTOTUNE_CACHE"] = os.path.join(ARGS.out, "autotune.json")
        autotune.clear_memory()
        hf_sparsek.set_settings(kernels=dataclasses.replace(hf_sparsek.get_settings().kernels, autotune=True))
    RESULTS["env"] = environment()
    RESULTS["args"] = vars(ARGS)
    print(json.dumps(RESULTS["env"]))
    ok = True
    if ARGS.tune and DEVICE == "cuda":
        try:
            tune()
        except Exception as exc:
            RESULTS["errors"].append({"case": "tune", "error": repr(exc), "trace": traceback.format_exc()[-3000:]})
            print(traceback.format_exc())
    if not ARGS.skip_check:
        ok = run_checks()
    RESULTS["checks_ok"] = ok
    try:
        run_bench()
    except Exception as exc:
        RESULTS["errors"].append({"case": "bench", "error": repr(exc), "trace": traceback.format_exc()[-3000:]})
        print(traceback.format_exc())
    RESULTS["elapsed_s"] = time.time() - START
    write_json(os.path.join(ARGS.out, "bench.json"), RESULTS)
    md = table()
    checks = "\n".join(f"- {c['case']}: {'OK' if c['ok'] else 'FAIL'} (out rel {c['out']['rel']:.1e}, dq "
                       f"{c['dq']['rel']:.1e}, dk {c['dk']['rel']:.1e}, dv {c['dv']['rel']:.1e})"
                       for c in RESULTS["checks"])
    with open(os.path.join(ARGS.out, "bench.md"), "w") as f:
        f.write(f"# gpu_kernels.py\n\n{json.dumps(run_metadata())}\n\n## Checks\n\n{checks}\n\n## Timings\n\n{md}\n")
    print(md)
    if not ok:
        print("CORRECTNESS FAILURES: see checks above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
