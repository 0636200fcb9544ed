"""Opt-in runtime tuning of the kernels' launch configs: time each candidate once per shape class, keep the fastest.

Why: the shipped per-head-dim defaults were tuned on one shape (32/8 heads, sink 128 + window 4096); other head
groupings, densities and lengths can prefer other tiles (the H100 sweep spread was 20% in the forward). With
``HF_SPARSEK_AUTOTUNE=1`` (``KernelOptions.autotune``; kernels/dispatch.py decides when to tune) the first call of a
shape class times the candidates on the real inputs and the choice is cached in memory and in a JSON file
(``$HF_SPARSEK_AUTOTUNE_CACHE``, default ``~/.cache/hf_sparsek/autotune.json``), so later calls and later processes
pay nothing. Off by default: tuning costs seconds on first use and never runs during CUDA-graph capture. Results do
not depend on the config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

C = TypeVar("C")
_memory: dict[str, dict[str, Any]] | None = None


def cache_path() -> Path:
    """Where choices persist across processes."""
    env = os.environ.get("HF_SPARSEK_AUTOTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hf_sparsek" / "autotune.json"


def _pow2_bucket(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, x))))


def shape_key(kind: str, q: torch.Tensor, k: torch.Tensor, block: int, tiles_per_row: float) -> str:
    """Shape class: kernel kind, device, dtype, head dim, heads, block, power-of-two buckets of the query and key
    lengths and of the mean number of listed tiles per row (the pattern's density)."""
    device = torch.cuda.get_device_name(q.device) if q.is_cuda else str(q.device)
    return "|".join(str(x) for x in (
        kind, device, str(q.dtype).replace("torch.", ""), q.shape[-1], q.shape[1], k.shape[1], block,
        _pow2_bucket(q.shape[2]), _pow2_bucket(k.shape[2]), _pow2_bucket(tiles_per_row)))


def _load() -> dict[str, dict[str, Any]]:
    global _memory
    if _memory is None:
        try:
            _memory = json.loads(cache_path().read_text())
        except (OSError, ValueError):
            _memory = {}
    return _memory


def _save(memory: dict[str, dict[str, Any]]) -> None:
    """Atomic write (several processes may tune at once: the last complete file wins)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(memory, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError:  # read-only home: keep the in-memory choice
        pass


def _time(fn: Callable[[], None]) -> float:
    """Milliseconds of one call: CUDA events over a few repeats on GPU, wall clock elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=3, rep=15, return_mode="median"))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def choose(key: str, candidates: Sequence[C], default: C, run: Callable[[C], Any]) -> C:
    """The cached choice for ``key``, else the fastest candidate of a timing of each on ``run`` (the default during
    CUDA-graph capture).

    ``run(config)`` launches the kernel(s) with that config on the real inputs. A candidate that fails (out of
    shared memory, say) is skipped; with no candidate left the default stays. The winner is a dataclass of the
    default's type, cached by its fields."""
    if _capturing():
        return default
    memory = _load()
    if key in memory:
        return type(default)(**memory[key]["config"])
    timings: list[tuple[float, int]] = []
    for i, cand in enumerate(candidates):
        try:
            timings.append((_time(lambda cand=cand: run(cand)), i))
        except Exception:  # noqa: BLE001 - a config that cannot launch is not a candidate
            continue
    if not timings:
        return default
    best_ms, best = min(timings)
    memory[key] = {"config": dataclasses.asdict(candidates[best]), "ms": best_ms,
                   "tried": {repr(candidates[i]): ms for ms, i in timings}}
    _save(memory)
    return candidates[best]


def clear_memory() -> None:
    """Forget choices loaded or made in this process (the file stays)."""
    global _memory
    _memory = None
