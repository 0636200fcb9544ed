"""The transformers face through the paths a user takes: packing, Llama 4 chunks, layer types, attention names,
loading, pipelines and 2D masks. Tiny random models; forward / generate() compared with sdpa or with the exact rule."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from test_models import KEEP_ALL, SPARSE, build
from transformers import AutoModelForCausalLM, GPTBigCodeConfig, Llama4TextConfig, PersimmonConfig

import hf_sparsek
from hf_sparsek import integration


def _build_config(config, impl: str = "sdpa"):
    torch.manual_seed(1234)
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32).eval()


def build_any(model_type: str, impl: str = "sdpa"):
    """test_models' model types plus the ones whose attention gets no position_ids, and Llama 4 (chunked layers)."""
    if model_type == "gpt_bigcode":
        return _build_config(GPTBigCodeConfig(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                              attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0), impl)
    if model_type == "persimmon":
        return _build_config(PersimmonConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=1024), impl)
    if model_type == "llama4_text":
        return _build_config(LLAMA4(), impl)
    return build(model_type, impl)


def LLAMA4() -> Llama4TextConfig:  # noqa: N802 - a config factory named like the config
    """Chunks of 32 tokens on layers 0-2 (the NoPE interval makes layer 3 full attention)."""
    return Llama4TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, intermediate_size_mlp=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
        max_position_embeddings=1024, attention_chunk_size=32, attention_dropout=0.0, pad_token_id=0,
    )


# --- 2. packed sequences ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode", "persimmon"])
def test_packed_documents_equal_each_document_alone(model_type):
    """Position ids restarting per document, batch 1, no attention_mask, no cache: transformers detects the packing
    (it does so only without a cache) and sparsek attends within each document, also where the model's attention
    function never sees position_ids (gpt_bigcode, persimmon)."""
    model = build_any(model_type)
    hf_sparsek.set_pattern(model, SPARSE)
    docs = [torch.randint(1, 97, (1, n)) for n in (90, 70, 45)]
    packed = torch.cat(docs, 1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs]).unsqueeze(0)
    with torch.no_grad():
        together = model(packed, position_ids=position_ids, use_cache=False).logits
        start = 0
        for doc in docs:
            alone = model(doc, use_cache=False).logits
            torch.testing.assert_close(together[:, start : start + doc.shape[1]], alone, rtol=1e-5, atol=1e-5)
            start += doc.shape[1]


def test_packing_is_found_once_per_forward(monkeypatch):
    """The segments come from the mask function, once per forward and mask type (two probes: segment starts and
    causality), not from every layer."""
    calls = []
    probe = integration._probe

    def counted(*args, **kwargs):
        calls.append(args[1:])
        return probe(*args, **kwargs)

    monkeypatch.setattr(integration, "_probe", counted)
    model = build_any("llama")
    hf_sparsek.set_pattern(model, SPARSE)
    position_ids = torch.cat([torch.arange(60), torch.arange(50)]).unsqueeze(0)
    with torch.no_grad():
        model(torch.randint(1, 97, (1, 110)), position_ids=position_ids, use_cache=False)
    assert len(calls) == 2 and model.config.num_hidden_layers == 2


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padding-mask"])
def test_a_mask_showing_later_keys_is_refused(padded):
    """A non-causal config makes transformers hand over a bidirectional mask function: refused, not run causally."""
    model = build_any("llama", impl="sparsek")
    model.config.is_causal = False
    ids = torch.randint(1, 97, (1, 30))
    kwargs = {"attention_mask": torch.ones_like(ids)} if padded else {}
    with pytest.raises(ValueError, match="causal attention only"):
        model(ids, use_cache=False, **kwargs)


# --- 3. layer types: Llama 4 chunks, unknown types ------------------------------------------------------------


def _llama4_pair():
    """(sdpa model, sparsek model with dense full layers) sharing weights."""
    sdpa = build_any("llama4_text")
    sparse = build_any("llama4_text")
    hf_sparsek.set_pattern(sparse, KEEP_ALL)
    return sdpa, sparse


def test_llama4_chunked_layers_equal_sdpa_forward_and_cache():
    """Chunks of 32: prefill without cache, with left padding, a cached continuation crossing two chunk boundaries
    (the queries are cut per chunk), then decode steps; each equals sdpa (whose mask is the chunked rule)."""
    sdpa, sparse = _llama4_pair()
    ids = torch.randint(1, 97, (2, 110))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    real = mask.bool()
    with torch.no_grad(), hf_sparsek.settings(dense_via_sdpa=False):
        for model_kwargs in ({"use_cache": False}, {"attention_mask": mask}):
            dense = sdpa(ids, **model_kwargs).logits
            ours = sparse(ids, **model_kwargs).logits
            torch.testing.assert_close(ours[real], dense[real], rtol=1e-5, atol=1e-5)
        caches = [m(ids[:, :40], attention_mask=mask[:, :40]).past_key_values for m in (sdpa, sparse)]
        for t0, t1 in ((40, 100), (100, 101), (101, 102)):
            steps = [m(ids[:, t0:t1], attention_mask=mask[:, :t1], past_key_values=c)
                     for m, c in zip((sdpa, sparse), caches, strict=True)]
            torch.testing.assert_close(steps[1].logits, steps[0].logits, rtol=1e-5, atol=1e-5)
            caches = [s.past_key_values for s in steps]


def test_llama4_chunked_layers_generate_equal_sdpa():
    sdpa, sparse = _llama4_pair()
    ids = torch.randint(1, 97, (2, 60))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    caches = ["dynamic"]
    try:
        sdpa.generate(ids, cache_implementation="static", **{**kwargs, "max_new_tokens": 1})
        caches.append("static")
    except TypeError:  # transformers 5.17 cannot prepare Llama 4's chunked masks for a static cache (any attention)
        pass
    for cache in caches:
        with hf_sparsek.settings(dense_via_sdpa=False):
            ours = sparse.generate(ids, cache_implementation=cache, **kwargs)
        assert torch.equal(ours, sdpa.generate(ids, cache_implementation=cache, **kwargs)), cache


def test_llama4_packed_documents_equal_sdpa():
    """Packing and chunks together, as the installed transformers defines them (its mask function is probed)."""
    sdpa, sparse = _llama4_pair()
    ids = torch.randint(1, 97, (1, 100))
    position_ids = torch.cat([torch.arange(45), torch.arange(55)]).unsqueeze(0)
    with torch.no_grad(), hf_sparsek.settings(dense_via_sdpa=False):
        dense = sdpa(ids, position_ids=position_ids, use_cache=False).logits
        ours = sparse(ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("layer_type", "message"),
    [("compressed_sparse_attention", "does not support layer type"), ("sliding_attention", "no sliding_window")],
)
def test_layer_types_we_cannot_honour_are_refused(layer_type, message):
    """An unknown layer type, or a sliding layer whose window the model does not pass, raises instead of guessing."""
    model = build_any("llama", impl="sparsek")
    model.config.layer_types = ["full_attention", layer_type]
    with pytest.raises(ValueError, match=message):
        model(torch.randint(1, 97, (1, 20)), use_cache=False)  # no cache: transformers would build one per type


# --- 4. set_pattern errors -------------------------------------------------------------------------------------


def test_unknown_preset_name_lists_presets_and_forms():
    model = build_any("llama")
    with pytest.raises(ValueError) as info:
        hf_sparsek.set_pattern(model, "sink128-window9999")
    text = str(info.value)
    assert all(name in text for name in hf_sparsek.PRESETS)
    assert "JSON string" in text and "JSON file" in text and "dict" in text


def test_pattern_from_json_file_still_accepted(tmp_path):
    path = tmp_path / "pattern.json"
    path.write_text('{"sink_tokens": 4, "window": 64}')
    assert hf_sparsek.set_pattern(build_any("llama"), str(path)).default.window == 64


# --- 5. preset-qualified attention names (lm-eval, RULER) ------------------------------------------------------


PRESET = "sink128-window1024"


def test_preset_name_through_from_pretrained(tmp_path):
    """lm-eval's --model_args become from_pretrained keywords: attn_implementation="sparsek:<preset>" picks it."""
    build_any("llama").save_pretrained(tmp_path)
    named = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=f"sparsek:{PRESET}", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparsek", dtype="float32")
    hf_sparsek.set_pattern(plain, PRESET)
    ids = torch.randint(1, 97, (1, 1300))  # past sink + window: the preset matters
    with torch.no_grad(), hf_sparsek.settings(backend="reference"):
        logits = named(ids).logits
        torch.testing.assert_close(logits, plain(ids).logits)
        assert not torch.allclose(logits, AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, atol=1e-3)
    assert named.config._attn_implementation == f"sparsek:{PRESET}"
    assert hf_sparsek.model_sparsity(named.config).default == hf_sparsek.PRESETS[PRESET]


def test_preset_name_replaces_stored_pattern_and_set_pattern_wins_after(tmp_path, caplog):
    model = build_any("llama")
    hf_sparsek.set_pattern(model, SPARSE)
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        named = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=f"sparsek:{PRESET}")
        assert hf_sparsek.model_sparsity(named.config).default == hf_sparsek.PRESETS[PRESET]
    assert "replaces the pattern stored" in caplog.text
    hf_sparsek.set_pattern(named, SPARSE)  # an explicit choice afterwards: the name becomes plain "sparsek"
    assert named.config._attn_implementation == "sparsek"
    assert hf_sparsek.model_sparsity(named.config).default == SPARSE


def test_one_line_loader_takes_preset_names(tmp_path):
    build_any("llama").save_pretrained(tmp_path)
    model = hf_sparsek.from_pretrained(str(tmp_path), attn_implementation=f"sparsek:{PRESET}")
    assert hf_sparsek.model_sparsity(model.config).default == hf_sparsek.PRESETS[PRESET]
    with pytest.raises(ValueError, match="two patterns"):
        hf_sparsek.from_pretrained(str(tmp_path), pattern="dense", attn_implementation=f"sparsek:{PRESET}")


def test_one_line_loader_stores_the_choice_before_any_forward(tmp_path):
    """A save right after hf_sparsek.from_pretrained keeps the name's preset (written at load, not at the first
    forward); a subfolder's config is the one read (not the folder root's)."""
    build_any("llama").save_pretrained(tmp_path / "base")
    hf_sparsek.from_pretrained(str(tmp_path / "base"), attn_implementation=f"sparsek:{PRESET}").save_pretrained(
        tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="sparsek")
    assert hf_sparsek.model_sparsity(reloaded.config).default == hf_sparsek.PRESETS[PRESET]

    root = tmp_path / "repo"
    build_any("llama").save_pretrained(root / "sub")
    other = build_any("llama").config
    other.rope_theta, other.vocab_size = 10.0, 5  # a different config at the root: must not be used
    other.save_pretrained(root)
    model = hf_sparsek.from_pretrained(str(root), pattern="dense", subfolder="sub")
    assert model.config.vocab_size == build_any("llama").config.vocab_size


# --- 6. switching and pipelines --------------------------------------------------------------------------------


def test_set_attn_implementation_on_an_sdpa_model():
    model = build_any("llama")
    ids = torch.randint(1, 97, (2, 100))
    with torch.no_grad():
        dense = model(ids).logits
        model.set_attn_implementation("sparsek")
        hf_sparsek.model_sparsity(model.config)  # the model type's default: dense below min_sparse_len (512)
        with hf_sparsek.settings(dense_via_sdpa=False):
            ours = model(ids).logits
    assert model.config._attn_implementation == "sparsek"
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)
    model.set_attn_implementation(f"sparsek:{PRESET}")
    assert hf_sparsek.model_sparsity(model.config).default == hf_sparsek.PRESETS[PRESET]


def _save_with_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="w1").save_pretrained(path)
    build_any("llama").save_pretrained(path)


def test_text_generation_pipeline_with_model_kwargs(tmp_path):
    _save_with_tokenizer(tmp_path)
    text = " ".join(f"w{i}" for i in torch.randint(2, 97, (40,)).tolist())
    out = {}
    for impl in ("sdpa", "sparsek"):
        pipe = transformers.pipeline("text-generation", model=str(tmp_path), device="cpu",
                                     model_kwargs={"attn_implementation": impl})
        assert pipe.model.config._attn_implementation == impl
        out[impl] = pipe(text, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out["sparsek"] == out["sdpa"] and len(out["sdpa"]) > len(text)


# --- 8. 2D float masks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["0/1", "additive 0/-inf"])
def test_2d_float_mask_equals_sdpa(kind):
    """transformers reads any 2D mask as booleans (nonzero = attend) for every implementation, so an additive
    0/-inf mask is inverted there; sparsek gives exactly what sdpa gives, rows with nothing to attend included."""
    model = build_any("llama")
    ids = torch.randint(1, 97, (2, 40))
    keep = torch.ones(2, 40)
    keep[0, :9] = 0
    mask = keep if kind == "0/1" else torch.where(keep.bool(), 0.0, float("-inf"))
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        hf_sparsek.set_pattern(model, KEEP_ALL)
        with hf_sparsek.settings(dense_via_sdpa=False):
            ours = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)


# --- 7. torch.compile --------------------------------------------------------------------------------------------


def test_mask_function_and_pattern_resolution_trace_with_fullgraph():
    """The face's own work (packing probe, padding, pattern resolution) traces without graph breaks: no id(), no
    host syncs, no json. The block index build after it is data dependent (see docs/transformers.md)."""
    from transformers.masking_utils import create_causal_mask

    model = build_any("llama")
    hf_sparsek.set_pattern(model, SPARSE)
    config = model.config

    def face(embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        mask = create_causal_mask(config, embeds, attention_mask, None, position_ids)
        pattern = hf_sparsek.model_defaults.layer_pattern(config, 0)
        padding = torch.ones(1) if mask.padding is None else mask.padding.float()
        segments = torch.zeros(1) if mask.segments is None else mask.segments.float()
        return segments * pattern.window, padding * pattern.sink_tokens

    embeds = torch.randn(1, 50, 8)
    position_ids = torch.cat([torch.arange(20), torch.arange(30)]).unsqueeze(0)
    compiled = torch.compile(face, fullgraph=True, backend="eager")
    segments, _ = compiled(embeds, position_ids, None)
    assert segments.tolist() == [[0.0] * 20 + [SPARSE.window] * 30]
    _, padding = compiled(embeds, torch.arange(50).unsqueeze(0), torch.ones(1, 50, dtype=torch.long))
    assert padding.tolist() == [[float(SPARSE.sink_tokens)] * 50]  # kept (no host read of "all ones") when tracing


# a top-k pattern (the llama default's kind: "mass" selection per call, inside the custom op)
TOPK = hf_sparsek.SparsePattern(block_size=64, sink_tokens=16, window=64, topk_blocks=2)


@pytest.mark.parametrize("case", ["plain", "padded", "packed", "padded top-k", "padded top-k moment",
                                  "padded top-k per query head"])
def test_torch_compile_fullgraph_matches_eager(case):
    """torch.compile(model, fullgraph=True) of a sparsek model (reference backend): the face traces, the op with its
    index build is one custom op, and prefill (plain, left-padded, packed; a top-k pattern, also per query head)
    equals eager."""
    torch._dynamo.reset()
    model = build_any("llama")
    topk = "top-k" in case
    pattern = TOPK.replace(selector="moment") if "moment" in case else TOPK
    hf_sparsek.set_pattern(model, pattern.replace(per_query_head="per query head" in case) if topk else SPARSE)
    ids = torch.randint(1, 97, (1 if case == "packed" else 2, 300 if topk else 150))
    kwargs: dict = {"use_cache": False}
    if case.startswith("padded"):
        kwargs["attention_mask"] = torch.ones_like(ids)
        kwargs["attention_mask"][0, :11] = 0
    elif case == "packed":
        kwargs["position_ids"] = torch.cat([torch.arange(70), torch.arange(80)]).unsqueeze(0)
    with torch.no_grad(), hf_sparsek.settings(backend="reference"):
        eager = model(ids, **kwargs).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")(ids, **kwargs).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk", [False, True, "moment"], ids=["sink-window", "top-k", "top-k moment"])
def test_torch_compile_fullgraph_static_cache_generate_matches_eager(topk):
    """A static cache gives the query offset as a tensor: the compiled forward keeps it a tensor (no host read while
    tracing) and generate() through the compiled model gives eager's tokens and logits, left padding included."""
    torch._dynamo.reset()
    model = build_any("llama")
    hf_sparsek.set_pattern(model, (TOPK.replace(selector="moment") if topk == "moment" else TOPK) if topk else SPARSE)
    ids = torch.randint(1, 97, (2, 300 if topk else 70))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=4 if topk else 6, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True, cache_implementation="static")
    with hf_sparsek.settings(backend="reference"):
        eager = model.generate(ids, **kwargs)
        model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
        compiled = model.generate(ids, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_gradients_match_eager():
    """Gradients through the compiled op (its backward rebuilds the index and recomputes) equal eager's."""
    torch._dynamo.reset()
    model = build_any("llama")
    hf_sparsek.set_pattern(model, SPARSE)
    ids = torch.randint(1, 97, (2, 150))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    grads = []
    with hf_sparsek.settings(backend="reference"):
        for run in (model, torch.compile(model, fullgraph=True, backend="eager")):
            model.zero_grad()
            run(ids, attention_mask=mask, use_cache=False).logits.square().mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_output_attentions_warns_that_no_weights_come_back(caplog):
    """output_attentions=True: transformers' sdpa and flash attention warn and return no weights; sparsek does the
    same (the weights are never materialized), once per process, naming the implementation that gives them."""
    model = build("llama")
    hf_sparsek.set_pattern(model, SPARSE)
    ids = torch.randint(1, 97, (1, 70))
    integration._warn_output_attentions.cache_clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hf_sparsek.integration"):
        plain = model(ids).logits
        assert not caplog.records
        out = model(ids, output_attentions=True)
        model(ids, output_attentions=True)
    warnings = [r for r in caplog.records if "output_attentions" in r.getMessage()]
    assert len(warnings) == 1 and "eager" in warnings[0].getMessage()
    assert not out.attentions
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=0)
