"""Which kernel launches fit a GPU's shared memory, on a CPU: every launch is compiled for Hopper (sm90) instead
of run, and one that needs more than ``--limit`` bytes raises Triton's OutOfResources, as loading it on such a GPU
would; ``kernels.common.launch_fitting`` then shrinks it. Prints, per (head dim, block, selector), whether prefill
(with gradients) and a decode step get through, and the shapes the fitting chose.

    python -m scripts.experiments.shared_memory_fit                 # H100 / H200: 232448 bytes per block
    python -m scripts.experiments.shared_memory_fit --limit 166912  # A100

Needs no GPU (Triton's bundled ptxas); nothing runs, so outputs are not checked (``scripts/gpu_dtype_coverage.py``
does that on the device). Its figure for the float32 forward at head dim 256 (295,424 bytes, 128 x 64 tiles, 2
stages) is the one an H100 reported.
"""

from __future__ import annotations

import argparse

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import JITFunction

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
         torch.int64: "i64", torch.int8: "i8", torch.bool: "i1", torch.uint8: "u8"}


def shared_bytes(fn: JITFunction, args: tuple, kwargs: dict) -> int:
    """Shared memory of ``fn`` compiled for sm90 with these launch arguments."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = {**dict(zip(fn.arg_names, args, strict=False)), **kwargs}
    signature, constexprs = {}, {}
    for p in fn.params:
        v = values.get(p.name, p.default)
        if p.is_constexpr or v is None:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + TYPES[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            signature[p.name] = "fp32"
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.metadata.shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=232448, help="shared memory per block, bytes")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    seen: dict = {}

    def compile_instead(self, *a, grid, warmup, **kw):
        key = (self.__name__, tuple(getattr(x, "dtype", x) for x in a),
               tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in seen:
            seen[key] = shared_bytes(self, a, dict(kw))
        if seen[key] > args.limit:
            raise OutOfResources(seen[key], args.limit, "shared memory")

    JITFunction.run = compile_instead  # this process only: a lab script, never the library
    from hf_sparsek.kernels import dispatch

    dispatch.interpreter_mode = lambda: True  # let the CPU tensors through to the launches
    from hf_sparsek.kernels.common import _FITTED

    from hf_sparsek import SparsePattern, sparse_attention

    dtype = getattr(torch, args.dtype)
    for dim in (64, 128, 256):
        for block in (64, 128):
            for sel in (None, "mass", "probe", "refine", "moment"):
                pattern = SparsePattern(block_size=block, sink_tokens=64, window=256, selector=sel,
                                        topk_blocks=None if sel is None else 2, per_query_head=sel == "probe")
                q = torch.randn(1, 4, 1024, dim, dtype=dtype, requires_grad=True)
                k = torch.randn(1, 1, 1024, dim, dtype=dtype, requires_grad=True)
                v = torch.randn_like(k, requires_grad=True)
                errors = []
                try:
                    sparse_attention(q, k, v, pattern, backend="triton").sum().backward()
                except Exception as exc:  # noqa: BLE001 - reported
                    errors.append(f"prefill: {type(exc).__name__}: {str(exc)[:120]}")
                try:
                    sparse_attention(torch.randn(1, 4, 1, dim, dtype=dtype), k.detach(), v.detach(), pattern,
                                     backend="triton")
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"decode: {type(exc).__name__}: {str(exc)[:120]}")
                print(f"head dim {dim} block {block} selector {sel}: {'; '.join(errors) or 'fits'}", flush=True)
    print("shapes the fitting chose (kernel, (key block, stages)):",
          sorted({(key[0], key[1:3], fit) for key, fit in _FITTED.items()}, key=str))


if __name__ == "__main__":
    main()
