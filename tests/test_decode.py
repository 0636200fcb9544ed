"""The split-KV decode path (kernels/decode.py) in Triton's interpreter against the PyTorch reference: from a block
index's lists and straight from the pattern (no index), static and dynamic patterns, padding, GQA/MQA, head dims
64/128/256, q_len 1 and 4, keys starting past position 0, softcap, many splits."""

from __future__ import annotations

import pytest
import torch

from hf_sparsek import SparsePattern
from hf_sparsek.ops import build_index_for, sequence_layout, sparse_attention
from hf_sparsek.reference import reference_attention


@pytest.fixture
def kernels(monkeypatch):
    """The Triton kernels re-decorated in interpreter mode, as tests/test_kernels_interpret.py sets them up."""
    pytest.importorskip("triton")
    module = pytest.importorskip("test_kernels_interpret")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return module


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp_min(1.0))


def _left_padding(batch: int, kv_len: int) -> torch.Tensor:
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    for b in range(1, batch):
        mask[b, : 37 * b] = False  # rows padded by 37, 74, ... keys
    return mask


CASES = [
    # batch, hq, hkv, q_len, kv_len, kv_offset, dim, pattern, padded, softcap
    (2, 4, 2, 1, 700, 0, 64, SparsePattern(block_size=64, sink_tokens=70, window=200), False, None),
    (3, 4, 1, 1, 500, 0, 128, SparsePattern(block_size=64, sink_tokens=5, window=130), True, None),
    (1, 2, 2, 4, 333, 0, 256, SparsePattern(block_size=64, sink_tokens=3, window=64), False, 30.0),
    (2, 8, 2, 4, 381, 0, 64, SparsePattern(block_size=128, window=100), True, None),  # run crosses a tile edge
    (2, 4, 2, 3, 300, 150, 64, SparsePattern(block_size=64, sink_tokens=200, window=90), False, None),  # cached
    (2, 4, 2, 1, 420, 0, 64, SparsePattern(block_size=64), True, None),  # dense, padded
    (2, 4, 2, 2, 420, 0, 64, SparsePattern(block_size=64, sink_tokens=8, window=64, topk_blocks=2,
                                           selector="meanpool"), True, None),
    (2, 4, 2, 1, 300, 0, 64, SparsePattern(block_size=64, sink_tokens=8, window=64, topk_blocks=3,
                                           selector="meanpool"), False, None),
]


def _case_id(case) -> str:
    batch, hq, hkv, q_len, kv_len, kv_offset, dim, pattern, padded, softcap = case
    kind = "dense" if pattern.is_dense else ("topk" if pattern.topk_blocks else "static")
    return (f"B{batch}-Hq{hq}-Hk{hkv}-q{q_len}-kv{kv_len}+{kv_offset}-D{dim}-{kind}{pattern.block_size}"
            + ("-pad" if padded else "") + ("-cap" if softcap else ""))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_decode_without_index_matches_reference(case, kernels, monkeypatch):
    batch, hq, hkv, q_len, kv_len, kv_offset, dim, pattern, padded, softcap = case
    q = torch.randn(batch, hq, q_len, dim)
    k = torch.randn(batch, hkv, kv_len, dim)
    v = torch.randn(batch, hkv, kv_len, dim)
    mask = _left_padding(batch, kv_len) if padded else None
    import hf_sparsek.triton_ops as triton_ops

    calls = []
    real = triton_ops.triton_decode_without_index
    monkeypatch.setattr(triton_ops, "triton_decode_without_index", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kwargs = dict(kv_offset=kv_offset, attention_mask=mask, softcap=softcap)
    with torch.no_grad():
        out = sparse_attention(q, k, v, pattern, backend="triton", **kwargs)
        ref = sparse_attention(q.double(), k.double(), v.double(), pattern, backend="reference", **kwargs)
    assert calls, "the decode call should run without a block index"
    assert _rel(out, ref) < 2e-5


@pytest.mark.parametrize("case", CASES[:4], ids=[_case_id(c) for c in CASES[:4]])
@pytest.mark.parametrize("n_splits", [1, 3, 64])
def test_decode_from_index_lists_matches_reference(case, n_splits, kernels):
    from hf_sparsek.kernels.decode import decode_forward

    batch, hq, hkv, q_len, kv_len, kv_offset, dim, pattern, padded, softcap = case
    q, k, v = torch.randn(batch, hq, q_len, dim), torch.randn(batch, hkv, kv_len, dim), torch.randn(batch, hkv,
                                                                                                    kv_len, dim)
    mask = _left_padding(batch, kv_len) if padded else None
    index = build_index_for(q, k, pattern, kv_offset=kv_offset, attention_mask=mask)
    seg = None if index.k_seg is None else index.k_seg
    out = decode_forward(q, k, v, block=index.block_size, q_offset=index.q_offset, kv_offset=index.kv_offset,
                         sink=index.sink_tokens, window=index.window, scale=dim**-0.5, softcap=float(softcap or 0.0),
                         n_splits=n_splits, lists=(index.full_count, index.full_tiles, index.part_count,
                                                   index.part_tiles), k_seg=seg, k_rank=index.k_rank)
    ref = reference_attention(q.double(), k.double(), v.double(), index, scale=dim**-0.5, softcap=softcap)
    assert _rel(out, ref) < 2e-5


@pytest.mark.parametrize("n_splits,dim", [(37, 256), (70, 128)])
def test_many_splits_combine_in_chunks(n_splits, dim, kernels):
    """More splits than the combine kernel weighs at a time (``COMBINE_CHUNK``) and head dims wider than its slice
    (``COMBINE_D_BLOCK``), with padding: a dense run over a long cache, as a dense tail's rows give it."""
    from hf_sparsek.kernels.decode import COMBINE_CHUNK, COMBINE_D_BLOCK, decode_forward

    assert n_splits > COMBINE_CHUNK and dim > COMBINE_D_BLOCK
    q, k, v = torch.randn(2, 4, 3, dim), torch.randn(2, 1, 64 * 75 + 5, dim), torch.randn(2, 1, 64 * 75 + 5, dim)
    mask = _left_padding(2, k.shape[2])
    index = build_index_for(q, k, SparsePattern(block_size=64), attention_mask=mask)
    out = decode_forward(q, k, v, block=64, q_offset=index.q_offset, kv_offset=0, sink=0, window=0, scale=dim**-0.5,
                         softcap=0.0, n_splits=n_splits, lists=(index.full_count, index.full_tiles,
                                                                index.part_count, index.part_tiles),
                         k_seg=index.k_seg, k_rank=index.k_rank)
    ref = reference_attention(q.double(), k.double(), v.double(), index, scale=dim**-0.5)
    assert _rel(out, ref) < 2e-5


@pytest.mark.parametrize("repeats", [False, True], ids=["distinct", "repeated"])
def test_decode_with_selected_tiles_matches_reference(kernels, repeats):
    """Tiles from outside the op (a learned scorer): -1 entries, tiles the window keeps, and repeated tiles, which
    are visited once (as the block index lists them)."""
    q, k, v = torch.randn(2, 4, 1, 64), torch.randn(2, 2, 640, 64), torch.randn(2, 2, 640, 64)
    pattern = SparsePattern(block_size=64, sink_tokens=4, window=100)
    tiles = torch.tensor([[[[3, 8, -1]], [[8, 9, 2]]], [[[-1, -1, 5]], [[0, 1, 4]]]], dtype=torch.int32)
    if repeats:
        tiles = torch.tensor([[[[2, 3, 3]], [[0, 2, 0]]], [[[2, 2, -1]], [[3, 1, 3]]]], dtype=torch.int32)
    with torch.no_grad():
        out = sparse_attention(q, k, v, pattern, selected_tiles=tiles, backend="triton")
        ref = sparse_attention(q, k, v, pattern, selected_tiles=tiles, backend="reference")
    assert _rel(out, ref) < 2e-5


def test_decode_fully_masked_row_is_zero(kernels):
    """A row whose keys are all padding attends nothing: zeros, never NaN."""
    q, k, v = torch.randn(2, 2, 1, 64), torch.randn(2, 2, 200, 64), torch.randn(2, 2, 200, 64)
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = sparse_attention(q, k, v, SparsePattern(block_size=64, sink_tokens=4, window=64), attention_mask=mask,
                               backend="triton")
    assert torch.isfinite(out).all() and out[1].abs().max() == 0 and out[0].abs().max() > 0


@pytest.mark.parametrize("cache,pattern,dtype", [
    ("dynamic", SparsePattern(block_size=64, sink_tokens=3, window=48), torch.float32),
    ("static", SparsePattern(block_size=64, sink_tokens=3, window=48, topk_blocks=1), torch.float32),
    ("dynamic", SparsePattern(block_size=64, sink_tokens=3, window=48, topk_blocks=1), torch.bfloat16),
], ids=["dynamic-sink-window", "static-topk-mass", "dynamic-topk-mass-bf16"])
def test_generate_through_the_decode_kernel_equals_the_reference(cache, pattern, dtype, kernels, monkeypatch):
    """generate() with left padding: the Triton path (decode steps through the split-KV kernel, no index) gives the
    reference backend's tokens and logits, with a dynamic and a static cache, and a bfloat16 model (which the
    interpreter's kernels take as float32 copies: ``kernels/dispatch.py: interpreter_upcast``)."""
    from test_generate import GEN, _prompt
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_sparsek

    torch.manual_seed(0)  # head dim 64: the kernels' smallest
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=97, max_position_embeddings=256)
    model = LlamaForCausalLM(config).to(dtype).eval()
    hf_sparsek.set_pattern(model, pattern)
    ids, mask = _prompt(length=70)
    kwargs = {} if cache == "dynamic" else {"cache_implementation": "static"}
    import hf_sparsek.triton_ops as triton_ops

    calls = []
    real = triton_ops.triton_decode_without_index
    monkeypatch.setattr(triton_ops, "triton_decode_without_index", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    results = {}
    for backend in ("reference", "triton"):
        with hf_sparsek.settings(backend=backend):
            out = model.generate(ids, attention_mask=mask, **{**GEN, "max_new_tokens": 8}, **kwargs)
        results[backend] = (out.sequences, torch.stack(out.logits, 1))
    assert len(calls) == 2 * 7  # every decode step of both layers ran the split-KV kernel without an index
    assert torch.equal(results["triton"][0], results["reference"][0])
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 logits: a rounding step apart
    torch.testing.assert_close(results["triton"][1], results["reference"][1], rtol=tol, atol=tol)


def _compiled_decode(q, k, v, pattern, q_offset: int, mask) -> tuple[torch.Tensor, list[str]]:
    """``sparse_attention`` under ``torch.compile(fullgraph=True)`` (Triton kernels) with the query offset as a
    tensor, as a static cache passes it: (output, the traced graphs as text). A fresh compile per call."""
    torch._dynamo.reset()  # the cases share fn's code object
    backend, graphs = _recording_backend()

    def fn(q, k, v, position, mask):
        return sparse_attention(q, k, v, pattern, q_offset=position, attention_mask=mask, backend="triton")

    with torch.no_grad():
        return torch.compile(fn, fullgraph=True, backend=backend)(q, k, v, torch.tensor(q_offset), mask), graphs


def _recording_backend():
    """A torch.compile backend that runs the traced graph as it is and keeps its text: (backend, the texts)."""
    graphs: list[str] = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    return backend, graphs


COMPILED_CASES = [
    # pattern, q_len, kv_len, q_offset, padded
    (SparsePattern(block_size=64, sink_tokens=5, window=100), 1, 400, 300, False),
    (SparsePattern(block_size=64, sink_tokens=5, window=100), 3, 400, 190, True),  # run crosses a tile edge
    (SparsePattern(block_size=64), 1, 300, 250, True),  # dense
    (SparsePattern(block_size=64, sink_tokens=5, window=70, min_sparse_len=256), 2, 400, 100, False),  # dense rows
    (SparsePattern(block_size=64, sink_tokens=5, window=70, min_sparse_len=256), 1, 400, 350, False),
]


@pytest.mark.parametrize("case", COMPILED_CASES, ids=lambda c: f"q{c[1]}-at{c[3]}-{c[0].describe()}"[:60]
                         + ("-pad" if c[4] else ""))
def test_compiled_decode_reads_its_offset_on_the_device(case, kernels):
    """Under torch.compile a decode step with a tensor query offset (a static cache) becomes the graph-safe op
    ``hf_sparsek::decode_attend``, which reads the offset in the kernel; it equals the eager call. The keys past the
    queries (a static cache's unwritten slots) are masked by causality."""
    pattern, q_len, kv_len, q_offset, padded = case
    q, k, v = torch.randn(2, 4, q_len, 64), torch.randn(2, 2, kv_len, 64), torch.randn(2, 2, kv_len, 64)
    mask = _left_padding(2, kv_len) if padded else None
    compiled, graphs = _compiled_decode(q, k, v, pattern, q_offset, mask)
    with torch.no_grad():
        eager = sparse_attention(q, k, v, pattern, q_offset=q_offset, attention_mask=mask, backend="reference")
    assert any("decode_attend" in g for g in graphs) and not any("sparse_attention" in g for g in graphs)
    assert _rel(compiled, eager) < 2e-5


COMPILED_TOPK_CASES = [
    # pattern, kv_len, q_offset, padded, hq, hkv
    (SparsePattern(block_size=64, sink_tokens=5, window=100, topk_blocks=3), 900, 700, False, 4, 2),
    (SparsePattern(block_size=64, sink_tokens=5, window=100, topk_blocks=3), 900, 531, True, 4, 2),
    (SparsePattern(block_size=64, sink_tokens=70, topk_blocks=4), 800, 690, True, 4, 1),  # no window, MQA
    (SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=6, mass_threshold=0.6), 900, 640, True, 4,
     2),
    (SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=3, min_sparse_len=512), 900, 450, False, 4,
     2),  # a dense row
    (SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=3, min_sparse_len=512), 900, 700, True, 4, 2),
    (SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=2, per_query_head=True), 900, 650, True, 4,
     2),
    (SparsePattern(block_size=128, sink_tokens=4, window=100, topk_blocks=20), 700, 600, False, 2, 2),  # budget>tiles
    (SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=2, dense_heads=(1,)), 900, 610, True, 6, 3),
    (SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=2, dense_heads=(0, 3)), 900, 610, False, 8,
     4),
    (SparsePattern(block_size=64, sink_tokens=4, window=64, dense_heads=(1,)), 900, 610, True, 4, 2),  # no top-k
    (SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=3, selector="probe"), 900, 530, True, 4, 2),
    (SparsePattern(block_size=64, sink_tokens=64, window=128, topk_blocks=4, selector="probe", probe_stride=8,
                   per_query_head=True, dense_tail=64, min_sparse_len=576), 1000, 700, True, 4, 1),  # Gemma-like
    (SparsePattern(block_size=128, sink_tokens=4, window=100, topk_blocks=2, selector="probe", mass_threshold=0.5),
     900, 777, False, 4, 2),
]


@pytest.mark.parametrize("case", COMPILED_TOPK_CASES, ids=lambda c: f"at{c[2]}-Hq{c[4]}-Hk{c[5]}-{c[0].describe()}"
                         [:70] + ("-pad" if c[3] else ""))
def test_compiled_topk_decode_selects_on_the_device(case, kernels):
    """Under torch.compile a "mass" or "probe" top-k decode step with a tensor position (a static cache) takes the
    graph-safe ops too (``hf_sparsek::decode_select``, ``decode_attend``): the selection reads the position on the
    device and masks the cache's unwritten slots (here random keys, not zeros: a reused cache) instead of slicing
    them off. It chooses the tiles the eager call chooses on the sliced keys and equals the reference (GQA / MQA,
    padding, no window, a mass threshold, rows dense under min_sparse_len, per query head, a budget above the tile
    count, dense heads: runs of consecutive dense or sparse KV heads as calls on views; Gemma 3's default's shape:
    probe per query head, one KV head, a dense tail, rows dense below min_sparse_len)."""

    from hf_sparsek.selection import select_tiles, select_tiles_at_device_offset

    pattern, kv_len, q_offset, padded, hq, hkv = case
    q, k, v = torch.randn(2, hq, 1, 64), torch.randn(2, hkv, kv_len, 64), torch.randn(2, hkv, kv_len, 64)
    mask = _left_padding(2, kv_len) if padded else None
    compiled, graphs = _compiled_decode(q, k, v, pattern, q_offset, mask)
    with torch.no_grad():
        ref = sparse_attention(q.double(), k.double(), v.double(), pattern, q_offset=q_offset, attention_mask=mask,
                               backend="reference")
    assert not any("sparse_attention" in g for g in graphs)
    assert any("decode_attend" in g for g in graphs)
    assert any("decode_select" in g for g in graphs) == (pattern.topk_blocks is not None)
    assert _rel(compiled, ref) < 2e-5
    if pattern.topk_blocks is None:
        return
    # the tiles themselves: the eager selection (its PyTorch definition here) on the keys sliced at the row
    plain = pattern.replace(per_query_head=False, min_sparse_len=0, dense_tail=0)
    k_seg = None
    if padded:
        from hf_sparsek.ops import sequence_layout

        k_seg = sequence_layout(2, 1, kv_len, mask, None, q.device)[0]
    with torch.no_grad():
        on_device = select_tiles_at_device_offset(q, k, plain, torch.tensor([q_offset]), 0, k_seg)
        eager = select_tiles(q, k, plain, q_offset, 0, k_seg)
    assert on_device.shape == eager.shape
    assert torch.equal(on_device.sort(-1).values, eager.sort(-1).values)
    assert (eager >= 0).any()  # the case selects something


@pytest.mark.parametrize("case", [
    (SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=2, dense_heads=(1,)), True, 6, 3),
    (SparsePattern(block_size=64, sink_tokens=5, window=100, topk_blocks=3, mass_threshold=0.7), False, 4, 1),
], ids=["dense-head-pad", "mqa-threshold"])
def test_compiled_mass_decode_steps_keep_features_in_a_decode_store(case, kernels):
    """Compiled "mass" decode steps given a DecodeStore (as the face passes the layer's) run the graph-safe op
    ``hf_sparsek::decode_select_kept``: step after step (one compiled function, the position a tensor) the outputs
    equal the fp64 reference (whose eager selection picks some tile at every step, so a wrong choice shows), every
    sparse KV head keeps its tiles after the first step (dense heads: never touched), and rewriting a kept tile's
    keys (another prompt in the cache) starts that row again from its first tile."""
    from hf_sparsek.selection import select_tiles
    from hf_sparsek.selection.decode_store import DecodeStore

    pattern, padded, hq, hkv = case
    kv_len = 900
    k, v = torch.randn(2, hkv, kv_len, 64), torch.randn(2, hkv, kv_len, 64)
    mask = _left_padding(2, kv_len) if padded else None
    store = DecodeStore(2, hkv, kv_len, 64, 64, 0, k.dtype, k.device)
    sparse = torch.tensor([h not in pattern.dense_heads for h in range(hkv)])
    torch._dynamo.reset()
    backend, graphs = _recording_backend()
    tiles = []

    def fn(q, k, v, position, mask, store):
        return sparse_attention(q, k, v, pattern, q_offset=position, attention_mask=mask, backend="triton",
                                selection_state=store)

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    k_seg = None if mask is None else sequence_layout(2, 1, kv_len, mask, None, k.device)[0]
    plain = pattern.replace(dense_heads=())
    for step, position in enumerate([600, 601, 639, 640, 700]):
        if step == 4:
            k[1, :, 63] += 1.0  # row 1's first tile rewritten, its last key (the fingerprint) with it
        q = torch.randn(2, hq, 1, 64)
        with torch.no_grad():
            out = compiled(q, k, v, torch.tensor(position), mask, store)
            ref = sparse_attention(q.double(), k.double(), v.double(), pattern, q_offset=position,
                                   attention_mask=mask, backend="reference")
            tiles.append(select_tiles(q, k, plain, position, 0, k_seg))
        assert _rel(out, ref) < 2e-5, f"row at {position}"
        want = torch.full((2, hkv), step > 0) & sparse
        if step == 4:
            want[1] = False
        assert torch.equal(store.reused, want), f"row at {position}"
        assert torch.equal(store.stored[:, sparse], torch.full_like(store.stored[:, sparse], (position + 1) // 64))
    assert len(graphs) == 1 and "decode_select_kept" in graphs[0]
    assert all((t >= 0).any() for t in tiles)  # every step selects something


@pytest.mark.parametrize("selector", ["mass", "probe"])
def test_compiled_static_topk_generate_selects_inside_the_graph(selector, kernels, monkeypatch):
    """generate() under transformers' compile of static-cache decoding (Dynamo's eager backend, asked for on the CPU)
    with a "mass" or "probe" top-k pattern and left padding: every decode step of every layer selects with its
    position on the device (the graph-safe op; nothing read on the host), and the tokens and logits equal the
    uncompiled run's (which selects on the host; "mass" with the selection store)."""
    from test_generate import _compiled_static_generate, _generate, _prompt
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_sparsek
    import hf_sparsek.ops as ops

    torch.manual_seed(0)  # head dim 64: the kernels' smallest
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=97, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    hf_sparsek.set_pattern(model, SparsePattern(block_size=64, sink_tokens=3, window=48, topk_blocks=1,
                                                selector=selector))
    ids, mask = _prompt(length=200)
    calls = []
    real = ops.select_tiles_at_device_offset
    monkeypatch.setattr(ops, "select_tiles_at_device_offset", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with hf_sparsek.settings(backend="triton"):
        eager_seq, eager_logits = _generate(model, ids, mask, cache_implementation="static", disable_compile=True)
        assert not calls
        seq, logits, _ = _compiled_static_generate(model, ids, mask)
    assert len(calls) == 2 * 11  # both layers, every decode step after the prefill's token
    assert torch.equal(seq, eager_seq)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    # "mass": the second layer's steps kept their key tile features (the first layer keeps none: see
    # hf_sparsek.selection.store.fingerprints_identify_history); the last step pooled only from the kept count
    from hf_sparsek.selection.decode_store import STORE_ATTRIBUTE

    stores = [getattr(layer.self_attn, STORE_ATTRIBUTE, None) for layer in model.model.layers]
    assert stores[0] is None
    assert (stores[1] is not None and bool(stores[1].reused.all())) == (selector == "mass")


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_compiled_mass_generate_with_decode_stores_equals_uncompiled(model_type, kernels):
    """The layers' DecodeStores through what users do with compiled static-cache generate(): a second prompt of
    another batch size after a first (Llama: each prefill zeroes or remakes the stores; the graphs guard on them),
    and a model whose sliding layers roll their keys (Mistral, window 105: a prompt of 100 tokens, 12 new; its
    layers keep no store). Tokens and logits equal the uncompiled runs', prompt by prompt."""
    from test_generate import _compiled_static_generate, _generate, _prompt
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    import hf_sparsek
    from hf_sparsek.selection.decode_store import STORE_ATTRIBUTE

    torch.manual_seed(0)
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=97, max_position_embeddings=512)
    if model_type == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
        prompts = [_prompt(batch=2, length=200), _prompt(batch=1, length=170, left_pad=0)]
    else:
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=105)).eval()
        prompts = [_prompt(batch=2, length=100)]
    hf_sparsek.set_pattern(model, SparsePattern(block_size=64, sink_tokens=3, window=48, topk_blocks=1))
    with hf_sparsek.settings(backend="triton"):
        for ids, mask in prompts:
            eager_seq, eager_logits = _generate(model, ids, mask, cache_implementation="static",
                                                disable_compile=True)
            seq, logits, _ = _compiled_static_generate(model, ids, mask)
            assert torch.equal(seq, eager_seq)
            torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
            store = getattr(model.model.layers[1].self_attn, STORE_ATTRIBUTE, None)
            if model_type == "llama":  # the second layer's steps kept their tiles, in a store of this batch
                assert store.key_shape[0] == ids.shape[0] and bool(store.reused.all())
            else:  # sliding layers pass their written keys only (no unwritten slots to tell a static cache): none
                assert store is None


def _many_sms(monkeypatch, sms: int = 132) -> None:
    """Pretend the device has ``sms`` SMs (the interpreter's count is 1), so the split-KV rule for runs of 17-64
    rows (``dispatch.use_split_kv``) sees a GPU's room."""
    from hf_sparsek.kernels import dispatch

    monkeypatch.setattr(dispatch, "sm_count", lambda device: sms)


def test_split_kv_rule_for_runs_longer_than_16_rows(monkeypatch):
    """Runs of at most 16 rows always take the split-KV kernel; 17-64 rows only where the prefill kernel's programs
    (batch x KV heads x query tiles) times ``split_kv_sms_per_program`` fit in the SMs; never past 64 rows, the
    option's limit, or with gradients / the log-sum-exp."""
    from dataclasses import replace

    from hf_sparsek.kernels import dispatch
    from hf_sparsek.kernels.options import KernelOptions

    _many_sms(monkeypatch, 132)
    opts, cpu = KernelOptions(), torch.device("cpu")
    assert dispatch.use_split_kv(16, False, opts, 10_000, cpu)
    assert dispatch.use_split_kv(64, False, opts, 33, cpu) and not dispatch.use_split_kv(64, False, opts, 34, cpu)
    assert not dispatch.use_split_kv(65, False, opts, 1, cpu)
    assert not dispatch.use_split_kv(40, True, opts, 1, cpu) and not dispatch.use_split_kv(1, True, opts, 1, cpu)
    assert not dispatch.use_split_kv(40, False, opts, 1, None)  # no device: no count of its SMs
    assert not dispatch.use_split_kv(33, False, replace(opts, split_kv_max_rows=32), 1, cpu)
    assert dispatch.use_split_kv(32, False, replace(opts, split_kv_max_rows=32), 1, cpu)
    assert not dispatch.use_split_kv(4, False, replace(opts, split_kv_decode=False), 1, cpu)
    for bad in (8, 65, 2.0):
        with pytest.raises(ValueError, match="split_kv_max_rows"):
            KernelOptions(split_kv_max_rows=bad)
    assert [dispatch.query_tiles(n, 64, off) for n, off in ((40, 10), (40, 30), (64, 0), (64, 1))] == [1, 2, 1, 2]
    assert dispatch.query_tiles(64, 32, torch.tensor([5])) == 3 == dispatch.query_tiles(64, 32, None)


LONG_RUNS = [
    # batch, hq, hkv, q_len, kv_len, q_offset, dim, pattern, padded
    (2, 4, 2, 40, 500, 430, 64, SparsePattern(block_size=64, sink_tokens=5, window=130), True),  # crosses a tile
    (1, 4, 1, 64, 333, 269, 128, SparsePattern(block_size=64), False),  # dense, two tiles
    (2, 8, 2, 23, 300, 277, 64, SparsePattern(block_size=64, sink_tokens=8, window=64, topk_blocks=2,
                                              selector="meanpool"), True),
    (1, 2, 2, 64, 400, 300, 256, SparsePattern(block_size=128, sink_tokens=3, window=90), False),
    (2, 4, 1, 48, 420, 372, 64, SparsePattern(block_size=64, sink_tokens=8, window=64, topk_blocks=2), True),  # mass
]


@pytest.mark.parametrize("case", LONG_RUNS, ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hk{c[2]}-q{c[3]}-at{c[5]}-D{c[6]}-"
                         f"{c[7].describe()}"[:70] + ("-pad" if c[8] else ""))
def test_runs_of_up_to_64_rows_through_the_split_kv_kernel(case, kernels, monkeypatch):
    """Runs of 17-64 rows where the prefill kernel would have few programs: the op sends them to the split-KV kernel
    without an index, a prebuilt index's lists run it too, and both equal the reference (static, dense and top-k
    patterns, padding, GQA / MQA, runs crossing one or two tile edges)."""
    batch, hq, hkv, q_len, kv_len, q_offset, dim, pattern, padded = case
    _many_sms(monkeypatch)
    q, k, v = torch.randn(batch, hq, q_len, dim), torch.randn(batch, hkv, kv_len, dim), torch.randn(batch, hkv,
                                                                                                    kv_len, dim)
    mask = _left_padding(batch, kv_len) if padded else None
    import hf_sparsek.kernels.decode as decode_kernels

    import hf_sparsek.triton_ops as triton_ops

    runs = []
    real = decode_kernels.decode_forward
    monkeypatch.setattr(decode_kernels, "decode_forward", lambda q, *a, **kw: runs.append(q.shape[2]) or real(q, *a,
                                                                                                              **kw))
    kw = dict(q_offset=q_offset, attention_mask=mask)
    with torch.no_grad():
        out = sparse_attention(q, k, v, pattern, backend="triton", **kw)
        index = build_index_for(q, k, pattern, **kw)
        from_index = triton_ops.triton_block_sparse_attention(q, k, v, index, dim**-0.5)
        ref = sparse_attention(q.double(), k.double(), v.double(), pattern, backend="reference", **kw)
    assert runs == [q_len, q_len]
    assert _rel(out, ref) < 2e-5 and _rel(from_index, ref) < 2e-5


def test_a_long_run_stays_on_the_prefill_kernel_where_it_has_programs(kernels, monkeypatch):
    """The same 40-row run on a device with few SMs (batch x KV heads x tiles too many for it): the prefill kernel
    runs it, with the same result."""
    import hf_sparsek.kernels.decode as decode_kernels

    q, k, v = torch.randn(2, 4, 40, 64), torch.randn(2, 2, 300, 64), torch.randn(2, 2, 300, 64)
    pattern = SparsePattern(block_size=64, sink_tokens=4, window=100)
    runs = []
    real = decode_kernels.decode_forward
    monkeypatch.setattr(decode_kernels, "decode_forward", lambda q, *a, **kw: runs.append(q.shape[2]) or real(q, *a,
                                                                                                              **kw))
    outs = []
    for sms in (15, 16):  # 2 x 2 x 1 tile = 4 programs: x 4 fits in 16 SMs, not in 15
        _many_sms(monkeypatch, sms)
        with torch.no_grad():
            outs.append(sparse_attention(q, k, v, pattern, backend="triton"))
    assert runs == [40]
    assert _rel(outs[0], outs[1]) < 2e-5


def test_a_long_run_with_its_offset_on_the_device(kernels):
    """The graph-safe decode op with a tensor query offset takes runs of up to 64 rows: it counts the most query
    tiles such a run can span, so a run anywhere (one tile, two) equals the reference."""
    from hf_sparsek.ops import _pattern_text, sparse_decode_op

    pattern = SparsePattern(block_size=64, sink_tokens=5, window=70)
    q, k, v = torch.randn(2, 4, 64, 64), torch.randn(2, 2, 420, 64), torch.randn(2, 2, 420, 64)
    mask = _left_padding(2, 420)
    for q_offset in (128, 111, 356):
        with torch.no_grad():
            out = sparse_decode_op(q, k, v, mask, torch.tensor([q_offset]), 0, _pattern_text(pattern), 0.125, 0.0)
            ref = sparse_attention(q.double(), k.double(), v.double(), pattern, q_offset=q_offset,
                                   attention_mask=mask, backend="reference")
        assert _rel(out, ref) < 2e-5, q_offset


@pytest.mark.parametrize("q_len, offset", [(2, torch.tensor([5])), (1, torch.tensor([5, 6])), (1, torch.tensor([5.0]))],
                         ids=["two-rows", "two-offsets", "float-offset"])
def test_selection_kernels_refuse_a_device_position_they_cannot_read(q_len, offset, kernels):
    """A position kept on the device fits one query row given as a one-element integer tensor; both top-k kernels
    ("mass" and "probe") say so, naming what they got, rather than reading a wrong row."""
    from hf_sparsek.kernels.probe import select_by_probe
    from hf_sparsek.kernels.selection import select_by_mass_at_device_offset

    q, k = torch.randn(1, 2, q_len, 64), torch.randn(1, 1, 256, 64)
    seg, count, sink = torch.zeros(1, 256, dtype=torch.int32), torch.full((1,), 4, dtype=torch.int32), None
    common = dict(block=64, q_offset=offset, kv_offset=0, sink=4, topk=2, window=64, threshold=None, scale=0.125)
    with pytest.raises(ValueError, match=rf"one query row and a one-element integer offset, got q_len={q_len} "
                                         rf"and an offset of shape \({offset.numel()},\)"):
        select_by_mass_at_device_offset(q, k, seg, count, sink, **common)
    with pytest.raises(ValueError, match="a device-side q_offset takes one query row"):
        select_by_probe(q, k, seg, count, sink, stride=16, **common)
