"""What checking every kept tile's last key costs a top-k decode step, against the one-key check it replaced.

    python -m scripts.experiments.store_check_cost --baseline .carry/baseline_store --out $OUT   # GPU, ~1 minute
    python -m scripts.experiments.store_check_cost --baseline .carry/baseline_store --cpu-smoke --out /tmp/x

The selection store (``hf_sparsek.selection.store``) decides per call whether its kept key tile features still
describe the cache. It compared one key (the last kept tile's last key); a first layer's key depends on its token
and position only, so another sequence with that one token in place reused the wrong features (found by a fuzz
run: two conversations through one model). It now compares the last key of every kept tile, in a second launch.
``--baseline`` holds the store and its kernel before the change (``git show e8b10d2:hf_sparsek/selection/store.py >
old_store.py``, ``git show e8b10d2:kernels/selection_store.py > old_kernel.py``), loaded beside the current ones, so
both are timed in one process on one GPU: per case (32 / 8 heads, D 128, bf16, sink 128 + window 1024 + top-56 of
128, the last tile still filling), the refresh alone, the whole ``sparse_attention`` decode call with the store
(eager) and its CUDA-graph replay; the two stores' outputs must be equal. The curated result is the key
``store_check_cost`` of ``scripts/results/decode.json`` (a new run replaces it).
"""

from __future__ import annotations

import os
import sys

from scripts.ab_args import baseline_args

ARGS = baseline_args(__doc__.splitlines()[0], "folder with old_store.py and old_kernel.py", "store_check_out")

import torch  # noqa: E402

from hf_sparsek import SparsePattern  # noqa: E402
from hf_sparsek.ops import sparse_attention  # noqa: E402
from hf_sparsek.selection import SelectionState  # noqa: E402
from scripts.common import bench_ms, capture_cuda_graph, load_module_as, write_json  # noqa: E402


def baseline_state_class() -> type:
    """The store before the change, its refresh calling the kernel before the change."""
    import hf_sparsek.kernels as kernels_pkg

    old_kernel = load_module_as("hf_sparsek.kernels.old_selection_store",
                                os.path.join(ARGS.baseline, "old_kernel.py"), "hf_sparsek.kernels")
    kernels_pkg.old_selection_store = old_kernel
    old = load_module_as("hf_sparsek.selection.old_store", os.path.join(ARGS.baseline, "old_store.py"),
                         "hf_sparsek.selection", replace=("..kernels.selection_store", "..kernels.old_selection_store"))
    return old.SelectionState


def graph_ms(call) -> float | str:
    """A CUDA-graph replay of ``call`` (it reads nothing on the host), in ms; the error text where capture fails."""
    try:
        graph, _ = capture_cuda_graph(call)
        return bench_ms(graph.replay)
    except Exception as exc:  # recorded, never silent
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def case(batch: int, kv_len: int, pattern: SparsePattern, states: dict[str, type], hq: int, hkv: int, dim: int,
         dtype: torch.dtype, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    n = kv_len - 1  # the timed call's keys: its last tile still filling (every call refreshes it)
    q = torch.randn(batch, hq, 1, dim, generator=gen, device=device).to(dtype)
    k = torch.randn(batch, hkv, n, dim, generator=gen, device=device).to(dtype)
    v = torch.randn(batch, hkv, n, dim, generator=gen, device=device).to(dtype)
    row: dict = {"batch": batch, "kv_len": n, "hq": hq, "hkv": hkv, "dim": dim, "pattern": pattern.to_dict()}
    outs = {}
    with torch.no_grad():
        for name, cls in states.items():
            state = cls()
            sparse_attention(q, k[:, :, :-1], v[:, :, :-1], pattern, selection_state=state)  # the step before
            kept = state.tiles
            call = lambda st=state: sparse_attention(q, k, v, pattern, selection_state=st)  # noqa: E731
            outs[name] = call()
            row[f"{name}_reused_all"] = bool(state.reused.all().item()) and state.tiles == kept
            row[f"{name}_kept_tiles"] = kept
            row[f"{name}_refresh_ms"] = bench_ms(lambda st=state: st.key_features(
                k, None, n - 1, 1, 0, pattern.block_size, device == "cuda"))
            row[f"{name}_whole_call_ms"] = bench_ms(call)
            if device == "cuda":
                row[f"{name}_graph_ms"] = graph_ms(call)
    names = list(outs)
    row["outputs_equal"] = bool(torch.equal(outs[names[0]], outs[names[-1]]))
    return row


def main() -> None:
    os.makedirs(ARGS.out, exist_ok=True)
    device = "cpu" if ARGS.cpu_smoke else "cuda"
    states = {"one_key": baseline_state_class(), "every_tile": SelectionState}
    rows = []
    if ARGS.cpu_smoke:
        cases = [(1, 700, SparsePattern(block_size=64, sink_tokens=8, window=64, topk_blocks=2), 4, 2, 64,
                  torch.float32)]
    else:
        topk56 = SparsePattern(block_size=128, sink_tokens=128, window=1024, topk_blocks=56)
        cases = [(1, 524288, topk56, 32, 8, 128, torch.bfloat16), (8, 131072, topk56, 32, 8, 128, torch.bfloat16),
                 (1, 32768, topk56, 32, 8, 128, torch.bfloat16)]
    for batch, kv_len, pattern, hq, hkv, dim, dtype in cases:
        row = case(batch, kv_len, pattern, states, hq, hkv, dim, dtype, device)
        rows.append(row)
        print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items() if k != "pattern"}, flush=True)
    write_json(os.path.join(ARGS.out, "store_check_cost.json"), {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
