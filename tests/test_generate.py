"""generate() through attn_implementation="sparsek" with every cache generate() offers that runs on this CPU.

Dynamic cache: the reference. Static cache: the same tokens and logits (generate() prepares the masks ahead and hands
our mask object back to the model). Quantized cache (fp8 backend, transformers >= 5.25, no extra package): equal to
sdpa on the same cache. Offloaded caches need CUDA (see docs/transformers.md).
"""

from __future__ import annotations

import pytest
import torch
from test_models import KEEP_ALL, SPARSE, build

import hf_sparsek

GEN = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def _prompt(batch: int = 2, length: int = 56, left_pad: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 97, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, :left_pad] = 0
    ids[0, :left_pad] = 0
    return ids, mask


def _generate(model, ids, mask, **kwargs):
    out = model.generate(ids, attention_mask=mask, **GEN, **kwargs)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma3_text"])
def test_static_cache_equals_dynamic_cache(model_type):
    """Sparse pattern, left padding, 68 tokens in all: past mistral's and gemma3's window of 40 (rolling buffers)."""
    model = build(model_type)
    hf_sparsek.set_pattern(model, SPARSE)
    ids, mask = _prompt()
    seq_dynamic, logits_dynamic = _generate(model, ids, mask)
    seq_static, logits_static = _generate(model, ids, mask, cache_implementation="static")
    assert torch.equal(seq_static, seq_dynamic)
    torch.testing.assert_close(logits_static, logits_dynamic, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_static_cache_keep_all_equals_sdpa(model_type):
    """The whole static-cache path (buffers longer than the tokens, query offsets as tensors) equals sdpa's."""
    model = build(model_type)
    ids, mask = _prompt()
    seq_sdpa, logits_sdpa = _generate(model, ids, mask, cache_implementation="static")
    hf_sparsek.set_pattern(model, KEEP_ALL)
    with hf_sparsek.settings(dense_via_sdpa=False):
        seq_sparse, logits_sparse = _generate(model, ids, mask, cache_implementation="static")
    assert torch.equal(seq_sparse, seq_sdpa)
    torch.testing.assert_close(logits_sparse, logits_sdpa, rtol=1e-4, atol=1e-4)


def test_quantized_cache_equals_sdpa():
    """QuantizedCache (full-attention models only, transformers' own limit) with the fp8 backend, no extra package."""
    model = build("llama")
    ids, mask = _prompt()
    fp8 = dict(cache_implementation="quantized", cache_config={"backend": "fp8"})
    try:
        seq_sdpa, logits_sdpa = _generate(model, ids, mask, **fp8)
    except ValueError as exc:  # transformers < 5.25 has only the quanto / hqq backends (extra packages)
        pytest.skip(f"this transformers has no fp8 quantized cache: {exc}")
    hf_sparsek.set_pattern(model, KEEP_ALL)
    with hf_sparsek.settings(dense_via_sdpa=False):
        seq_sparse, logits_sparse = _generate(model, ids, mask, **fp8)
    assert torch.equal(seq_sparse, seq_sdpa)
    torch.testing.assert_close(logits_sparse, logits_sdpa, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("selector", ["meanpool", "mass", "probe", "refine", "oracle"])
def test_static_cache_selects_as_the_dynamic_cache(selector):
    """A static cache hands the op keys past the call's last query (unwritten zero slots); selection must not see
    them: the op's output equals the one on the written keys alone, and generate() with
    ``cache_implementation="static"`` gives the dynamic cache's logits (top-k selectors, a partial last tile)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_sparsek import SparsePattern

    torch.manual_seed(0)
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=64, topk_blocks=1, selector=selector)
    q = torch.randn(1, 4, 200, 16) + 1
    k = torch.randn(1, 2, 200, 16) + 1
    v = torch.randn(1, 2, 200, 16)
    kz = torch.cat([k, torch.zeros(1, 2, 20, 16)], 2)
    vz = torch.cat([v, torch.zeros(1, 2, 20, 16)], 2)
    torch.testing.assert_close(hf_sparsek.sparse_attention(q, kz, vz, pattern, q_offset=0),
                               hf_sparsek.sparse_attention(q, k, v, pattern, q_offset=0), rtol=0, atol=0)
    config = AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=128, num_hidden_layers=2, vocab_size=128)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sparsek").eval()
    hf_sparsek.set_pattern(model, pattern)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(200))
    args = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                attention_mask=torch.ones_like(ids))
    dynamic = model.generate(ids, **args)
    static = model.generate(ids, cache_implementation="static", **args)
    assert torch.equal(dynamic.sequences, static.sequences)
    for a, b in zip(dynamic.logits, static.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_dense_tail_static_cache_equals_dynamic_cache(model_type):
    """A pattern with ``dense_tail`` (the prefill's last rows dense, split inside the op) under left padding: the
    static cache (keys past the queries, tensor offsets) gives the dynamic cache's tokens and logits, and the prefill's
    first token differs from the same pattern without the tail."""
    model = build(model_type)
    hf_sparsek.set_pattern(model, SPARSE.replace(dense_tail=16))
    ids, mask = _prompt()
    seq_dynamic, logits_dynamic = _generate(model, ids, mask)
    seq_static, logits_static = _generate(model, ids, mask, cache_implementation="static")
    assert torch.equal(seq_static, seq_dynamic)
    torch.testing.assert_close(logits_static, logits_dynamic, rtol=1e-4, atol=1e-4)
    hf_sparsek.set_pattern(model, SPARSE)
    _, logits_plain = _generate(model, ids, mask)
    assert (logits_plain[:, 0] - logits_dynamic[:, 0]).abs().max() > 1e-4


COMPILE_PATTERNS = {
    "window": SPARSE,
    "topk": hf_sparsek.SparsePattern(block_size=64, sink_tokens=3, window=48, topk_blocks=1, selector="mass"),
    # rows below 128 dense: the decode steps' offsets cross it; Gemma 3's shipped default has such a bound
    "min_sparse_len": hf_sparsek.SparsePattern(block_size=64, sink_tokens=3, window=48, topk_blocks=1,
                                               selector="probe", per_query_head=True, dense_tail=16,
                                               min_sparse_len=128),
}


def _compiled_static_generate(model, ids, mask):
    """generate() with transformers' automatic compile of static-cache decoding, asked for on the CPU (Dynamo's
    eager backend): (tokens, logits, graphs Dynamo traced)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # transformers' switch for compiling generate() off CUDA
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    seq, logits = _generate(model, ids, mask, cache_implementation="static", compile_config=config)
    return seq, logits, counters["stats"]["unique_graphs"] - before


@pytest.mark.parametrize("model_type,pattern", [("llama", "window"), ("llama", "topk"),
                                                ("gemma3_text", "min_sparse_len"), ("qwen3", "topk")])
def test_compiled_static_decoding_traces_as_sdpa_and_equals_eager(model_type, pattern):
    """Under transformers' compile of static-cache decoding the forward is traced as often as with sdpa (once for
    Llama; Gemma 3's sliding layers add one), not once per step, and gives the uncompiled run's tokens and logits.
    Two causes of per-step traces, both fixed: the mask generate() prepares carried the 2D mask as it grew (three
    graphs on transformers 5.17), and an offset check read a symbolic offset as a plain int (one graph per decode
    step with ``min_sparse_len``). Qwen 3 (a dict of masks, which generate() prepares outside the compiled
    forward) traced twice before 2026-12-07's fix: the prepared mask's int offset guarded on its value; traced calls
    now read its tensor copy. Left padding; a prompt that is not a whole number of tiles."""
    ids, mask = _prompt(length=150)
    dense = build(model_type)
    *_, sdpa_graphs = _compiled_static_generate(dense, ids, mask)
    model = build(model_type)
    hf_sparsek.set_pattern(model, COMPILE_PATTERNS[pattern])
    eager_seq, eager_logits = _generate(model, ids, mask, cache_implementation="static", disable_compile=True)
    seq, logits, graphs = _compiled_static_generate(model, ids, mask)
    assert graphs == sdpa_graphs
    assert torch.equal(seq, eager_seq)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_speculative_generate_equals_greedy_with_a_static_pattern(model_type, mode):
    """Prompt-lookup and assisted decoding verify several candidate tokens in one cached call and crop the cache
    where a candidate is rejected; with a static pattern the tokens equal plain greedy decoding's. (A top-k pattern
    chooses per query tile from the rows a call holds, so a verification call may choose otherwise: patterns.md.)
    The assistant is a copy of the model, so its candidates are accepted and the calls hold several rows."""
    import copy

    model = build(model_type)
    hf_sparsek.set_pattern(model, SPARSE)
    assistant = copy.deepcopy(model)
    ids = torch.randint(1, 97, (1, 110), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([ids, ids[:, 20:60]], 1)  # a repeat, for prompt lookup to find candidates in
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    args = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0, output_logits=True,
                return_dict_in_generate=True)
    extra = {"prompt_lookup_num_tokens": 4} if mode == "prompt_lookup" else {"assistant_model": assistant}
    with hf_sparsek.settings(dense_via_sdpa=False):
        greedy = model.generate(ids, **args)
        rows.clear()
        speculative = model.generate(ids, **args, **extra)
    assert max(rows[1:]) > 1, rows  # candidates were verified in calls of several rows
    assert torch.equal(speculative.sequences, greedy.sequences)
    torch.testing.assert_close(torch.stack(speculative.logits, 1), torch.stack(greedy.logits, 1), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_generate_from_inputs_embeds_equals_sdpa(model_type):
    """generate(inputs_embeds=...), as multimodal wrappers call a language model (the prompt arrives as embeddings,
    later steps as tokens); left padding; a dense pattern gives sdpa's tokens and logits."""
    model = build(model_type)
    ids, mask = _prompt()
    embeds = model.get_input_embeddings()(ids).detach()
    args = dict(inputs_embeds=embeds, attention_mask=mask, **GEN)
    sdpa = model.generate(**args)
    hf_sparsek.set_pattern(model, KEEP_ALL)
    with hf_sparsek.settings(dense_via_sdpa=False):
        ours = model.generate(**args)
    assert torch.equal(ours.sequences, sdpa.sequences)
    torch.testing.assert_close(torch.stack(ours.logits, 1), torch.stack(sdpa.logits, 1), rtol=1e-4, atol=1e-4)
