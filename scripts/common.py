"""What the lab scripts share: the benchmark cases, kernel options for a block, timing, and the results writer.

Scripts run from the repository root as ``python -m scripts.<name>`` (the checkout's ``hf_sparsek`` and ``scripts``
import from there; no ``sys.path`` edits). Every results file goes through :func:`write_json`, which records the
command, commit, date, device and versions beside the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import torch
from hf_sparsek.kernels import dispatch
from hf_sparsek.kernels.options import KernelOptions

import hf_sparsek
from hf_sparsek import BlockLayout, SparsePattern
from hf_sparsek.block_index import BlockIndex
from hf_sparsek.runtime import kernel_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The benchmark patterns (B=1, 32 query / 8 KV heads, head dim 128, bf16 unless a script says otherwise).
PATTERNS: dict[str, SparsePattern] = {
    "dense": SparsePattern(),
    "strided": SparsePattern(window=512, layout=BlockLayout("strided", stride=16)),
    "sinkwin": SparsePattern(sink_tokens=128, window=4096),
    "random": SparsePattern(layout=BlockLayout("random", density=0.1, seed=1)),
}


@contextlib.contextmanager
def options(**changes: object) -> Iterator[KernelOptions]:
    """Inside the block the kernels run with these ``KernelOptions`` fields changed (the library's settings)."""
    current = hf_sparsek.get_settings().kernels
    with hf_sparsek.settings(kernels=dataclasses.replace(current, **changes)):
        yield kernel_options()


def gluon_forward_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockIndex, softcap: float) -> bool:
    """Whether the library sends this forward to the Gluon kernel with the current options (dispatch's own test)."""
    segments = index.k_seg is not None or index.q_seg is not None or index.k_rank is not None
    return dispatch.use_gluon_forward(q, k, v, index.block_size, softcap, segments, kernel_options())


def headline_inputs(seq: int, dim: int = 128) -> tuple[torch.Tensor, ...]:
    """q, k, v (requiring grad) and dO of the headline shape: B=1, 32 query / 8 KV heads, head dim 128 (or ``dim``),
    bf16, seeded."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_kv = (1, 32, seq, dim), (1, 8, seq, dim)
    q = torch.randn(shape_q, generator=gen, device="cuda").to(torch.bfloat16).requires_grad_()
    k = torch.randn(shape_kv, generator=gen, device="cuda").to(torch.bfloat16).requires_grad_()
    v = torch.randn(shape_kv, generator=gen, device="cuda").to(torch.bfloat16).requires_grad_()
    return q, k, v, torch.randn(shape_q, generator=gen, device="cuda").to(torch.bfloat16)


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` (CUDA events, warm-up) on a GPU, else the median
    of three wall-clock calls after one warm-up (the interpreter smoke runs)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    import time

    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def capture_cuda_graph(call: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, output) of ``call`` captured in a CUDA graph after one warm-up run on a side stream; raises where the
    call cannot be captured (it reads something on the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out


@functools.lru_cache(maxsize=1)
def _commit() -> str:
    """The commit of the code that ran: ``HF_SPARSEK_COMMIT`` when set (a device copy or an archive has no history of
    its own), else ``git rev-parse HEAD`` with ``-dirty`` when tracked files differ from it. Read once, when this
    module is imported (the start of a run): a long run must not take the commit the tree has when it ends."""
    if os.environ.get("HF_SPARSEK_COMMIT"):
        return os.environ["HF_SPARSEK_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if done.returncode != 0 or not done.stdout.strip():
        return "unknown"
    return done.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


_commit()  # pinned at the start of the run


def run_metadata() -> dict:
    """Command, commit, date, device, versions and the kernel options of this run."""
    import triton

    return {
        "command": " ".join(["python", *sys.orig_argv[1:]]),
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                     "hf_sparsek": getattr(hf_sparsek, "__version__", "unknown")},
        "interpreter": os.environ.get("TRITON_INTERPRET", "0"),
        "kernel_options": kernel_options().record(),
    }


def load_module_as(name: str, path: str, package: str, replace: tuple[str, str] | None = None):
    """The module in file ``path`` registered as ``name`` inside ``package`` (its relative imports resolve there;
    ``replace``: one (old, new) source edit first): an earlier version of a module, loaded beside the current one
    for an A/B in one process."""
    import importlib.util

    with open(path) as f:
        source = f.read()
    if replace:
        source = source.replace(*replace)
    spec = importlib.util.spec_from_loader(name, loader=None, origin=path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    module.__file__ = path  # Triton's JIT reads the kernels' source from their file
    sys.modules[name] = module
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` with the run's metadata under ``"meta"`` (the folder is made if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": run_metadata(), **data}, f, indent=1, default=str)


def save_token_file(data: dict, path: str) -> None:
    """Token ids made on the CPU for a GPU run (``torch.save``; a path ending ``.xz`` is compressed: passkey prompts
    repeat their filler, 18 MB -> 1.4 MB, so they fit beside a GGUF part in one 64 MiB device call)."""
    import io
    import lzma

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".xz"):
        buffer = io.BytesIO()
        torch.save(data, buffer)
        with lzma.open(path, "wb") as f:
            f.write(buffer.getvalue())
    else:
        torch.save(data, path)


def needle_token_entries(cases: dict) -> tuple[dict, dict]:
    """A token file's ``"needle"`` ({(length, depth): [(prompt, answer)]}) and ``"needle_spans"`` ({(length,
    depth): [(start, end)]}) from ``hf_sparsek.eval.needle.needle_cases``."""
    needle = {cell: [(c.prompt, c.answer) for c in rows] for cell, rows in cases.items()}
    spans = {cell: [c.needle for c in rows] for cell, rows in cases.items()}
    return needle, spans


def with_needle_spans(needle: dict, spans: dict) -> dict:
    """{(length, depth): [(prompt, answer, (start, end))]} (``needle_recall``'s cases) from a token file's passkey
    prompts and their spans; SystemExit where a cell has no spans (a token file made before they were kept)."""
    if any(cell not in spans for cell in needle):
        raise SystemExit("--needle-recall needs the needles' spans: remake the token file with --make-tokens")
    return {cell: [(p, a, span) for (p, a), span in zip(v, spans[cell], strict=True)] for cell, v in needle.items()}


def load_token_file(path: str) -> dict:
    """What :func:`save_token_file` wrote."""
    import io
    import lzma

    if path.endswith(".xz"):
        with lzma.open(path, "rb") as f:
            return torch.load(io.BytesIO(f.read()))
    return torch.load(path)


def timed_generate(model, ids: torch.Tensor, new: int, **kwargs) -> tuple[torch.Tensor, float, list[float]]:
    """One greedy ``generate()`` of exactly ``new`` tokens: (its output ids, prefill seconds, seconds between decode
    steps). Each step is stamped by a logits processor after a CUDA synchronisation, so decode time is the gap between
    stamps, with no prefill noise in it."""
    import time

    from transformers import LogitsProcessor, LogitsProcessorList

    class StepStamps(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    stamps = StepStamps()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             logits_processor=LogitsProcessorList([stamps]), **kwargs)
    t = stamps.times
    return out, t[0] - start, [t[i + 1] - t[i] for i in range(len(t) - 1)]
