"""What the GPU would run, read on a CPU machine: compile the kernels for sm_90 (Hopper) and report their machine code.

    python -m scripts.sass_report [--kernels fwd,dkdv,dq] [--dims 128] [--out DIR]

Triton compiles for a named target without a GPU; its wheel ships ptxas and nvdisasm. Per kernel and head dim (the
shipped H100 config, GQA 4, bf16) this prints and writes as JSON: registers and spill bytes (``ptxas -v``), shared
memory, the steady-state loop that issues wgmma (its SASS instructions as laid out, wgmma instructions and the waits
on them: one wait per wgmma means ptxas serialised them, warning C7515), and which loads the software pipeliner made
asynchronous (TTGIR). Run it with the Triton the GPU uses (the H100 image: 3.6) for numbers that match that GPU.
Used to find the dK/dV kernel's per-step overhead (docs/kernel-decisions.md).

Pointer arguments and strides are marked divisible by 16, as Triton's launcher marks them at run time for aligned
tensors; without that the pipeliner leaves 16-bit loads synchronous and the report would not match the GPU's code.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from hf_sparsek.kernels import (
    attention_bwd,
    attention_bwd_gluon,
    attention_fwd,
    attention_fwd_gluon,
    bwd_split,
)
from hf_sparsek.kernels.options import KernelOptions
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FLAGS = dict(SOFTCAP=False, IEEE=False, HAS_KSEG=False, HAS_QSEG=False, HAS_KRANK=False)
BF16_ARGS = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"}
FP32_ARGS = {"LSE", "DELTA", "SCR_K", "SCR_V", "LSE_BWD"}
INT32_PTRS = {"FC", "FT", "PC", "PT", "VT", "VS", "KSEG", "QSEG", "KRANK"}
INT64_PTRS = {"TILES", "TABLE"}
FLOAT_SCALARS = {"qk_mul", "cap2", "scale"}
DIVISIBLE_INTS = {"q_len", "kv_len", "f_width", "p_width"}
GROUP = 4
BLOCK = 128
SHIPPED = KernelOptions()  # the Gluon ring depths and slots the library launches with


def _bin(tool: str) -> str:
    """The ptxas Triton itself uses for sm_90 (newer wheels pick among several), else the wheel's bin/ tool."""
    if tool == "ptxas":
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            return get_ptxas(90).path
        except (ImportError, TypeError, AttributeError):
            pass
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _source(fn, constexprs: dict):
    """Signature, constants and divisibility attributes for one kernel (pointers bf16/fp32/int32 by name)."""
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            constants[(i,)] = constexprs[name]
            continue
        if name in BF16_ARGS:
            signature[name] = "*bf16"
        elif name in FP32_ARGS:
            signature[name] = "*fp32"
        elif name in INT32_PTRS:
            signature[name] = "*i32"
        elif name in INT64_PTRS:
            signature[name] = "*i64"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or name.startswith("s_") or name in DIVISIBLE_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource

        return GluonASTSource(fn, signature, constants, attrs)
    return ASTSource(fn, signature, constants, attrs)


def kernel_cases(dims: list[int], kernels: set[str]):
    """(name, jit function, constexprs, num_warps, num_stages) for the shipped H100 configs."""
    for dim in dims:
        if "fwd" in kernels:
            sub_m, hpp, block_n, warps, stages = attention_fwd.pick_fwd_config(dim, BLOCK, GROUP, 1 << 16)
            yield (f"fwd D{dim}", attention_fwd._attn_fwd_kernel,
                   dict(BLOCK=BLOCK, BLOCK_N=block_n, SUB_M=sub_m, HPP=hpp, HEAD_DIM=dim, USE_TMA=dim != 256, **FLAGS),
                   warps, stages)
        if "gluon_fwd" in kernels and attention_fwd_gluon.AVAILABLE and dim in attention_fwd_gluon.HEAD_DIMS:
            for ring in (2, 3):  # with the query slots the launcher pairs with this ring
                q_slots = attention_fwd_gluon.slots_for(dim, BLOCK, 1, ring)[1]
                yield (f"gluon fwd D{dim} ring {ring} q {q_slots}", attention_fwd_gluon._attn_fwd_ws_kernel,
                       dict(BLOCK=BLOCK, BLOCK_N=BLOCK, HEAD_DIM=dim, STAGES=ring, Q_SLOTS=q_slots), 4, 1)
        if "gluon_dkdv" in kernels and attention_bwd_gluon.AVAILABLE and dim in attention_bwd_gluon.HEAD_DIMS:
            ring = SHIPPED.gluon_dkdv_stages[dim]
            for split in (False, True):  # one program per key tile / chunks of split key tiles
                yield (f"gluon dkdv D{dim} ring {ring}{' split' if split else ''}",
                       attention_bwd_gluon._attn_bwd_dkdv_ws_kernel,
                       dict(BLOCK=BLOCK, BLOCK_M=attention_bwd_gluon.BLOCK_M, HEAD_DIM=dim, STAGES=ring, SPLIT=split),
                       4, 1)
        if "gluon_dq" in kernels and attention_bwd_gluon.AVAILABLE and dim in attention_bwd_gluon.HEAD_DIMS:
            variants = [(64, SHIPPED.gluon_dq_stages[(dim, 64)], SHIPPED.gluon_dq_q_slots), (64, 3, 2),
                        (128, SHIPPED.gluon_dq_stages[(dim, 128)], 1)]
            for block_n, ring, q_slots in variants:  # shipped, two query/dO slots, 128-key steps
                yield (f"gluon dq D{dim} keys {block_n} ring {ring} q {q_slots}",
                       attention_bwd_gluon._attn_bwd_dq_ws_kernel,
                       dict(BLOCK=BLOCK, BLOCK_N=block_n, HEAD_DIM=dim, STAGES=ring, Q_SLOTS=q_slots), 4, 1)
        cfg = attention_bwd.BWD_CONFIGS[dim]
        if "dkdv" in kernels:
            tma = dim != 256
            yield (f"dkdv D{dim}", attention_bwd._attn_bwd_dkdv_kernel,
                   dict(BLOCK=BLOCK, BLOCK_N=cfg.kv_block_n, BLOCK_M=cfg.kv_block_m, HEAD_DIM=dim, G=GROUP,
                        SPLIT=True, USE_TMA=tma, ROW_TMA=tma, **FLAGS), cfg.kv_warps, cfg.kv_stages)
        if "reduce" in kernels:
            yield (f"split reduce D{dim}", bwd_split._reduce_split_kernel,
                   dict(BLOCK=BLOCK, ROWS=32, HEAD_DIM=dim), 4, 1)
        if "dq" in kernels:
            hpp = max(1, cfg.q_block_m // BLOCK)
            yield (f"dq D{dim}", attention_bwd._attn_bwd_dq_kernel,
                   dict(BLOCK=BLOCK, BLOCK_N=cfg.q_block_n, SUB_M=min(BLOCK, cfg.q_block_m), HPP=hpp, HEAD_DIM=dim,
                        USE_TMA=dim != 256, **FLAGS), cfg.q_warps, cfg.q_stages)


def _ptxas_info(ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([_bin("ptxas"), "-v", "-arch=sm_90a", src, "-o", out], capture_output=True, text=True)
    text = run.stdout + run.stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_store_bytes": num(r"(\d+) bytes spill stores"),
            "spill_load_bytes": num(r"(\d+) bytes spill loads"),
            "wgmma_serialised_warning": "C7515" in text or "C7512" in text}  # C7512: too few registers


def _sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) pairs, with branch targets resolved to addresses."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_bin("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    lines = text.splitlines()
    labels, pending, ins = {}, [], []
    for line in lines:
        if m := re.match(r"\s*\.(L_x_\d+):", line):
            pending.append(m.group(1))
        elif m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line):
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            ins.append((addr, m.group(2)))
    resolved = []
    for addr, text_ in ins:
        if m := re.search(r"`\(\.(L_x_\d+)\)", text_):
            text_ = text_ + f" ->{labels.get(m.group(1), -1)}"
        resolved.append((addr, text_))
    return resolved


def _opcode(instruction: str) -> str:
    words = instruction.split()
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def mma_loops(ins: list[tuple[int, str]]) -> list[dict]:
    """Spans of backward branches that issue wgmma (HGMMA), smallest first: instructions laid out between the branch
    and its target (a loop body including code on paths not taken every iteration, such as the partial-tile mask),
    wgmma instructions and the waits on them. The smallest span is the steady-state loop."""
    loops = []
    for addr, text in ins:
        m = re.search(r"->(\d+)$", text)
        if m and "BRA" in text and int(m.group(1)) < addr:
            loops.append((int(m.group(1)), addr))
    bodies = []
    for start, end in loops:
        body = [t for a, t in ins if start <= a <= end]
        if any("HGMMA" in t for t in body):
            bodies.append((start, end, body))
    innermost = [b for b in bodies
                 if not any(o is not b and b[0] <= o[0] and o[1] <= b[1] for o in bodies)]
    out = []
    for start, _end, body in sorted(innermost, key=lambda b: len(b[2])):
        ops = collections.Counter(_opcode(t) for t in body)
        out.append({"start": hex(start), "instructions": len(body), "hgmma": ops["HGMMA"],
                    "wgmma_waits": sum("WARPGROUP.DEPBAR" in t for t in body),
                    "local_memory": ops["LDL"] + ops["STL"],  # spill traffic inside the loop
                    "exp_before_last_wait": _exp_before_last_wait(body),
                    "top_opcodes": dict(ops.most_common(8))})
    return out


def _exp_before_last_wait(body: list[str]) -> int:
    """MUFU.EX2 laid out between a loop's first and last wgmma wait: in the forward's steady loop, the softmax
    exponentials issued while the P.V product is still in flight (0: ptxas put the P.V wait before them)."""
    waits = [i for i, t in enumerate(body) if "WARPGROUP.DEPBAR" in t]
    if len(waits) < 2:
        return 0
    return sum("MUFU.EX2" in t for t in body[waits[0]:waits[-1]])


def ttgir_loads(ttgir: str) -> dict:
    """Asynchronous (cp.async, TMA) and synchronous loads in the kernel's TTGIR."""
    return {"async_copies": ttgir.count("async_copy_global_to_local"), "tma_loads": ttgir.count("async_tma_copy"),
            "sync_tensor_loads": len(re.findall(r" tt\.load .*tensor<\d+x", ttgir))}


def report(name, fn, constexprs, warps, stages) -> dict:
    kernel = triton.compile(_source(fn, constexprs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    ptx = kernel.asm["ptx"]
    return {"kernel": name, "num_warps": warps, "num_stages": stages, "shared_bytes": kernel.metadata.shared,
            "cta_barriers": len(re.findall(r"bar\.sync\s+0;", ptx)), "setmaxnreg": "setmaxnreg" in ptx,
            "wgmma_wait_1": "wgmma.wait_group.sync.aligned 1;" in ptx, **_ptxas_info(ptx),
            **ttgir_loads(kernel.asm["ttgir"]),
            "mma_loops": mma_loops(_sass(kernel.asm["cubin"]))}


def table(rows: list[dict]) -> str:
    lines = ["| kernel | warps/stages | regs | spill B | smem KiB | main loop: SASS instr / wgmma / waits "
             "| async, TMA, sync loads |", "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        first = r["mma_loops"][:1]
        loops = "".join(f"{lp['instructions']} / {lp['hgmma']} / {lp['wgmma_waits']}" for lp in first) or "(no wgmma)"
        lines.append(f"| {r['kernel']} | {r['num_warps']}/{r['num_stages']} | {r['registers']} "
                     f"| {r['spill_store_bytes']} | {r['shared_bytes'] / 1024:.0f} | {loops} "
                     f"| {r['async_copies']}, {r['tma_loads']}, {r['sync_tensor_loads']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="fwd,dkdv,dq",
                    help="any of fwd, dkdv, dq, reduce (the dK/dV split sum), gluon_fwd (the Gluon forward), "
                         "gluon_dkdv (the Gluon dK/dV), gluon_dq (the Gluon dQ)")
    ap.add_argument("--dims", default="128", help="head dims (64, 128, 256)")
    ap.add_argument("--out", default="", help="folder for sass_report.json (printed only when empty)")
    args = ap.parse_args()
    kernels = set(args.kernels.split(","))
    rows = []
    for case in kernel_cases([int(d) for d in args.dims.split(",")], kernels):
        rows.append(report(*case))
        print(f"compiled {case[0]}", file=sys.stderr)
    env = {"triton": triton.__version__, "target": "cuda sm_90 (compiled on CPU)", "group": GROUP, "block": BLOCK}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sass_report.json"), "w") as f:
            json.dump({"env": env, "kernels": rows}, f, indent=1)
    print(json.dumps(env))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
