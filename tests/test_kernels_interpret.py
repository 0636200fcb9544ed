"""Triton block-sparse attention kernels vs the fp64 reference, in the Triton CPU interpreter.

The interpreter is enabled for this module alone (kernels re-decorated in interpreter mode if needed). Inputs
are fp32 (exact in the interpreter) plus fp16 and bf16 cases (the interpreter's bf16 ``tl.dot`` is broken, so the
launches hand it float32 copies there: ``kernels/dispatch.py: interpreter_upcast``; bf16 on the kernels themselves
is checked on the GPU by ``scripts/gpu_kernels.py``). Forward output, LSE and dQ/dK/dV are compared by relative norm
on fresh random inputs.
"""

from __future__ import annotations

import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # restored after the imports below; tests re-enable it with a fixture

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7) and int(__import__("numpy").__version__[0]) >= 2:
    # Triton 3.6's interpreter converts arrays with APIs numpy 2 removed (CI's oldest leg pins numpy<2).
    pytest.skip(f"Triton {triton.__version__}'s interpreter needs numpy<2", allow_module_level=True)

import hf_sparsek  # noqa: E402
from hf_sparsek import BlockLayout, SparsePattern  # noqa: E402
from hf_sparsek.ops import build_index_for, sparse_attention  # noqa: E402
from hf_sparsek.reference import reference_attention  # noqa: E402


def _interpreted_kernels() -> None:
    """Re-decorate Triton's standard library and our kernels in interpreter mode when an earlier test module imported
    triton (or the kernels) without TRITON_INTERPRET: ``@triton.jit`` picks compiled vs interpreted at decoration."""
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl_standard.cdiv, InterpretedFunction):
        importlib.reload(tl_standard)
        importlib.reload(sys.modules["triton.language"])
    from hf_sparsek.kernels import attention_fwd, common, decode

    # common alone may have been imported compiled (the Gluon forward's module imports it, not attention_fwd)
    kernels = (attention_fwd._attn_fwd_kernel, common.element_mask, decode._decode_split_kernel)
    if not all(isinstance(f, InterpretedFunction) for f in kernels):
        for name in ("common", "attention_fwd", "bwd_split", "attention_bwd", "decode"):
            importlib.reload(importlib.import_module(f"hf_sparsek.kernels.{name}"))


_interpreted_kernels()
from hf_sparsek.triton_ops import triton_block_sparse_attention  # noqa: E402

if _PREVIOUS_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET")
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


@pytest.fixture(autouse=True)
def _interpret_mode(monkeypatch):
    """The kernels accept CPU tensors only in interpreter mode; keep it on for these tests alone."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def kernel_options(**changes) -> contextlib.AbstractContextManager:
    """``hf_sparsek.settings`` with these KernelOptions fields changed, inside a ``with`` block."""
    return hf_sparsek.settings(kernels=dataclasses.replace(hf_sparsek.get_settings().kernels, **changes))

SINK_WIN = SparsePattern(block_size=64, sink_tokens=4, window=40)
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative norm error; the floor 1.0 keeps all-zero references (e.g. dK of a single key) meaningful."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "kernel produced NaN/inf"
    return float((a - b).norm() / b.norm().clamp_min(1.0))


def _inputs(batch, heads, length, dim, gen, dtype, grad, seq_major):
    """Random (B, H, S, D) input; ``seq_major`` gives transformers' layout: a transposed view of (B, S, H, D)."""
    if seq_major:
        t = torch.randn(batch, length, heads, dim, generator=gen).to(dtype).transpose(1, 2)
    else:
        t = torch.randn(batch, heads, length, dim, generator=gen).to(dtype)
    return t.requires_grad_(grad)


def _run_case(batch, hq, hk, q_len, kv_len, dim, pattern, dtype=torch.float32, softcap=None, attention_mask=None,
              grad=True, seed=0, seq_major=False):
    """Compare forward, LSE and gradients of the kernel with the fp64 reference on one random input."""
    gen = torch.Generator().manual_seed(seed)
    q = _inputs(batch, hq, q_len, dim, gen, dtype, grad, seq_major)
    k = _inputs(batch, hk, kv_len, dim, gen, dtype, grad, seq_major)
    v = _inputs(batch, hk, kv_len, dim, gen, dtype, grad, seq_major)
    index = build_index_for(q, k, pattern, attention_mask=attention_mask)
    scale = dim**-0.5
    out, lse = triton_block_sparse_attention(q, k, v, index, scale, softcap, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    q64, k64, v64 = (t.detach().double().requires_grad_(grad) for t in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, index, scale=scale, softcap=softcap, return_lse=True)
    tol = TOL[dtype]
    assert _rel(out, ref) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "empty rows must give lse -inf exactly where the reference does"
    if finite.any():
        assert (lse.double()[finite] - ref_lse[finite]).abs().max() < 1e-3
    assert (out.detach()[~finite] == 0).all(), "rows with nothing to attend must be 0"
    if grad:
        d_out = torch.randn(out.shape, generator=gen).to(dtype)
        got = torch.autograd.grad(out, (q, k, v), d_out)
        want = torch.autograd.grad(ref, (q64, k64, v64), d_out.double())
        for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
            assert g.dtype == dtype
            assert _rel(g, w) < 2 * tol, name
    return out, lse


def _case_id(batch, hq, hk, q_len, kv_len, dim):
    t = f"T{q_len}" if q_len == kv_len else f"Tq{q_len}-Tk{kv_len}"
    return f"B{batch}-{t}-Hq{hq}-Hk{hk}-D{dim}"


LENGTH_CASES = [(1, 4, 1, t, t, 64) for t in (1, 17, 63, 64, 65, 200)]


@pytest.mark.parametrize("shape", LENGTH_CASES, ids=[_case_id(*c) for c in LENGTH_CASES])
def test_lengths_sink_window(shape):
    _run_case(*shape, SINK_WIN)


HEAD_CASES = [(1, 2, 1, 65, 65, 128), (1, 2, 2, 70, 70, 256), (2, 8, 2, 63, 63, 64), (1, 8, 1, 65, 65, 64)]


@pytest.mark.parametrize("shape", HEAD_CASES, ids=[_case_id(*c) for c in HEAD_CASES])
def test_head_dims_and_groups(shape):
    _run_case(*shape, SINK_WIN)


PATTERNS = {
    "dense-b64": SparsePattern(block_size=64),
    "dense-b128": SparsePattern(block_size=128),
    "strided": SparsePattern(block_size=64, sink_tokens=2, window=16, layout=BlockLayout("strided", stride=3)),
    "random": SparsePattern(block_size=64, layout=BlockLayout("random", density=0.4, seed=3)),
    "window-only": SparsePattern(block_size=64, window=7),
    "sink-window-b128": SparsePattern(block_size=128, sink_tokens=8, window=100),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_patterns(name):
    _run_case(2, 4, 2, 200, 200, 64, PATTERNS[name])


def test_softcap():
    _run_case(1, 4, 2, 130, 130, 64, SINK_WIN, softcap=3.0)


def test_fp16():
    _run_case(1, 4, 1, 100, 100, 64, SINK_WIN, dtype=torch.float16)


@pytest.mark.parametrize("q_len,kv_len", [(100, 100), (40, 200)], ids=["prefill", "chunk-40"])
def test_bf16_matches_reference(q_len, kv_len):
    """bfloat16 in the interpreter: forward, LSE and gradients equal the reference (its ``tl.dot`` misreads bf16
    tiles; without the float32 copies the output is off by about 1e9)."""
    _run_case(2, 4, 2, q_len, kv_len, 64, SINK_WIN, dtype=torch.bfloat16, grad=q_len == kv_len)


@pytest.mark.parametrize("q_len", [1, 4])
def test_bf16_split_kv_decode_matches_reference(q_len):
    """The split-KV decode kernel in bfloat16 (the path ``sparse_attention`` takes for a short query run), batch 2
    with one row left-padded, GQA: the output is bf16 and equals the reference backend's."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, q_len, 128, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, 230, 128, generator=gen).to(torch.bfloat16) for _ in range(2))
    mask = torch.ones(2, 230, dtype=torch.bool)
    mask[1, :37] = False
    got = sparse_attention(q, k, v, SINK_WIN, attention_mask=mask, backend="triton")
    want = sparse_attention(q, k, v, SINK_WIN, attention_mask=mask, backend="reference")
    assert got.dtype == torch.bfloat16
    assert _rel(got, want) < TOL[torch.bfloat16]


@pytest.mark.parametrize(
    "q_len,kv_len", [(1, 200), (1, 64), (40, 200), (64, 190)], ids=["decode-200", "decode-64", "chunk-40", "chunk-64"]
)
def test_decode_and_chunked_prefill(q_len, kv_len):
    _run_case(2, 4, 1, q_len, kv_len, 64, SINK_WIN)


TMA_CASES = {
    "lengths-odd": dict(shape=(1, 4, 1, 65, 65, 64), pattern=SINK_WIN),
    "gqa-d128-b128": dict(shape=(2, 4, 2, 200, 200, 128), pattern=PATTERNS["sink-window-b128"]),
    "strided": dict(shape=(1, 4, 2, 150, 150, 64), pattern=PATTERNS["strided"]),
    "chunked-prefill": dict(shape=(2, 4, 1, 40, 200, 64), pattern=SINK_WIN),
    "decode": dict(shape=(1, 4, 1, 1, 130, 64), pattern=SINK_WIN),
}


@pytest.mark.parametrize("seq_major", [False, True], ids=["bhsd", "bshd-view"])
@pytest.mark.parametrize("name", list(TMA_CASES))
def test_tma_loads_match_reference(name, seq_major, monkeypatch):
    """The TMA descriptor path (forced; the GPU picks it on Hopper) loads the same K/V tiles, out-of-range rows as
    zeros: forward and gradients match the reference, on contiguous inputs and on transformers' transposed views."""
    from hf_sparsek.kernels import tma

    case = TMA_CASES[name]
    gen = torch.Generator().manual_seed(1)
    probe = _inputs(1, 2, 8, case["shape"][-1], gen, torch.float32, False, seq_major)
    assert tma.use_tma(probe, setting=True), "the forced TMA path must really run"
    with kernel_options(tma=True):
        _run_case(*case["shape"], case["pattern"], seq_major=seq_major, seed=3)


def test_tma_needs_alignment():
    """Unaligned strides (an odd head dim slice) keep the pointer path instead of a TMA fault."""
    from hf_sparsek.kernels import tma

    x = torch.randn(1, 2, 10, 65)[..., :64]  # row stride 65 floats = 260 bytes, not a multiple of 16
    assert not tma.aligned(x)
    assert tma.aligned(torch.randn(1, 2, 10, 64))
    assert not tma.aligned(torch.randn(1, 1, 10, 64).expand(1, 2, 10, 64))  # a broadcast head dim: stride 0


def test_tma_automatic_choice():
    """Automatic mode never picks TMA off CUDA (or in the interpreter); forcing it off always wins."""
    from hf_sparsek.kernels import tma

    x = torch.randn(1, 2, 16, 64)
    assert not tma.use_tma(x, setting=None)
    assert not tma.use_tma(x, setting=False)
    assert tma.use_tma(x, setting=True)  # interpreter: forced on, for the tests above
    assert not tma.use_tma(torch.randn(1, 2, 16, 65)[..., :64], setting=True)  # alignment is never overridden


def test_left_padding_empty_rows():
    """Left padding: padded query rows attend nothing (zeros, finite grads); sinks count from the first real token."""
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[0, :37] = False
    mask[1, :70] = False
    out, lse = _run_case(2, 4, 2, 150, 150, 64, SINK_WIN, attention_mask=mask)
    assert (out[0, :, :37] == 0).all() and torch.isinf(lse[0, :, :37]).all()


def test_sparse_attention_dispatch_forced_triton():
    q, k, v = (torch.randn(1, 2, 70, 64) for _ in range(3))
    got = sparse_attention(q, k, v, SINK_WIN, backend="triton")
    want = sparse_attention(q.double(), k.double(), v.double(), SINK_WIN, backend="reference")
    assert _rel(got, want) < 2e-5


def test_deterministic():
    """Forward bitwise repeatable; dK/dV (key-major, no atomics) and dQ identical across runs."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 150, 64, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 150, 64, generator=gen, requires_grad=True)
    v = torch.randn(1, 1, 150, 64, generator=gen, requires_grad=True)
    do = torch.randn(1, 4, 150, 64, generator=gen)
    index = build_index_for(q, k, SINK_WIN)
    runs = []
    for _ in range(2):
        out = triton_block_sparse_attention(q, k, v, index, 0.125)
        runs.append((out.detach(),) + torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_eager_fast_path_equals_custom_op():
    """Eager calls skip the custom op's dispatch (host time) but run the same kernels: outputs and gradients are
    bit-identical to the custom-op path, with GQA, padding and chunked prefill."""
    gen = torch.Generator().manual_seed(9)
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[1, :23] = False
    q = torch.randn(2, 4, 150, 64, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 150, 64, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, 150, 64, generator=gen, requires_grad=True)
    do = torch.randn(2, 4, 150, 64, generator=gen)
    index = build_index_for(q, k, SINK_WIN, attention_mask=mask)
    runs = []
    for fast in (True, False):
        with kernel_options(eager_fast_path=fast):
            out, lse = triton_block_sparse_attention(q, k, v, index, 0.125, return_lse=True)
            assert ("_EagerBlockSparseAttention" in type(out.grad_fn).__name__) == fast, type(out.grad_fn).__name__
            runs.append((out.detach(), lse.detach()) + torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    assert _rel(runs[0][0], reference_attention(q.double(), k.double(), v.double(), index, scale=0.125)) < 2e-5


SLOW_CASES = [
    (b, hq, hk, t, t, d)
    for (b, hq, hk) in ((1, 4, 1), (2, 8, 2), (1, 3, 3))
    for t in (1, 17, 129, 300)
    for d in (64, 128, 256)
]


@pytest.mark.slow
@pytest.mark.parametrize("shape", SLOW_CASES, ids=[_case_id(*c) for c in SLOW_CASES])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_sweep_slow(shape, name):
    _run_case(*shape, PATTERNS[name])


def test_custom_op_passes_opcheck():
    """The forward custom op's schema, fake (meta) implementation and autograd registration are consistent, so
    torch.compile can treat it as one opaque op."""
    from hf_sparsek.triton_ops import block_sparse_attn_fwd

    q = torch.randn(1, 4, 70, 64, requires_grad=True)
    k = torch.randn(1, 2, 70, 64, requires_grad=True)
    v = torch.randn(1, 2, 70, 64, requires_grad=True)
    index = build_index_for(q, k, SINK_WIN)
    args = (q, k, v, index.full_count, index.full_tiles, index.part_count, index.part_tiles, *index.transposed(),
            None, None, None, 64, index.q_offset, index.kv_offset, index.sink_tokens, index.window, 0.125, 0.0)
    torch.library.opcheck(block_sparse_attn_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_runs_through_the_op():
    q = torch.randn(1, 4, 70, 64, requires_grad=True)
    k = torch.randn(1, 2, 70, 64, requires_grad=True)
    v = torch.randn(1, 2, 70, 64, requires_grad=True)
    index = build_index_for(q, k, SINK_WIN)

    def attend(q, k, v):
        return triton_block_sparse_attention(q, k, v, index, 0.125) * 2.0

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    ref = reference_attention(q.double(), k.double(), v.double(), index, scale=0.125) * 2.0
    assert (out.double() - ref).norm() / ref.norm() < 1e-5
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_dkdv_full_and_partial_entries_match_reference():
    """The dK/dV kernel's one loop over a key tile's list: full entries unmasked, then partial ones with the element
    mask (window edge, sinks, selected tiles of a random layout, left padding), GQA."""
    pattern = SparsePattern(block_size=64, sink_tokens=3, window=70, layout=BlockLayout("random", density=0.5, seed=1))
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[0, :21] = False
    _run_case(2, 4, 2, 300, 300, 64, pattern, attention_mask=mask, seed=3)


@pytest.mark.parametrize("longest, typical, splits", [
    (128, 33, True),  # the sink column of 16K sink+window rows (3.9x): split since the imbalance is 3 (docs)
    (99, 33, True),
    (98, 33, False),  # under a 3-fold imbalance
    (64, 32, False),  # dense causal: longest list twice the median
])
def test_split_policy_follows_the_imbalance(longest, typical, splits):
    from hf_sparsek.kernels.bwd_split import split_key_lists
    from hf_sparsek.kernels.options import KernelOptions

    n = 16
    full_count = torch.full((1, 1, n), typical, dtype=torch.int32)
    full_count[0, 0, 0] = longest
    full_tiles = torch.arange(longest, dtype=torch.int32).expand(1, 1, n, longest).contiguous()
    part_count = torch.zeros(1, 1, n, dtype=torch.int32)
    part_tiles = torch.zeros(1, 1, n, 1, dtype=torch.int32)
    split = split_key_lists(full_count, full_tiles, part_count, part_tiles, None, KernelOptions().split_imbalance)
    assert (split is not None) == splits
    if splits:  # only the long list becomes several programs; the others stay whole
        assert int((split.slot >= 0).sum()) == int(split.tile.eq(0).sum()) > 1


@pytest.mark.parametrize("chunk", [1, 3], ids=["chunk1", "chunk3"])
def test_split_key_lists_keep_gradients_exact_and_deterministic(chunk):
    """Long per-key-tile lists (the sink tile, strided columns) split across programs give the same dK/dV."""
    from hf_sparsek.kernels.bwd_split import split_key_lists

    pattern = SparsePattern(block_size=64, sink_tokens=4, window=30, layout=BlockLayout("strided", stride=3))
    q = torch.randn(2, 4, 290, 64, requires_grad=True)
    k = torch.randn(2, 2, 290, 64, requires_grad=True)
    v = torch.randn(2, 2, 290, 64, requires_grad=True)
    mask = torch.ones(2, 290, dtype=torch.bool)
    mask[1, :50] = False
    index = build_index_for(q, k, pattern, attention_mask=mask)
    split = split_key_lists(*index.transposed(), chunk=chunk, imbalance=3)
    assert split is not None  # the split path really runs
    with kernel_options(split_chunk=chunk):
        out = triton_block_sparse_attention(q, k, v, index, 0.125)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        again = torch.autograd.grad(triton_block_sparse_attention(q, k, v, index, 0.125), (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qd, kd, vd, index, scale=0.125)
    want = torch.autograd.grad(ref, (qd, kd, vd), grad.double())
    for g, g2, w in zip(got, again, want, strict=True):
        assert torch.equal(g, g2)
        assert (g.double() - w).norm() / w.norm() < 1e-5


def test_settings_reach_the_launchers(monkeypatch):
    """``hf_sparsek.settings(kernels=...)`` -> triton_ops -> kernels/dispatch -> the launchers: the defaults give the
    pointer loads and whole key lists on CPU, non-default options the TMA path and split lists, in both passes."""
    from hf_sparsek.kernels import attention_bwd, attention_fwd

    seen = {}
    real_fwd, real_bwd = attention_fwd.prepare_forward, attention_bwd.prepare_backward

    def spy_fwd(*args, **kwargs):
        seen["fwd_tma"] = kwargs["tma"]
        return real_fwd(*args, **kwargs)

    def spy_bwd(*args):
        seen["plan"] = args[-1]
        return real_bwd(*args)

    monkeypatch.setattr(attention_fwd, "prepare_forward", spy_fwd)
    monkeypatch.setattr(attention_bwd, "prepare_backward", spy_bwd)
    pattern = SparsePattern(block_size=64, sink_tokens=4, window=30, layout=BlockLayout("strided", stride=3))
    q = torch.randn(1, 4, 290, 64, requires_grad=True)
    k = torch.randn(1, 2, 290, 64, requires_grad=True)
    v = torch.randn(1, 2, 290, 64, requires_grad=True)
    index = build_index_for(q, k, pattern)
    for changes, tma, split in (({}, False, False), ({"tma": True, "split_chunk": 1}, True, True)):
        with kernel_options(**changes):
            out = triton_block_sparse_attention(q, k, v, index, 0.125)
            out.sum().backward()
        plan = seen.pop("plan")
        assert seen.pop("fwd_tma") is tma and plan.tma is tma and plan.rows_tma is tma, changes
        assert (plan.split is not None) is split, changes
        assert not plan.gluon_dkdv and not plan.gluon_dq and plan.side_stream is None  # CPU: Triton, one stream


def test_runtime_autotune_picks_fastest_caches_and_persists(tmp_path, monkeypatch):
    """Opt-in tuning: each candidate is timed once per shape class (a failing one skipped), the fastest is used and
    cached in memory and on disk; results stay exact; a later call or process pays no timing."""
    import json

    from hf_sparsek.kernels import autotune
    from hf_sparsek.kernels.attention_bwd import BWD_CANDIDATES
    from hf_sparsek.kernels.attention_fwd import FWD_CANDIDATES

    cache = tmp_path / "autotune.json"
    monkeypatch.setenv("HF_SPARSEK_AUTOTUNE_CACHE", str(cache))
    autotune.clear_memory()
    # Scripted "timings" (no clock is read): forward candidate 2 wins and 3 cannot launch, backward candidate 1 wins.
    fwd_ms = [5.0, 4.0, 1.0, RuntimeError("out of resource")]
    bwd_ms = [2.0, 1.0, 3.0]
    script = iter(fwd_ms + bwd_ms)
    timed = []  # one entry per candidate launch the tuner asked to time

    def fake_time(fn):
        timed.append(1)
        fn()
        ms = next(script)
        if isinstance(ms, Exception):
            raise ms
        return ms

    monkeypatch.setattr(autotune, "_time", fake_time)
    try:
        with kernel_options(autotune=True):
            _run_case(1, 4, 2, 130, 130, 64, SINK_WIN, seed=2)
            n_candidates = len(FWD_CANDIDATES[64]) + len(BWD_CANDIDATES[64])
            assert len(timed) == n_candidates  # every candidate tried once
            saved = json.loads(cache.read_text())
            chosen = {key.split("|")[0]: entry["config"] for key, entry in saved.items()}
            assert chosen == {"fwd": dataclasses.asdict(FWD_CANDIDATES[64][2]),
                              "bwd": dataclasses.asdict(BWD_CANDIDATES[64][1])}
            _run_case(1, 4, 2, 130, 130, 64, SINK_WIN, seed=3)  # same shape class: cached in memory
            autotune.clear_memory()
            _run_case(1, 4, 2, 130, 130, 64, SINK_WIN, seed=4)  # fresh memory: read back from the file
            assert len(timed) == n_candidates  # neither later call tuned again
    finally:
        autotune.clear_memory()


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compiled_sparse_attention_op_on_the_kernels_matches_reference(compile_backend):
    """Under torch.compile ``sparse_attention`` is one custom op that builds the index inside; on the kernels its
    output and its gradients (the backward op rebuilds the index and differentiates the kernels' call) equal the
    reference, with GQA and left padding."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[1, :23] = False
    q, k, v = (torch.randn(2, h, 150, 64, generator=gen, requires_grad=True) for h in (4, 2, 2))
    do = torch.randn(2, 4, 150, 64, generator=gen)

    def attend(q, k, v, backend):
        return sparse_attention(q, k, v, SINK_WIN, scale=0.125, attention_mask=mask, backend=backend)

    compiled = torch.compile(attend, backend=compile_backend, fullgraph=True)
    runs = []
    for run, backend in ((compiled, "triton"), (attend, "reference")):
        out = run(q, k, v, backend)
        runs.append((out,) + torch.autograd.grad(out, (q, k, v), do))
    for got, want in zip(*runs, strict=True):
        assert _rel(got, want) < 2e-5


@pytest.mark.parametrize("layout", ["bhsd", "bshd-view"])
def test_sparse_attention_op_passes_opcheck(layout):
    """The compiled path's custom op: schema, fake implementation (shapes AND strides, also for the (B, S, H, D)
    storage transformers hands over as a transposed view) and autograd registration are consistent."""
    from hf_sparsek.ops import _pattern_text, sparse_attention_op

    def tensor(heads: int) -> torch.Tensor:
        if layout == "bhsd":
            return torch.randn(1, heads, 70, 64, requires_grad=True)
        return torch.randn(1, 70, heads, 64).transpose(1, 2).requires_grad_()

    q, k, v = tensor(4), tensor(2), tensor(2)
    args = (q, k, v, None, None, None, torch.tensor([-1, 0]), _pattern_text(SINK_WIN), 0.125, 0.0, "triton", False)
    torch.library.opcheck(sparse_attention_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_launch_fitting_shrinks_until_the_kernel_fits_and_remembers():
    """A kernel that needs more shared memory than the GPU has (Triton raises OutOfResources when it loads, before
    it runs) is launched again with half the key block, then fewer stages; the shape that fitted is remembered, so
    the next call goes straight to it. A kernel that always fitted never builds its key. Nothing fits: the error
    surfaces."""
    from hf_sparsek.kernels.common import launch_fitting
    from triton.runtime.errors import OutOfResources

    tried: list[tuple[int, int]] = []
    keys: list[str] = []

    def launch(block_n: int, stages: int) -> None:
        tried.append((block_n, stages))
        if block_n * stages > 32:  # "shared memory" grows with both
            raise OutOfResources(block_n * stages, 32, "shared memory")

    def key(tag: str):
        return lambda: keys.append(tag) or (tag,)

    launch_fitting("test-fits", launch, key("fits"), 16, 2)
    assert tried == [(16, 2)] and keys == []  # the common case: one launch, no key
    tried.clear()
    launch_fitting("test-a", launch, key("a"), 64, 2)
    assert tried == [(64, 2), (32, 2), (16, 2)]
    tried.clear()
    launch_fitting("test-a", launch, key("a"), 64, 2)
    assert tried == [(16, 2)]  # remembered
    tried.clear()
    launch_fitting("test-a", launch, key("a3"), 64, 3)  # 16 x 3 is too much: fewer stages from the full block
    assert tried == [(64, 3), (32, 3), (16, 3), (64, 2), (32, 2), (16, 2)]
    tried.clear()

    def staged(block_n: int, stages: int) -> None:
        tried.append((block_n, stages))
        if stages > 1:
            raise OutOfResources(stages, 1, "shared memory")

    launch_fitting("test-b", staged, key("b"), 64, 3, shrink_block=False)  # a whole-tile key step: stages only
    assert tried == [(64, 3), (64, 2), (64, 1)]

    def never(block_n: int, stages: int) -> None:
        raise OutOfResources(1, 0, "shared memory")

    with pytest.raises(OutOfResources):
        launch_fitting("test-c", never, key("c"), 64, 2)
    with pytest.raises(OutOfResources):
        launch_fitting("test-d", never, key("d"), 16, 1)
