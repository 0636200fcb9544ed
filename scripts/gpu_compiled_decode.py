"""Top-k ("mass", "probe") decode steps inside CUDA graphs: per call, and through transformers' compiled
static-cache ``generate()``. One command, one results file:

    python -m scripts.gpu_compiled_decode --out $OUT                   # H100: about 7 minutes
    python -m scripts.gpu_compiled_decode --cpu-smoke --out /tmp/x     # tiny sizes, Triton interpreter

Per call (bf16, 32 query / 8 KV heads, D 128, sink 128 + window 1024 + top-56 of 128 "mass"): a static cache whose
slots after the position hold stale random keys. The graph-safe step (``hf_sparsek::sparse_decode``: the pieces
compiled decoding runs as ``decode_select`` / ``decode_attend``; position on the device), eagerly and replayed as a
CUDA graph, beside the eager call on the keys sliced at the position (what the general op ran under torch.compile
before) and SDPA dense on the sliced keys; its tiles and output are compared with the eager call's; and the step
with a ``DecodeStore`` (kept key tile features, what compiled decoding runs from a model's second layer on), eager
and as a graph, its output against the step without it. At 4K with the
generate() model's attention shape (D 64): the step (without a mask, and with the all-ones 2D mask a compiled
generate() hands every layer) and SDPA, each as a CUDA graph.

``generate()`` (random-weight 1.1B Llama, batch 1, greedy, ``cache_implementation="static"``: transformers compiles
the decoding forward on CUDA): median time between decode steps for sdpa, sparsek with a window pattern, with the
top-k patterns ("mass", "probe"), and as before 2026-12-07: "mass" through the general op outside the graphs, the
window as one op with the padding layout inside (~20 small kernels a layer); as before that evening: "mass"
without the DecodeStore, the window with each layer computing its own layout; graphs
traced, CUDA graphs skipped, and tokens equal to the same pattern uncompiled (bf16 with random weights: near-ties
make greedy tokens drift between compiled and eager kernels; the per-call rows are the exactness check). Each
current-path row also lists where a decode step's device time goes, per kernel (``decode_profile``: torch.profiler
over generate() runs of 1 and 1 + ``--profile-steps`` tokens, differenced). ``--calls-first`` runs the 512K / 128K
per-call rows before generate(), ``--before`` picks the older paths' rows. Writes ``compiled_decode.json`` (a new
run overwrites it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--out", default=os.environ.get("OUT", "compiled_decode_out"))
ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes in the Triton interpreter on CPU")
ap.add_argument("--skip-calls", action="store_true", help="only generate()")
ap.add_argument("--lengths", default="4096", help="generate() prompt lengths (empty: none)")
ap.add_argument("--new-tokens", type=int, default=32)
ap.add_argument("--shape", default="16,2048,32,8", help="layers,hidden,heads,kv_heads of the random Llama")
ap.add_argument("--max-seconds", type=float, default=540.0)
ap.add_argument("--tag", default="")
ap.add_argument("--before", default="one op,general op,no store,layout per layer",
                help="which generate() rows of the paths before to run (comma list; empty: none)")
ap.add_argument("--calls-first", action="store_true",
                help="the per-call rows (512K / 128K included) before generate(): a short lease keeps them")
ap.add_argument("--profile-steps", type=int, default=8,
                help="decode steps of each generate() row profiled per kernel (0: none)")
ARGS = ap.parse_args()
if ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hf_sparsek  # noqa: E402
from hf_sparsek import SparsePattern  # noqa: E402
from hf_sparsek.ops import _pattern_text, sparse_attention, sparse_decode_op  # noqa: E402
from hf_sparsek.selection import select_tiles, select_tiles_at_device_offset  # noqa: E402
from scripts.common import bench_ms, capture_cuda_graph, timed_generate, write_json  # noqa: E402

DEVICE = "cpu" if ARGS.cpu_smoke else "cuda"
STEP = __import__("hf_sparsek.ops", fromlist=["_decode_step"])._decode_step  # the step's code, whatever is patched
START = time.time()
RESULTS: dict = {"calls": [], "generate": [], "errors": []}
TOPK = SparsePattern(block_size=128, sink_tokens=128, window=1024, topk_blocks=56)
WINDOW = SparsePattern(block_size=128, sink_tokens=128, window=1024)
PROBE = TOPK.replace(selector="probe")
if ARGS.cpu_smoke:
    TOPK = SparsePattern(block_size=64, sink_tokens=8, window=64, topk_blocks=2)
    WINDOW = SparsePattern(block_size=64, sink_tokens=8, window=64)
    PROBE = TOPK.replace(selector="probe")


def _save() -> str:
    """Write what has run so far (a run cut short keeps its rows)."""
    RESULTS["elapsed_s"] = time.time() - START
    path = os.path.join(ARGS.out, f"compiled_decode{ARGS.tag}.json")
    write_json(path, RESULTS)
    return path


def _failed(row: dict, case: str, exc: Exception) -> None:
    """A case that fails is recorded (its error in the row, the trace in ``errors``); the run goes on."""
    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    RESULTS["errors"].append({"case": case, "trace": traceback.format_exc()[-2000:]})


def _record(kind: str, row: dict) -> None:
    RESULTS[kind].append(row)
    _save()
    print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()
                      if k not in ("pattern", "decode_profile")}), flush=True)
    prof = row.get("decode_profile")
    if prof:
        print(f"  per decode step: {prof['total_us_per_step']:.1f} us in {prof['kernels_per_step']:.0f} kernels; top:")
        for entry in prof["top"][:15]:
            print(f"    {entry['us_per_step']:8.1f} us  x{entry['calls_per_step']:.1f}  {entry['kernel'][:110]}")


def _left() -> float:
    return ARGS.max_seconds - (time.time() - START)


def _rand(shape, dtype) -> torch.Tensor:
    return torch.randn(shape, device=DEVICE, dtype=torch.float32).to(dtype)


def _bench(fn) -> float:
    return bench_ms(fn) if DEVICE == "cuda" else bench_ms(fn, warmup=1, rep=2)


def _graph_ms(fn) -> tuple[float, torch.Tensor]:
    """``fn`` captured as a CUDA graph: (ms per replay, the graph's output)."""
    graph, out = capture_cuda_graph(fn)
    graph.replay()
    torch.cuda.synchronize()
    return bench_ms(graph.replay), out


def call_case(batch: int, kv_len: int, slack: int, hq: int = 32, hkv: int = 8, dim: int = 128,
              dtype=torch.bfloat16) -> None:
    """One decode call at position ``kv_len - 1`` of a static cache of ``kv_len + slack`` slots."""
    if _left() < 30:
        return
    size = f"{kv_len // 1024}K" if kv_len >= 1024 else str(kv_len)
    row: dict = {"case": f"decode B{batch} {size} top-{TOPK.topk_blocks} of {TOPK.block_size} (mass)", "batch": batch,
                 "position": kv_len - 1, "cache_slots": kv_len + slack, "hq": hq, "hkv": hkv, "dim": dim,
                 "dtype": str(dtype).replace("torch.", ""), "pattern": TOPK.to_dict()}
    try:
        q = _rand((batch, hq, 1, dim), dtype)
        k, v = _rand((batch, hkv, kv_len + slack, dim), dtype), _rand((batch, hkv, kv_len + slack, dim), dtype)
        ks, vs = k[:, :, :kv_len], v[:, :, :kv_len]
        position = torch.tensor([kv_len - 1], device=DEVICE)
        text, scale = _pattern_text(TOPK), dim**-0.5
        with torch.no_grad():
            on_device = lambda: sparse_decode_op(q, k, v, None, position, 0, text, scale, 0.0)  # noqa: E731
            sliced = lambda: sparse_attention(q, ks, vs, TOPK)  # noqa: E731
            got, want = on_device(), sliced()
            row["max_abs_diff_vs_eager"] = float((got.float() - want.float()).abs().max().item())
            tiles = select_tiles_at_device_offset(q, k, TOPK, position, 0, None).sort(-1).values
            row["same_tiles_as_eager"] = bool(torch.equal(tiles, select_tiles(q, ks, TOPK, kv_len - 1, 0, None)
                                                          .sort(-1).values))
            row["sdpa_ms"] = _bench(lambda: F.scaled_dot_product_attention(q, ks, vs, enable_gqa=hq != hkv))
            row["eager_sliced_ms"] = _bench(sliced)  # the general op's body (the compiled path before)
            row["device_offset_op_eager_ms"] = _bench(on_device)
            if DEVICE == "cuda":
                row["device_offset_op_graph_ms"], out = _graph_ms(on_device)
                row["graph_max_abs_diff"] = float((out.float() - got.float()).abs().max().item())
                row["graph_x_sdpa"] = row["sdpa_ms"] / row["device_offset_op_graph_ms"]
                row["device_offset_selection_graph_ms"], _ = _graph_ms(
                    lambda: select_tiles_at_device_offset(q, k, TOPK, position, 0, None))
            row["selection_sliced_eager_ms"] = _bench(lambda: select_tiles(q, ks, TOPK, kv_len - 1, 0, None))
            _kept_store_rows(row, q, k, v, position, got)
    except Exception as exc:  # a case that fails is recorded, the run goes on
        _failed(row, row["case"], exc)
    _record("calls", row)


def _kept_store_rows(row: dict, q, k, v, position, got) -> None:
    """The step with the layer's DecodeStore (what compiled decoding runs from a model's second layer on): its first
    call pools every tile, later ones the tile being filled; output against the step without it, eager and as a
    CUDA graph (replays at one position: the steady state of consecutive steps)."""
    import hf_sparsek.ops as ops
    from hf_sparsek.selection.decode_store import DecodeStore

    store = DecodeStore(*k.shape[:3], k.shape[3], TOPK.block_size, 0, k.dtype, k.device)
    kept = lambda: STEP(q, k, v, None, position, 0, TOPK, k.shape[3] ** -0.5, 0.0,  # noqa: E731
                        ops._decode_select, ops._decode_attend, store)
    first = kept()
    again = kept()
    row["kept_store_reused"] = bool(store.reused.all().item())
    row["kept_store_max_abs_diff_vs_no_store"] = float((first.float() - got.float()).abs().max().item())
    row["kept_store_same_on_reuse"] = bool(torch.equal(first, again))
    row["kept_store_eager_ms"] = _bench(kept)
    if DEVICE == "cuda":
        row["kept_store_graph_ms"], _ = _graph_ms(kept)
        row["kept_store_graph_x_sdpa"] = row["sdpa_ms"] / row["kept_store_graph_ms"]


def small_case(kv_len: int, slack: int, pattern: SparsePattern, hq: int = 32, hkv: int = 8, dim: int = 64,
               dtype=torch.bfloat16) -> None:
    """One decode call of the generate() model's attention shape at a short context: the graph-safe op and SDPA (on
    the written keys), each replayed as a CUDA graph (as the compiled generate() runs them)."""
    if _left() < 30 or DEVICE != "cuda":
        return
    row: dict = {"case": f"decode B1 {kv_len} {pattern.describe()} (graph) vs SDPA (graph)", "position": kv_len - 1,
                 "cache_slots": kv_len + slack, "hq": hq, "hkv": hkv, "dim": dim, "pattern": pattern.to_dict()}
    try:
        q = _rand((1, hq, 1, dim), dtype)
        k, v = _rand((1, hkv, kv_len + slack, dim), dtype), _rand((1, hkv, kv_len + slack, dim), dtype)
        position = torch.tensor([kv_len - 1], device=DEVICE)
        ones = torch.ones(1, kv_len + slack, dtype=torch.bool, device=DEVICE)  # what generate() passes, unpadded
        text = _pattern_text(pattern)
        with torch.no_grad():
            for name, call in (
                ("sparse_op", lambda: sparse_decode_op(q, k, v, None, position, 0, text, dim**-0.5, 0.0)),
                ("sparse_op_with_mask", lambda: sparse_decode_op(q, k, v, ones, position, 0, text, dim**-0.5, 0.0)),
                ("sdpa", lambda: F.scaled_dot_product_attention(q, k[:, :, :kv_len], v[:, :, :kv_len],
                                                                enable_gqa=True)),
            ):
                row[f"{name}_graph_ms"], _ = _graph_ms(call)
        row["sparse_x_sdpa_time"] = row["sparse_op_graph_ms"] / row["sdpa_graph_ms"]
    except Exception as exc:  # a case that fails is recorded, the run goes on
        _failed(row, row["case"], exc)
    _record("calls", row)


def _steps(model, ids: torch.Tensor, new: int, **kwargs) -> tuple[torch.Tensor, float, list[float]]:
    """(generated tokens, prefill seconds, seconds between decode steps) of one greedy static-cache generate()."""
    out, prefill, gaps = timed_generate(model, ids, new, cache_implementation="static", **kwargs)
    return out[0, ids.shape[1]:], prefill, gaps


@torch.library.custom_op("gpu_compiled_decode::one_op_step", mutates_args=())
def _one_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None,
            q_offset: torch.Tensor, kv_offset: int, pattern: str, scale: float, softcap: float) -> torch.Tensor:
    import hf_sparsek.ops as ops

    return STEP(q, k, v, attention_mask, q_offset, kv_offset, ops._pattern_of_text(pattern), scale, softcap,
                ops._decode_select, ops._decode_attend)


@_one_op.register_fake
def _(q, k, v, attention_mask, q_offset, kv_offset, pattern, scale, softcap):
    return q.new_empty(q.shape[:3] + v.shape[3:])


def _one_op_step(q, k, v, attention_mask, q_offset, kv_offset, pat, scale, softcap, select, attend, store=None,
                 cache=None):
    """The compiled decode step as it was before 2026-12-07: one op, the padding layout computed inside it."""
    return _one_op(q, k, v, attention_mask, q_offset, kv_offset, _pattern_text(pat), scale, softcap)


def _per_layer_layout_step(q, k, v, attention_mask, q_offset, kv_offset, pat, scale, softcap, select, attend,
                           store=None, cache=None):
    """The compiled decode step without the forward's index cache: every layer computes its own padding layout and
    key info, as before the evening of 2026-12-07."""
    return STEP(q, k, v, attention_mask, q_offset, kv_offset, pat, scale, softcap, select, attend, store, None)


def _kernel_times(model, ids: torch.Tensor, new: int) -> dict[str, tuple[int, float]]:
    """{kernel or op name: (calls, microseconds)} of one static-cache generate() of ``new`` tokens under
    torch.profiler: device time of the kernels on CUDA (those replayed inside CUDA graphs included), own CPU time of
    the ops on CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = DEVICE == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        _steps(model, ids, new)
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, tuple[int, float]] = {}
    for event in prof.key_averages():
        us = (getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)) if cuda \
            else event.self_cpu_time_total
        if us:
            times[event.key] = (event.count, float(us))
    return times


def _decode_kernel_profile(model, ids: torch.Tensor, steps: int, top: int = 25) -> dict:
    """Per decode step: where the device time goes. Two profiled generate() runs, of 1 and ``1 + steps`` tokens
    (the same prefill), and per kernel the difference divided by ``steps``: the prefill cancels, the steps remain."""
    base, more = _kernel_times(model, ids, 1), _kernel_times(model, ids, 1 + steps)
    rows = []
    for name, (count, us) in more.items():
        count0, us0 = base.get(name, (0, 0.0))
        if us - us0 > 0:
            rows.append({"kernel": name[:160], "calls_per_step": (count - count0) / steps,
                         "us_per_step": (us - us0) / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"steps": steps, "total_us_per_step": sum(r["us_per_step"] for r in rows),
            "kernels_per_step": sum(r["calls_per_step"] for r in rows), "top": rows[:top]}


def generate_case(model, length: int, impl: str, pattern: SparsePattern | None, before: str = "") -> None:
    """``before``: "general op": top-k decode steps through the general op (outside the CUDA graphs); "one op": the
    decode step as one op with the padding layout inside; "no store": "mass" steps pooling every key (no
    DecodeStore); "layout per layer": no layout shared between layers; the first two as before 2026-12-07, the
    last two as before that evening."""
    if _left() < 60:
        return
    from torch._dynamo.utils import counters

    import hf_sparsek.ops as ops

    name = impl if pattern is None else f"sparsek {pattern.resolved_selector or 'window'}"
    name += f" ({before}: before)" if before else ""
    import hf_sparsek.selection.decode_store as decode_store

    rule, step, store_of = ops.selects_at_device_offset, ops._decode_step, decode_store.decode_store_of
    if before == "general op":
        ops.selects_at_device_offset = lambda pattern, q_len: False
    elif before == "one op":
        ops._decode_step = _one_op_step
    elif before == "no store":
        decode_store.decode_store_of = lambda module, pattern: None
    elif before == "layout per layer":
        ops._decode_step = _per_layer_layout_step
    row: dict = {"prompt": length, "impl": name, "new_tokens": ARGS.new_tokens}
    try:
        if pattern is None:
            model.set_attn_implementation("sdpa")
        else:
            hf_sparsek.set_pattern(model, pattern)
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=DEVICE)
        torch._dynamo.reset()
        graphs_before = counters["stats"]["unique_graphs"]
        skips = counters["inductor"]["cudagraph_skips"]
        started = time.time()
        _steps(model, ids, 3)  # warm-up: the compile
        row["warmup_s"] = time.time() - started
        tokens, prefill, gaps = _steps(model, ids, ARGS.new_tokens + 1)
        row["graphs_traced"] = counters["stats"]["unique_graphs"] - graphs_before
        row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
        gaps.sort()
        row["prefill_s"] = prefill
        row["decode_ms_per_token"] = gaps[len(gaps) // 2] * 1e3
        row["decode_ms_p10_p90"] = [gaps[len(gaps) // 10] * 1e3, gaps[(9 * len(gaps)) // 10] * 1e3]
        row["tokens_per_s"] = 1e3 / row["decode_ms_per_token"]
        if ARGS.profile_steps > 0 and not before:
            row["decode_profile"] = _decode_kernel_profile(model, ids, ARGS.profile_steps)
        if pattern is not None and not before:
            eager, _, eager_gaps = _steps(model, ids, ARGS.new_tokens + 1, disable_compile=True)
            eager_gaps.sort()
            row["uncompiled_decode_ms_per_token"] = eager_gaps[len(eager_gaps) // 2] * 1e3
            row["same_tokens_as_uncompiled"] = int((eager == tokens).sum().item())
            row["of"] = int(tokens.numel())
    except Exception as exc:
        _failed(row, f"generate {name} {length}", exc)
    finally:
        ops.selects_at_device_offset, ops._decode_step, decode_store.decode_store_of = rule, step, store_of
    _record("generate", row)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def run_generate(lengths: list[int]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv_heads = (int(x) for x in ARGS.shape.split(","))
    if ARGS.cpu_smoke:
        layers, hidden, heads, kv_heads = 2, 128, 2, 1
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
                         max_position_embeddings=max(lengths) + ARGS.new_tokens + 64, head_dim=hidden // heads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEVICE, torch.bfloat16 if DEVICE == "cuda" else torch.float32).eval()
    model.generation_config.pad_token_id = 0
    if ARGS.cpu_smoke:  # transformers compiles generate() on CUDA only; ask for it here (Dynamo's eager backend)
        from transformers import CompileConfig

        config = CompileConfig(backend="eager", fullgraph=True)
        config._compile_all_devices = True
        model.generation_config.compile_config = config
    RESULTS["generate_model"] = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
                                 "params_b": sum(p.numel() for p in model.parameters()) / 1e9}
    before = {name.strip() for name in ARGS.before.split(",") if name.strip()}
    for length in lengths:
        generate_case(model, length, "sdpa", None)
        for pattern in (WINDOW, TOPK):  # each beside its path before 2026-12-07
            old = "one op" if pattern is WINDOW else "general op"
            if old in before:
                generate_case(model, length, "sdpa", pattern, before=old)
            generate_case(model, length, "sdpa", pattern)
        for pattern, old in ((TOPK, "no store"), (WINDOW, "layout per layer")):
            if old in before:
                generate_case(model, length, "sdpa", pattern, before=old)
        generate_case(model, length, "sdpa", PROBE)


def main() -> int:
    RESULTS["command"] = "python -m scripts.gpu_compiled_decode " + " ".join(
        a for a in sys.argv[1:] if not a.startswith("/"))
    lengths = [int(x) for x in ARGS.lengths.split(",") if x]
    if ARGS.cpu_smoke:
        with hf_sparsek.settings(backend="triton"):
            if not ARGS.skip_calls:
                call_case(1, 700, 100, hq=4, hkv=2, dim=64, dtype=torch.float32)
            if lengths:
                run_generate([200])
    else:  # the short rows first: a run cut short keeps the most
        if not ARGS.skip_calls:
            for pattern in (WINDOW, TOPK, PROBE):
                small_case(4096, 64, pattern)
        long_calls = [] if ARGS.skip_calls else [(1, 512 * 1024, 4096), (8, 128 * 1024, 4096)]
        if ARGS.calls_first:
            for case in long_calls:
                call_case(*case)
        if lengths:
            run_generate(lengths)
        if not ARGS.calls_first:
            for case in long_calls:
                call_case(*case)
    path = _save()
    print("wrote", path, "errors:", len(RESULTS["errors"]))
    for err in RESULTS["errors"]:
        print(err["case"], err["trace"][-600:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
