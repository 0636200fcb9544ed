"""Tiny random-weight models of each supported model_type through attn_implementation="sparsek"."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import hf_sparsek
from hf_sparsek import ModelSparsity, SparsePattern, exact_token_mask

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, attention_dropout=0.0)


def make_config(model_type: str):
    if model_type == "llama":
        return LlamaConfig(**COMMON)
    if model_type == "mistral":
        return MistralConfig(**COMMON, sliding_window=40)
    if model_type == "qwen2":
        return Qwen2Config(**COMMON)
    if model_type == "qwen3":
        return Qwen3Config(**COMMON, head_dim=16)
    if model_type == "phi3":
        return Phi3Config(**{**COMMON, "num_key_value_heads": 4}, pad_token_id=0)
    if model_type == "gemma3_text":
        cfg = {**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 1}
        return Gemma3TextConfig(**cfg, head_dim=32, sliding_window=40, query_pre_attn_scalar=32,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    raise ValueError(model_type)


MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"]
KEEP_ALL = SparsePattern(block_size=64)
SPARSE = SparsePattern(block_size=64, sink_tokens=3, window=48)


def build(model_type: str, impl: str = "sdpa"):
    torch.manual_seed(1234)
    config = make_config(model_type)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32).eval()
    return model


def sparse_copy(model, pattern):
    hf_sparsek.set_pattern(model, pattern)
    return model


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_keep_all_pattern_matches_sdpa_logits(model_type):
    model = build(model_type)
    ids = torch.randint(1, 97, (2, 150))
    with torch.no_grad():
        dense = model(ids).logits
        sparse_copy(model, KEEP_ALL)
        with hf_sparsek.settings(dense_via_sdpa=False, backend="reference"):
            sparse = model(ids).logits
    assert model.config._attn_implementation == "sparsek"
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "mistral"])
@pytest.mark.parametrize("left_pad", [False, True], ids=["no-pad", "left-pad"])
def test_greedy_generate_matches_sdpa(model_type, left_pad):
    model = build(model_type)
    ids = torch.randint(1, 97, (2, 70))
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :13] = 0
        ids[0, :13] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    dense = model.generate(ids, **kwargs)
    sparse_copy(model, KEEP_ALL)
    with hf_sparsek.settings(dense_via_sdpa=False):
        sparse = model.generate(ids, **kwargs)
    assert torch.equal(dense, sparse)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_sparse_model_matches_masked_softmax_model(model_type):
    """A sparse pattern equals sdpa given the pattern's exact token mask (forward and gradients)."""
    model = build(model_type)
    ids = torch.randint(1, 97, (1, 200))
    mask4d = exact_token_mask(SPARSE, 200)[:, :1]  # (1, 1, L, L), True = attend
    dense_logits = model(ids, attention_mask=mask4d).logits
    dense_grads = torch.autograd.grad(dense_logits.square().mean(), list(model.parameters()))
    sparse_copy(model, SPARSE)
    sparse_logits = model(ids).logits
    sparse_grads = torch.autograd.grad(sparse_logits.square().mean(), list(model.parameters()))
    torch.testing.assert_close(sparse_logits, dense_logits, rtol=1e-5, atol=1e-5)
    for g_s, g_d in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(g_s, g_d, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text"])
def test_sliding_layers_keep_model_window_under_any_pattern(model_type):
    """Sliding layers ignore a wider pattern: logits equal sdpa, whose sliding layers use the model's window."""
    model = build(model_type)
    ids = torch.randint(1, 97, (1, 180))  # longer than the window of 40
    with torch.no_grad():
        dense = model(ids).logits
        wide = ModelSparsity(default=SparsePattern(block_size=64, sink_tokens=64, window=1000))
        sparse_copy(model, wide)
        sparse = model(ids).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    text = hf_sparsek.describe(model, seq_len=512)
    assert "sliding (model)" in text and "window 40" in text


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_cached_decode_and_chunked_prefill_match_full_forward(model_type):
    model = build(model_type)
    sparse_copy(model, SPARSE)
    ids = torch.randint(1, 97, (1, 160))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :100], use_cache=True)
        chunk = model(ids[:, 100:150], past_key_values=out.past_key_values, use_cache=True)
        torch.testing.assert_close(chunk.logits, full[:, 100:150], rtol=1e-4, atol=1e-4)
        cache = chunk.past_key_values
        for t in range(150, 160):
            step = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            torch.testing.assert_close(step.logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


def test_pattern_survives_save_and_load(tmp_path):
    model = build("llama")
    sparsity = ModelSparsity(default=SPARSE, dense_layers=(1,), layer_overrides={0: {"window": 32}}, source="t")
    sparse_copy(model, sparsity)
    ids = torch.randint(1, 97, (1, 130))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparsek").eval()
    assert hf_sparsek.model_sparsity(loaded.config) == sparsity
    with torch.no_grad():
        after = loaded(ids).logits
    torch.testing.assert_close(after, before)


def test_default_pattern_is_the_model_types_file():
    model = build("qwen2", impl="sparsek")
    assert hf_sparsek.model_sparsity(model.config) == hf_sparsek.default_sparsity("qwen2")
    assert model.config.sparsek == hf_sparsek.default_sparsity("qwen2").to_dict()


def test_features_we_cannot_honor_raise():
    model = build("llama", impl="sparsek")
    model.train()
    model.model.layers[0].self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model(torch.randint(1, 97, (1, 20)))
    model.eval()
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    k = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="s_aux"):
        hf_sparsek.integration.sparsek_attention_forward(attn, q, k, k, None, s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="4D"):
        hf_sparsek.integration.sparsek_attention_forward(attn, q, k, k, torch.ones(1, 1, 5, 5, dtype=torch.bool))


def test_one_line_load_with_pattern(tmp_path):
    build("llama").save_pretrained(tmp_path)
    model = hf_sparsek.from_pretrained(str(tmp_path), pattern="sink128-window1024")
    assert model.config._attn_implementation == "sparsek"
    assert hf_sparsek.model_sparsity(model.config).default == hf_sparsek.PRESETS["sink128-window1024"]
    with pytest.raises(ValueError, match="attn_implementation"):
        hf_sparsek.from_pretrained(str(tmp_path), attn_implementation="eager")
