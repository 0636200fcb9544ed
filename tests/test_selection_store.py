"""The mass / moment selectors' kept key tile features (hf_sparsek.selection.store): incremental = from scratch
across tile edges (padding, GQA, odd head dim, keys past 0, static-cache buffers), same tiles with and without the
store, a changed prefix (new prompt, reordered batch, edited keys, crop) recomputed, PyTorch and Triton
(interpreter) paths, the attention call and generate() through the face."""

from __future__ import annotations

import pytest
import torch
from conftest import triton_interpreter
from test_selection import _check_same_selection
from test_selection_moment import _slow_moment_selection

import hf_sparsek
from hf_sparsek import SparsePattern
from hf_sparsek.ops import sparse_attention
from hf_sparsek.selection import SelectionState, select_mass, select_moment
from hf_sparsek.selection import store as store_module
from hf_sparsek.selection.mass import pool_tiles
from hf_sparsek.selection.moment import key_moments
from hf_sparsek.selection.store import feature_width

BACKENDS = ["torch", "triton"]


@pytest.fixture
def backend(request):
    """The refresh path under test; "triton" runs the kernels in Triton's CPU interpreter."""
    name = request.param
    if name == "torch":
        yield name
        return
    with triton_interpreter("selection", "selection_store"):
        yield name


def _scratch(k: torch.Tensor, k_seg: torch.Tensor | None, kv_offset: int, block: int) -> torch.Tensor:
    """Features of every key tile pooled from all keys, in the store's layout (the definition's pool_tiles)."""
    _, kmax, kmin = pool_tiles(k, kv_offset, block, None if k_seg is None else k_seg >= 0)
    dim, d_pad = k.shape[-1], feature_width(k.shape[-1])
    out = torch.zeros(*kmax.shape[:3], 2 * d_pad)
    out[..., :dim], out[..., d_pad: d_pad + dim] = kmax, kmin
    return out


def _causal_tiles(q_end: int, kv_offset: int, kv_len: int, block: int) -> int:
    n_k = (kv_offset % block + kv_len + block - 1) // block
    return min(n_k, (q_end - 1) // block - kv_offset // block + 1)


def _padded_seg(batch: int, length: int, pad: int) -> torch.Tensor:
    """(batch, length) int32 segments, row 0 left-padded by ``pad`` keys (-1)."""
    seg = torch.zeros(batch, length, dtype=torch.int32)
    seg[0, :pad] = -1
    return seg


# prefill length, then decode steps (query rows per call), crossing several 16-key tile edges
STEPS = [37, 1, 1, 3, 1, 5, 1, 1, 4, 2, 1, 16, 1, 1]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("kv_offset", [0, 21])
def test_incremental_features_equal_scratch(backend, kv_offset):
    """Batch 2, row 0 left-padded, head dim 40 (padded to 64): after the prefill and every decode step the features
    equal those pooled from all keys, and every step after the prefill reused the kept tiles."""
    block, total = 16, sum(STEPS)
    k_all = torch.randn(2, 2, total, 40)
    seg_all = _padded_seg(2, total, 9)
    state, length = SelectionState(), 0
    for i, q_len in enumerate(STEPS):
        length += q_len
        k, seg = k_all[:, :, :length], seg_all[:, :length]
        q_offset = kv_offset + length - q_len
        before = state.tiles
        got = state.key_features(k, seg, q_offset, q_len, kv_offset, block, backend == "triton")
        hi = _causal_tiles(q_offset + q_len, kv_offset, length, block)
        assert got.shape[2] == hi
        assert torch.equal(got, _scratch(k, seg, kv_offset, block)), f"step {i}"
        assert bool(state.reused.all()) == (before > 0)
    assert state.fresh_starts == 0 and state.tiles == (kv_offset % block + total) // block


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_incremental_moments_equal_scratch(backend):
    """Selector "moment"'s layout ([mean, variance] per tile): after the prefill and every decode step equal to
    key_moments over all keys (padding left out), reusing the kept tiles; switching kinds starts afresh."""
    block, total, kv_offset = 16, sum(STEPS), 5
    k_all = torch.randn(2, 2, total, 40)
    seg_all = _padded_seg(2, total, 9)
    state, length = SelectionState(), 0
    for q_len in STEPS:
        length += q_len
        k, seg = k_all[:, :, :length], seg_all[:, :length]
        q_offset = kv_offset + length - q_len
        before = state.tiles
        got = state.key_features(k, seg, q_offset, q_len, kv_offset, block, backend == "triton", moments=True)
        mean, var = key_moments(k, kv_offset, block, seg >= 0)
        hi = got.shape[2]
        assert hi == _causal_tiles(q_offset + q_len, kv_offset, length, block)
        torch.testing.assert_close(got[..., :40], mean[:, :, :hi], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[..., 64:104], var[:, :, :hi], rtol=1e-5, atol=1e-5)
        assert bool(state.reused.all()) == (before > 0)
    state.key_features(k, seg, q_offset, q_len, kv_offset, block, backend == "triton")  # the mass layout now
    assert state.fresh_starts == 1


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_moment_tiles_with_store_follow_the_definition(backend):
    """Selector "moment" with the store over a prefill and decode steps (GQA 6/2, padded batch 2): the tiles of its
    definition (the same as without the store, near-ties aside)."""
    pattern = SparsePattern(block_size=64, sink_tokens=4, window=70, topk_blocks=2, selector="moment")
    total = sum(PATTERN_STEPS)
    q_all, k_all = torch.randn(2, 6, total, 32), torch.randn(2, 2, total, 32)
    seg_all = _padded_seg(2, total, 11)
    state, length = SelectionState(), 0
    for q_len in PATTERN_STEPS:
        length += q_len
        q = q_all[:, :, length - q_len: length]
        k, seg = k_all[:, :, :length], seg_all[:, :length]
        want = select_moment(q, k, pattern, length - q_len, 0, seg, backend=backend)
        got = select_moment(q, k, pattern, length - q_len, 0, seg, backend=backend, selection_state=state)
        if not torch.equal(got, want):
            _check_same_selection(got, _slow_moment_selection(q, k, pattern, length - q_len, 0, seg), tol=1e-5)
    assert state.tiles == 3 and bool(state.reused.all())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_features_grow_past_capacity(backend):
    """The kept features outgrow their first allocation (2 tiles + headroom) and are copied on: still equal."""
    block, k = 16, torch.randn(1, 2, 420, 16)
    state = SelectionState()
    state.key_features(k[:, :, :20], None, 0, 20, 0, block, backend == "triton")
    first = state.features.shape[2]
    for end in range(33, 421, 13):
        got = state.key_features(k[:, :, :end], None, end - 13, 13, 0, block, backend == "triton")
        assert torch.equal(got, _scratch(k[:, :, :end], None, 0, block)) and bool(state.reused.all())
    assert state.features.shape[2] > first and state.tiles == end // block


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_static_cache_buffer(backend):
    """A static cache: the keys are a fixed buffer, its unwritten slots real but causally hidden. Tiles up to the
    last causal one equal the scratch features (the one being filled includes the unwritten slots, as from scratch);
    later tiles are never read."""
    block, size = 16, 96
    k = torch.randn(1, 2, size, 24)
    state = SelectionState()
    for q_offset, q_len in [(0, 30), (30, 1), (31, 1), (32, 1), (33, 4), (37, 11), (48, 1)]:
        got = state.key_features(k, None, q_offset, q_len, 0, block, backend == "triton")
        hi = _causal_tiles(q_offset + q_len, 0, size, block)
        assert torch.equal(got[:, :, :hi], _scratch(k, None, 0, block)[:, :, :hi])
    assert state.tiles == 3 and bool(state.reused.all())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_changed_prefix_is_recomputed(backend):
    """A new prompt of the same length, edited kept keys, a reordered batch and a cropped cache all give the
    scratch features; keys edited inside the kept prefix with the fingerprint key unchanged are the documented
    limit (the kept tiles are reused: shows the store really reads them)."""
    block, use_triton = 16, backend == "triton"
    k = torch.randn(2, 2, 50, 32)
    seg = _padded_seg(2, 50, 5)
    state = SelectionState()
    state.key_features(k[:, :, :49], seg[:, :49], 0, 49, 0, block, use_triton)
    state.key_features(k, seg, 49, 1, 0, block, use_triton)
    assert bool(state.reused.all())

    # a new prompt of the same length (prefill): starts from scratch
    k2 = torch.randn(2, 2, 50, 32)
    got = state.key_features(k2, seg, 0, 50, 0, block, use_triton)
    assert torch.equal(got, _scratch(k2, seg, 0, block)) and state.fresh_starts == 1

    # a decode step whose kept keys changed (the cache now holds another sequence): detected per (row, head)
    k3 = torch.cat([torch.randn(2, 2, 50, 32), torch.randn(2, 2, 1, 32)], 2)
    seg3 = _padded_seg(2, 51, 5)
    got = state.key_features(k3, seg3, 50, 1, 0, block, use_triton)
    assert not state.reused.any()
    assert torch.equal(got, _scratch(k3, seg3, 0, block))

    # a reordered batch (beam search): rows swapped, the padding with them
    k4 = torch.cat([k3.flip(0), torch.randn(2, 2, 1, 32)], 2)
    seg4 = torch.cat([seg3.flip(0), torch.zeros(2, 1, dtype=torch.int32)], 1)
    got = state.key_features(k4, seg4, 51, 1, 0, block, use_triton)
    assert not state.reused.any()
    assert torch.equal(got, _scratch(k4, seg4, 0, block))

    # a cropped cache: fewer complete tiles than kept
    fresh = state.fresh_starts
    got = state.key_features(k4[:, :, :40], seg4[:, :40], 39, 1, 0, block, use_triton)
    assert state.fresh_starts == fresh + 1 and torch.equal(got, _scratch(k4[:, :, :40], seg4[:, :40], 0, block))

    # the limit: keys inside the kept prefix edited, the fingerprint key (position 31) kept
    k5 = k4[:, :, :41].clone()
    k5[:, :, 3] += 1.0
    got = state.key_features(k5, seg4[:, :41], 40, 1, 0, block, use_triton)
    assert bool(state.reused.all())
    assert not torch.equal(got, _scratch(k5, seg4[:, :41], 0, block))
    state.reset()
    got = state.key_features(k5, seg4[:, :41], 40, 1, 0, block, use_triton)
    assert torch.equal(got, _scratch(k5, seg4[:, :41], 0, block))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_another_sequence_sharing_one_tile_end_key_is_recomputed(backend):
    """A first layer's key depends on its token and position only, so two sequences can share the key at one kept
    tile's last position and differ elsewhere: every kept tile's last key is compared, so a decode step on another
    sequence of the same length (another conversation through the same layer) is recomputed."""
    block, use_triton = 16, backend == "triton"
    k = torch.randn(2, 2, 50, 32)
    state = SelectionState()
    state.key_features(k[:, :, :49], None, 0, 49, 0, block, use_triton)  # 3 kept tiles: last keys at 15, 31, 47
    other = torch.randn(2, 2, 50, 32)
    other[:, :, 47] = k[:, :, 47]  # the last kept tile's last key shared (a single-key check would reuse)
    other[:, :, 31] = k[:, :, 31]
    got = state.key_features(other, None, 49, 1, 0, block, use_triton)
    assert not state.reused.any()
    assert torch.equal(got, _scratch(other, None, 0, block))
    # one row shares every tile end: that row (and head) continues, the other recomputes
    mixed = k.clone()
    mixed[1] = torch.randn(2, 50, 32)
    state = SelectionState()
    state.key_features(k[:, :, :49], None, 0, 49, 0, block, use_triton)
    got = state.key_features(mixed, None, 49, 1, 0, block, use_triton)
    if use_triton:  # decided per (row, head) on the device
        assert state.reused[0].all() and not state.reused[1].any()
    assert torch.equal(got, _scratch(mixed, None, 0, block))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_crop_then_refill_is_recomputed(backend):
    """A cache cropped into a kept tile and refilled to the same length or longer (regenerate an answer): the call's
    queries start inside a kept tile, so it recomputes, even when every tile's last key is unchanged."""
    block, use_triton = 16, backend == "triton"
    k = torch.randn(1, 2, 50, 32)
    state = SelectionState()
    state.key_features(k, None, 0, 50, 0, block, use_triton)  # tiles 0..2 kept
    refilled = k.clone()
    refilled[:, :, 40:] = torch.randn(1, 2, 10, 32)
    refilled[:, :, 47] = k[:, :, 47]  # the tile ends unchanged
    fresh = state.fresh_starts
    got = state.key_features(refilled, None, 40, 10, 0, block, use_triton)
    assert state.fresh_starts == fresh + 1
    assert torch.equal(got, _scratch(refilled, None, 0, block))


PATTERNS = {
    "sink-win-top2": SparsePattern(block_size=64, sink_tokens=4, window=70, topk_blocks=2),
    "win-top3-mass0.7": SparsePattern(block_size=64, window=64, topk_blocks=3, mass_threshold=0.7),
}
# a prefill of 100, then decode runs of 1 to 16 rows across the 128- and 192-key tile edges
PATTERN_STEPS = [100, 1, 3, 16, 9, 16, 2, 15, 16, 16, 1]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_tiles_with_store_equal_without(backend, name):
    """GQA 6/2 heads, padded batch 2: the tiles chosen with the store equal those chosen from all keys, each step
    (the same features give the same scores, so the same tiles exactly)."""
    pattern = PATTERNS[name]
    total = sum(PATTERN_STEPS)
    q_all = torch.randn(2, 6, total, 32)
    k_all = torch.randn(2, 2, total, 32)
    seg_all = _padded_seg(2, total, 11)
    state, length, chosen = SelectionState(), 0, 0
    for q_len in PATTERN_STEPS:
        length += q_len
        q = q_all[:, :, length - q_len: length]
        k, seg = k_all[:, :, :length], seg_all[:, :length]
        want = select_mass(q, k, pattern, length - q_len, 0, seg, backend=backend)
        got = select_mass(q, k, pattern, length - q_len, 0, seg, backend=backend, selection_state=state)
        assert torch.equal(got, want)
        chosen += int((got >= 0).sum())
    assert chosen > 0 and state.tiles == 3 and bool(state.reused.all())


def test_decode_call_with_store_equals_without():
    """sparse_attention(selection_state=...) over a prefill and decode steps: the same outputs as without."""
    pattern = SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=1)
    total = 200
    q_all, k_all, v_all = (torch.randn(2, 4, total, 16), torch.randn(2, 2, total, 16), torch.randn(2, 2, total, 16))
    mask = torch.ones(2, total, dtype=torch.bool)
    mask[1, :6] = False
    state = SelectionState()
    for end in [120] + list(range(121, total + 1, 7)):
        q_len = 120 if end == 120 else 1
        args = (q_all[:, :, end - q_len: end], k_all[:, :, :end], v_all[:, :, :end], pattern)
        want = sparse_attention(*args, attention_mask=mask[:, :end])
        got = sparse_attention(*args, attention_mask=mask[:, :end], selection_state=state)
        assert torch.equal(got, want)
    assert bool(state.reused.all()) and state.tiles == 197 // 64


def test_bad_inputs_raise():
    state = SelectionState()
    with pytest.raises(ValueError, match="k_seg"):
        state.key_features(torch.randn(1, 2, 20, 8), torch.zeros(1, 19, dtype=torch.int32), 0, 20, 0, 16, False)
    with pytest.raises(ValueError, match="q_len"):
        state.key_features(torch.randn(1, 2, 20, 8), None, 0, 0, 0, 16, False)


def _build_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         attention_dropout=0.0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


@torch.inference_mode()
def test_two_conversations_through_one_model_match_each_alone():
    """Two caches served by one model (the states are per layer, not per cache): conversation B shares A's tokens
    only at positions 191-199, so layer 0's key at the last kept tile's end (191) is the same. A's next step after
    B's prefill (and after B's own decode step) equals A's step run alone, and a crop-and-regenerate of A equals the
    same cache with the states reset."""
    import inspect

    from transformers import DynamicCache

    model = _build_llama()
    hf_sparsek.set_pattern(model, SparsePattern(block_size=64, window=64, topk_blocks=1))
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.25 renamed

    def run(ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        return model(ids, **{name: cache}).logits[0, -1]

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(1, 97, (1, 200), generator=gen)
    b = torch.cat([torch.randint(1, 97, (1, 191), generator=gen), a[:, 191:]], 1)
    nxt = torch.tensor([[5]])

    def reset() -> None:
        for state in store_module._STATES.values():
            state.reset()

    def step_on_a(interleave: str) -> torch.Tensor:
        reset()
        ca = DynamicCache(config=model.config)
        run(a, ca)
        if interleave:
            cb = DynamicCache(config=model.config)
            run(b, cb)
            if interleave == "prefill+step":
                run(nxt, cb)
        return run(nxt, ca)

    alone = step_on_a("")
    for interleave in ("prefill", "prefill+step"):
        torch.testing.assert_close(step_on_a(interleave), alone, rtol=0, atol=0)

    def regenerate(reset_before: bool) -> torch.Tensor:
        reset()
        cache = DynamicCache(config=model.config)
        run(a, cache)
        cache.crop(-50)
        if reset_before:
            reset()
        new = torch.randint(1, 97, (1, 50), generator=torch.Generator().manual_seed(1))
        new[0, 191 - 150] = a[0, 191]  # the kept tile's last token repeated
        run(new, cache)
        return run(nxt, cache)

    torch.testing.assert_close(regenerate(False), regenerate(True), rtol=0, atol=0)


@pytest.mark.parametrize("cache,selector", [("dynamic", "mass"), ("static", "mass"), ("dynamic", "moment"),
                                            ("static", "moment")])
def test_generate_with_store_equals_recomputing(monkeypatch, cache, selector):
    """generate() of 24 tokens (DynamicCache, or StaticCache whose unwritten slots sit in the keys; left padding,
    top-1 "mass" / "moment" tiles of 64 keys) through the face keeps one state per layer past the first and gives
    the same tokens and logits as recomputing the features from all keys each step."""
    model = _build_llama()
    pattern = SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=1, selector=selector)
    hf_sparsek.set_pattern(model, pattern)
    ids = torch.randint(1, 97, (2, 120))  # tile 1 fills at step 8, then competes with tile 0
    mask = torch.ones_like(ids)
    mask[0, :7], ids[0, :7] = 0, 0
    gen = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, output_logits=True,
               return_dict_in_generate=True)
    if cache == "static":
        gen["cache_implementation"] = "static"
    out = model.generate(ids, **gen)
    layers = [layer.self_attn for layer in model.model.layers]
    assert store_module._STATES.get(layers[0]) is None  # a first layer keeps nothing (fingerprints_identify_history)
    states = [store_module._STATES.get(m) for m in layers[1:]]
    assert all(s is not None and s.tiles == (120 + 23) // 64 and bool(s.reused.all()) for s in states)
    assert len({id(s) for s in states}) == len(layers) - 1

    monkeypatch.setattr(store_module, "selection_state_for", lambda module, pattern: None)
    ref = model.generate(ids, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=0)
    assert out.sequences.shape[1] == 144


@pytest.mark.parametrize("selector", ["mass", "moment"])
def test_beam_search_with_store_equals_recomputing(monkeypatch, selector):
    """A 3-beam search reorders the cache's rows between steps; beams that differ inside a tile but agree on its
    last token share that tile's last key in the first layer (a key there depends on its token and position only).
    The face keeps no state there (``fingerprints_identify_history``), so the search gives the tokens and logits of
    recomputing every layer's features from all keys each step. With a first-layer state, the "moment" case here
    reused a stale tile (logits 0.06 apart at the last step)."""
    model = _build_llama()
    hf_sparsek.set_pattern(model, SparsePattern(block_size=64, sink_tokens=4, window=64, topk_blocks=1,
                                                selector=selector))
    torch.manual_seed(0)
    ids = torch.randint(1, 97, (2, 300))
    ids[:, 250:290] = ids[:, 20:60]  # a repeat the search can follow
    mask = torch.ones_like(ids)
    mask[0, :9], ids[0, :9] = 0, 0
    gen = dict(attention_mask=mask, max_new_tokens=40, num_beams=3, do_sample=False, pad_token_id=0,
               output_logits=True, return_dict_in_generate=True)
    out = model.generate(ids, **gen)
    assert store_module._STATES.get(model.model.layers[1].self_attn) is not None
    monkeypatch.setattr(store_module, "selection_state_for", lambda module, pattern: None)
    ref = model.generate(ids, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=0, atol=0)


def test_only_layers_past_the_first_keep_a_state():
    """The rule in one place: layer 0, a missing or non-int ``layer_idx`` keep nothing; layers 1+ keep one each."""
    from hf_sparsek.selection.store import fingerprints_identify_history, selection_state_for

    assert [fingerprints_identify_history(i) for i in (0, 1, 7, None, True, "1", -1)] == [
        False, True, True, False, False, False, False]
    pattern = SparsePattern(block_size=64, window=64, topk_blocks=1, selector="mass")
    first, second, bare = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
    first.layer_idx, second.layer_idx = 0, 1
    assert selection_state_for(first, pattern) is None and selection_state_for(bare, pattern) is None
    state = selection_state_for(second, pattern)
    assert isinstance(state, SelectionState) and selection_state_for(second, pattern) is state


def _device_refresh(store, k, k_seg, position: int, kv_offset: int, block: int) -> None:
    """One compiled-decode-style refresh of ``store`` (a DecodeStore) for a row at ``position`` of the static cache
    k, the unwritten slots marked as padding as the compiled step marks them: its features up to the row's tile."""
    from hf_sparsek.kernels.selection_store import refresh_key_features_at_device_offset

    seg = torch.where(torch.arange(kv_offset, kv_offset + k.shape[2]) <= position, k_seg, -1).to(torch.int32)
    refresh_key_features_at_device_offset(k, seg.contiguous(), *store.tensors(),
                                          q_offset=torch.tensor([position], dtype=torch.int32), kv_offset=kv_offset,
                                          block=block)
    hi = _causal_tiles(position + 1, kv_offset, k.shape[2], block)
    written = position + 1 - kv_offset
    expected = _scratch(k[:, :, :written], k_seg[:, :written], kv_offset, block)
    assert torch.equal(store.features[:, :, :hi], expected), f"row at {position}"


@pytest.mark.parametrize("kv_offset", [0, 21])
def test_device_position_refresh_equals_scratch(kv_offset):
    """The compiled decode steps' store (a DecodeStore refreshed with the row's position on the device, fixed
    grids): step after step of a static cache (random keys in the unwritten slots, row 0 left-padded) its features
    equal those pooled from the written keys, it pools from the kept count (reused) after the first step, and it
    starts again from tile 0 when a kept tile's keys change (a new prompt), when the row moves back into a kept tile
    (a cropped or refilled cache), and per (row, head)."""
    from hf_sparsek.selection.decode_store import DecodeStore

    block, capacity = 16, 150
    k = torch.randn(2, 3, capacity, 40)
    seg = _padded_seg(2, capacity, 9)
    store = DecodeStore(2, 3, capacity, 40, block, kv_offset, k.dtype, k.device)
    with triton_interpreter("selection", "selection_store"):
        for step, position in enumerate(range(kv_offset + 37, kv_offset + 120, 5)):  # tile edges crossed
            _device_refresh(store, k, seg, position, kv_offset, block)
            assert bool(store.reused.all()) == (step > 0), f"row at {position}"
            final = (position + 1) // block - kv_offset // block  # tiles with every key written
            assert torch.equal(store.stored, torch.full_like(store.stored, final))
        kept = store.stored.clone()
        k[1, 2, 5] += 1.0  # another history in row 1, head 2: a key inside the first tile ...
        k[1, 2, 15 - kv_offset % block] += 1.0  # ... and its last key (the fingerprint the check compares)
        _device_refresh(store, k, seg, kv_offset + 120, kv_offset, block)
        want = torch.ones_like(store.reused)
        want[1, 2] = False
        assert torch.equal(store.reused, want) and bool((store.stored >= kept).all())
        _device_refresh(store, k, seg, kv_offset + 60, kv_offset, block)  # cropped back into a kept tile
        assert not bool(store.reused.any())
        assert torch.equal(store.stored, torch.full_like(store.stored, (kv_offset + 61) // block - kv_offset // block))
        _device_refresh(store, k, seg, kv_offset + 61, kv_offset, block)
        assert bool(store.reused.all())


@pytest.mark.parametrize("walk", range(3))  # three walks: conftest seeds each test id differently
def test_decode_store_random_walks_select_as_pooling_every_key(walk):
    """Random decode walks over a static cache (GQA / MQA, head dims 64 / 128, keys past 0, left padding, a mass
    threshold; the cache's unwritten slots hold stale random keys): at every step the tiles chosen from a DecodeStore
    (``hf_sparsek::decode_select_kept``: check, refresh, select) equal those chosen by pooling every written key,
    through steps of one and of several keys, a crop back (the old keys left in the slots after it), a new
    conversation and one (row, head) rewritten."""
    import random

    from hf_sparsek.ops import _decode_select, _pattern_text, decode_select_kept_op, sequence_layout
    from hf_sparsek.selection import written_key_info
    from hf_sparsek.selection.decode_store import DecodeStore

    rng = random.Random(torch.initial_seed())  # the test's seed (conftest)
    block, hkv, group = 64, rng.choice([1, 2, 3]), rng.choice([1, 2, 4])  # many tiles for a budget of 1-2
    batch, dim, slots = rng.choice([1, 2, 3]), rng.choice([64, 128]), rng.randint(10 * block, 14 * block)
    kv_offset = rng.choice([0, rng.randint(1, 200)])
    pattern = SparsePattern(block_size=block, sink_tokens=rng.choice([0, 1, 5]), window=rng.choice([None, 32, 80]),
                            topk_blocks=rng.choice([1, 2]), mass_threshold=rng.choice([None, 0.6]))
    mask = torch.ones(batch, slots, dtype=torch.bool)
    for b in range(1, batch):
        mask[b, : rng.randint(1, 3 * block)] = False
    seg = sequence_layout(batch, 1, slots, mask, None, torch.device("cpu"))[0]
    k = torch.randn(batch, hkv, slots, dim)
    store = DecodeStore(batch, hkv, slots, dim, block, kv_offset, k.dtype, k.device)
    text, position, reused = _pattern_text(pattern), kv_offset + rng.randint(4 * block, 8 * block), 0
    written = position  # the keys before the first step are its prompt's
    events = ["step"] * 5 + ["crop", "new", "row"]
    rng.shuffle(events)
    with torch.no_grad(), triton_interpreter("selection", "selection_store"):
        for step, event in enumerate(["step", *events]):
            if event == "crop":  # back by up to two tiles, the old keys left in the slots after (a static cache's)
                position -= rng.randint(1, 2 * block)
                written = position
            elif event == "new":  # another conversation in every row
                k.copy_(torch.randn_like(k))
            elif event == "row":  # one (row, head)'s history rewritten
                b, h = rng.randrange(batch), rng.randrange(hkv)
                k[b, h, : position - kv_offset + 1] = torch.randn_like(k[b, h, : position - kv_offset + 1])
            if position >= kv_offset + slots:
                break
            new = slice(written - kv_offset, position - kv_offset + 1)  # the keys this step writes
            k[:, :, new] = torch.randn_like(k[:, :, new])
            written = position + 1
            q, at = torch.randn(batch, hkv * group, 1, dim), torch.tensor([position], dtype=torch.int32)
            info = written_key_info(seg, batch, slots, kv_offset, at, pattern)
            pooled = _decode_select(q, k, *info, at, kv_offset, text)
            kept = decode_select_kept_op(q, k, *info, at, kv_offset, text, *store.tensors(), 0)
            assert torch.equal(kept.sort(-1).values, pooled.sort(-1).values), f"step {step} ({event}) at {position}"
            reused += int(store.reused.sum())
            position += rng.choice([1, 1, 3, block + 7])  # one key, a few, or a chunk across tiles
    assert reused > 0  # some step read kept features
