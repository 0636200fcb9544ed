"""``per_query_head``: each query head chooses its own key tiles. A GQA model with it computes what its multi-head
twin (K / V projections repeated per query head) computes with the grouped selection; the op's gradients are the
twin's summed over each group; dense KV heads map to their query heads; bad combinations are refused."""

from __future__ import annotations

import pytest
import torch

import hf_sparsek
from hf_sparsek.ops import per_query_head_kv, sparse_attention
from hf_sparsek.patterns import SparsePattern

HEADS, KV_HEADS = 6, 2  # the op-level tests' shapes
GROUP = HEADS // KV_HEADS


def _models(model_type: str = "llama") -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random GQA / MQA model of test_models' configs and its multi-head twin (K / V weights repeated per query
    head; everything else shared)."""
    from test_models import make_config
    from transformers import AutoModelForCausalLM

    config = make_config(model_type)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    torch.manual_seed(0)
    gqa = AutoModelForCausalLM.from_config(config).eval()
    twin_config = make_config(model_type)
    twin_config.num_key_value_heads = heads
    mha = AutoModelForCausalLM.from_config(twin_config).eval()
    state = gqa.state_dict()
    for name, weight in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (kv_heads * dim, hidden) -> (heads * dim, hidden)
            rows = weight.view(kv_heads, head_dim, -1).repeat_interleave(heads // kv_heads, dim=0)
            state[name] = rows.reshape(heads * head_dim, -1)
    mha.load_state_dict(state)
    return gqa, mha


def _logits(model: torch.nn.Module, ids: torch.Tensor, pattern: dict, mask: torch.Tensor | None = None
            ) -> torch.Tensor:
    hf_sparsek.set_pattern(model, pattern)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize(("model_type", "selector"), [
    ("llama", "oracle"), ("llama", "mass"), ("llama", "probe"), ("llama", "meanpool"), ("llama", "moment"),
    ("gemma3_text", "probe"), ("qwen3", "mass")])
def test_model_equals_its_repeated_kv_twin(model_type: str, selector: str) -> None:
    """Prefill with left padding; Gemma 3: MQA, its sliding layers keep their window (nothing to repeat there)."""
    gqa, mha = _models(model_type)
    ids = torch.randint(0, 97, (2, 389), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding in the second row
    pattern = {"block_size": 64, "sink_tokens": 16, "window": 64, "topk_blocks": 1, "selector": selector}
    grouped = _logits(gqa, ids, pattern, mask)
    per_head = _logits(gqa, ids, {**pattern, "per_query_head": True}, mask)
    twin = _logits(mha, ids, pattern, mask)
    torch.testing.assert_close(per_head, twin, atol=2e-5, rtol=1e-4)
    assert (per_head - grouped).abs().max() > 1e-3  # the choice differs from the grouped one on this input
    # the twin is multi-head already: the flag changes nothing there
    torch.testing.assert_close(_logits(mha, ids, {**pattern, "per_query_head": True}, mask), twin)


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_equals_the_twins(cache: str | None) -> None:
    """Decode steps (the selection store, the split-KV path's layout) choose per query head as the twin does."""
    gqa, mha = _models()
    pattern = {"block_size": 64, "sink_tokens": 16, "window": 64, "topk_blocks": 1}
    ids = torch.randint(0, 97, (2, 200), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :21] = 0
    args = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                attention_mask=mask, cache_implementation=cache)
    hf_sparsek.set_pattern(gqa, {**pattern, "per_query_head": True})
    hf_sparsek.set_pattern(mha, pattern)
    with torch.no_grad():
        ours, twin = gqa.generate(ids, **args), mha.generate(ids, **args)
    assert torch.equal(ours.sequences, twin.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(twin.logits), atol=2e-5, rtol=1e-4)


def _qkv(seed: int, q_len: int = 200, kv_len: int = 200) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HEADS, q_len, 32, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, KV_HEADS, kv_len, 32, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, KV_HEADS, kv_len, 32, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def test_gradients_are_the_twins_summed_per_group() -> None:
    q, k, v = _qkv(5)
    pattern = SparsePattern(block_size=64, sink_tokens=8, window=40, topk_blocks=1, selector="oracle",
                            per_query_head=True)
    out = sparse_attention(q, k, v, pattern, backend="reference")
    k2 = k.detach().repeat_interleave(GROUP, 1).requires_grad_()
    v2 = v.detach().repeat_interleave(GROUP, 1).requires_grad_()
    q2 = q.detach().clone().requires_grad_()
    twin = sparse_attention(q2, k2, v2, pattern.replace(per_query_head=False), backend="reference")
    torch.testing.assert_close(out, twin)
    grad = torch.randn_like(out)
    out.backward(grad)
    twin.backward(grad)
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(k.grad, k2.grad.view(2, KV_HEADS, GROUP, 200, 32).sum(2))
    torch.testing.assert_close(v.grad, v2.grad.view(2, KV_HEADS, GROUP, 200, 32).sum(2))


def test_dense_kv_head_becomes_its_query_heads() -> None:
    q, k, v = (t.detach() for t in _qkv(6))
    pattern = SparsePattern(block_size=64, sink_tokens=8, window=40, topk_blocks=1, dense_heads=(1,),
                            per_query_head=True)
    k2, v2, expanded = per_query_head_kv(q, k, v, pattern)
    assert expanded.dense_heads == (3, 4, 5) and k2.shape[1] == HEADS
    out = sparse_attention(q, k, v, pattern, backend="reference")
    dense = sparse_attention(q, k, v, SparsePattern(block_size=64), backend="reference")
    torch.testing.assert_close(out[:, GROUP:], dense[:, GROUP:])  # KV head 1's query heads attend densely
    assert (out[:, :GROUP] - dense[:, :GROUP]).abs().max() > 1e-3


def test_refusals() -> None:
    for fields, match in (({"per_query_head": True}, "only with topk_blocks"),
                          ({"topk_blocks": 2, "selector": "learned", "per_query_head": True}, "selector 'learned'"),
                          ({"topk_blocks": 2, "per_query_head": 1}, "true or false")):
        with pytest.raises(ValueError, match=match):
            SparsePattern.from_dict({"block_size": 64, "window": 64, **fields})
    q, k, v = (t.detach() for t in _qkv(7))
    pattern = SparsePattern(block_size=64, window=64, topk_blocks=1, per_query_head=True)
    tiles = torch.zeros(2, KV_HEADS, 4, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="selected_tiles and a prebuilt index are per KV head"):
        sparse_attention(q, k, v, pattern, selected_tiles=tiles, backend="reference")
    with pytest.raises(ValueError, match=r"dense_heads \[2\] out of range"):
        sparse_attention(q, k, v, pattern.replace(dense_heads=(2,)), backend="reference")


def test_round_trip_and_description() -> None:
    pattern = SparsePattern(block_size=64, window=64, topk_blocks=3, selector="probe", probe_stride=4,
                            per_query_head=True)
    assert SparsePattern.from_dict(pattern.to_dict()) == pattern
    assert "per_query_head" not in pattern.replace(per_query_head=False).to_dict()  # files without it unchanged
    assert pattern.describe().endswith("(one row in 4) per query head, block 64")
    assert not pattern.replace(topk_blocks=None).per_query_head  # the static part drops it with the budget
    from hf_sparsek.ops import _pattern_of_text, _pattern_text

    assert _pattern_of_text(_pattern_text(pattern)) == pattern


def test_training_gradients_are_the_twins_summed_per_group() -> None:
    """A training step through the face: parameter gradients equal the twin's, K / V projections summed per group."""
    gqa, mha = _models("llama")
    heads, kv_heads = gqa.config.num_attention_heads, gqa.config.num_key_value_heads
    pattern = {"block_size": 64, "sink_tokens": 16, "window": 64, "topk_blocks": 1, "selector": "oracle"}
    hf_sparsek.set_pattern(gqa, {**pattern, "per_query_head": True})
    hf_sparsek.set_pattern(mha, pattern)
    ids = torch.randint(0, 97, (2, 300), generator=torch.Generator().manual_seed(8))
    for model in (gqa, mha):
        model.train()
        model(ids, labels=ids).loss.backward()
    twin = dict(mha.named_parameters())
    for name, param in gqa.named_parameters():
        expected = twin[name].grad
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            expected = expected.view(kv_heads, heads // kv_heads, -1, expected.shape[-1]).sum(1).flatten(0, 1)
        torch.testing.assert_close(param.grad, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_selection_recall_measures_per_query_head() -> None:
    """The recall tool runs a per_query_head pattern per query head, as the op does: its rows (one value per query
    head, the oracle at each head's own budget) equal the grouped rows of the multi-head twin."""
    from eval.modeling import PatternSpec
    from eval.selection_recall import selection_recall
    from hf_sparsek.patterns import as_model_sparsity

    gqa, mha = _models("llama")
    ids = torch.randint(0, 97, (1, 450), generator=torch.Generator().manual_seed(9))
    pattern = {"block_size": 64, "sink_tokens": 16, "window": 64, "topk_blocks": 2, "selector": "mass"}
    ours = selection_recall(gqa, ids, [PatternSpec("p", as_model_sparsity({**pattern, "per_query_head": True}))])
    twin = selection_recall(mha, ids, [PatternSpec("p", as_model_sparsity(pattern))])
    grouped = selection_recall(gqa, ids, [PatternSpec("p", as_model_sparsity(pattern))])
    assert len(ours) == len(twin) == 2
    for a, b, c in zip(ours, twin, grouped, strict=True):
        assert len(a["coverage"]) == gqa.config.num_attention_heads
        assert len(c["coverage"]) == gqa.config.num_key_value_heads
        for key in ("coverage", "oracle_coverage", "density", "oracle_density"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["mean_tiles"] == b["mean_tiles"]


@pytest.mark.parametrize("dim,broadcast", [(256, True), (64, False)])
def test_one_kv_head_is_a_broadcast_view_on_the_kernels(dim: int, broadcast: bool, monkeypatch) -> None:
    """MQA under ``per_query_head``: at head dims the TMA / Gluon kernels do not take, K / V reach the kernels as a
    view broadcast over the query heads (stride 0, no copy); at 64 / 128 they are repeated (the TMA loads need real
    strides). Either way the Triton path (interpreter: forward with the probe selector, padding, and the backward)
    equals the multi-head twin on the reference, and the gradients are the twin's summed over the group."""
    from conftest import triton_interpreter

    from hf_sparsek import triton_ops

    seen = []
    real = triton_ops.triton_block_sparse_attention
    monkeypatch.setattr(triton_ops, "triton_block_sparse_attention",
                        lambda q, k, *a, **kw: seen.append(k.stride(1)) or real(q, k, *a, **kw))
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 150, dim, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 1, 150, dim, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[1, :23] = False
    pattern = SparsePattern(block_size=64, sink_tokens=8, window=40, topk_blocks=1, selector="probe",
                            probe_stride=8, per_query_head=True)
    with triton_interpreter("attention_fwd", "attention_bwd", "block_index", "probe", "decode"):
        out = sparse_attention(q, k, v, pattern, attention_mask=mask, backend="triton")
        grad = torch.randn_like(out)
        out.backward(grad)
    assert seen and all((s == 0) == broadcast for s in seen)
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    k2, v2 = (t.repeat_interleave(4, 1).requires_grad_() for t in (k2, v2))
    q2.requires_grad_()
    twin = sparse_attention(q2, k2, v2, pattern.replace(per_query_head=False), attention_mask=mask,
                            backend="reference")
    twin.backward(grad)
    torch.testing.assert_close(out, twin, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(q.grad, q2.grad, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(k.grad, k2.grad.sum(1, keepdim=True), atol=5e-4, rtol=5e-4)
    torch.testing.assert_close(v.grad, v2.grad.sum(1, keepdim=True), atol=5e-4, rtol=5e-4)
