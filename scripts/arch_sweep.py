"""Architecture sweep: every causal-LM architecture transformers ships, through attn_implementation="sparsek".

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this builds one tiny random fp32 model in eval mode
(its config class's defaults shrunk: one layer of each kind, at least two; hidden 64; 4 query / 2 KV heads where the
config allows; vocab 100) and runs six checks on it, all on the PyTorch reference backend:

* ``dense``: a dense pattern (``SparsePattern(block_size=64)``, ``dense_via_sdpa=False``) equals the same weights
  under ``sdpa`` (``eager`` where sdpa is refused or the model caps its logits);
* ``sparse``: sink 3 + window 48 equals an exact masked softmax given the pattern's token mask on the model's
  plain causal layers and the model's own mask on its sliding / chunked layers (they keep their window);
* ``cache``: prefill, a chunk, then one-token decode steps equal the full forward;
* ``padding``: a left-padded batch equals each sequence alone;
* ``packing``: two documents packed in one row (position_ids restarting) equal each document alone;
* ``generate``: greedy generate() of a left-padded batch: the dynamic cache's step logits equal a forward without a
  cache over the generated tokens, and the static cache gives the same tokens and logits.

Each check ends ``pass``, ``refused`` (a ValueError from hf_sparsek naming what is unsupported), ``FAIL`` (a
mismatch, with its size, or a crash) or ``model`` (the model itself under sdpa/eager fails the same check, so the
check says nothing about sparse attention). ``python -m scripts.arch_sweep --write`` regenerates
docs/architectures.md; tests/test_architectures.py runs the same code per architecture.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import hf_sparsek
from hf_sparsek import SparsePattern, exact_token_mask

CHECKS = ("dense", "sparse", "cache", "padding", "packing", "generate")
DENSE = SparsePattern(block_size=64)
SPARSE = SparsePattern(block_size=64, sink_tokens=3, window=48)
ORACLE = "arch_sweep_oracle"
SEED = 1234
VOCAB = 100
SLIDING_WINDOW = 40  # shorter than the sequences, so a model's own sliding layers matter
CHUNK = 80  # Llama 4 style chunked attention, likewise
LEN_A, LEN_B = 160, 130  # two sequences; B is the left-padded one and the second packed document
PAD_B = LEN_A - LEN_B
PACK_A, PACK_B = 70, 90  # packed documents: the first PACK_A tokens of A, then the first PACK_B of B
PREFILL, CHUNK_END = 100, 150  # cache check: prefill [0, 100), chunk [100, 150), decode the rest one by one
DECODE_STEPS = 4
GEN_A, GEN_B, GEN_NEW = 70, 50, 8  # generate check: prompts of 70 and 50 (+20 left padding) tokens, 8 new tokens
TOL_EXACT = 1e-5  # same math, another code path: dense and sparse checks
TOL_ORDER = 1e-4  # same math, another summation order (cache, padding, packing)
DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"

# Attributes shrunk wherever a config (or any of its sub-configs) has them as a positive int.
SHRINK: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "emb_dim", "embedding_dim", "word_embed_proj_dim"), 64),
    **dict.fromkeys(("hidden_size_global", "adapter_in_dim", "adapter_input_size", "adapter_out_dim"), 64),
    **dict.fromkeys(("encoder_hash_byte_group_vocab",), 1000),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads"), 4),
    **dict.fromkeys(("decoder_attention_heads", "encoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads"), 2),
    **dict.fromkeys(("head_dim", "attention_head_dim", "dim_head", "qk_head_dim", "v_head_dim", "index_head_dim"), 16),
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", "indexer_head_dim"), 16),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim", "mamba_headdim"), 32),  # n_heads * d_head = 2 * hidden
    **dict.fromkeys(("n_groups", "mamba_n_groups"), 1),
    **dict.fromkeys(("mamba_d_ssm",), 128),
    **dict.fromkeys(("moe_k",), 2),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim"), 8),
    **dict.fromkeys(("linear_num_key_heads", "linear_num_heads", "index_n_heads", "indexer_n_heads"), 2),
    **dict.fromkeys(("linear_num_value_heads", "mamba_n_heads", "mamba_num_heads", "n_mamba_heads"), 4),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "decoder_ffn_dim", "dim_ff"), 96),
    **dict.fromkeys(("encoder_ffn_dim", "intermediate_size_mlp", "dense_intermediate_size"), 96),
    **dict.fromkeys(("first_dense_intermediate_size", "prefix_dense_intermediate_size"), 96),
    **dict.fromkeys(("mlp_only_intermediate_size",), 96),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size"), 32),
    **dict.fromkeys(("expert_ffn_hidden_size", "moe_shared_expert_intermediate_size"), 32),
    **dict.fromkeys(("shared_experts_intermediate_size",), 32),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "top_k_experts"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    **dict.fromkeys(("q_lora_rank",), 32),
    **dict.fromkeys(("kv_lora_rank", "o_lora_rank"), 16),
    **dict.fromkeys(("vocab_size", "vocab_size_per_layer_input"), VOCAB),
    **dict.fromkeys(("sliding_window", "attention_window_size", "window_size", "local_attention_window_len"),
                    SLIDING_WINDOW),
    **dict.fromkeys(("attention_chunk_size",), CHUNK),
    **dict.fromkeys(("mamba_d_state", "ssm_state_size", "state_size"), 8),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size"), 32),
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
LAYER_KINDS = ("layer_types", "layers_block_type", "block_types", "attention_types")  # one entry per layer
LAYER_INDEX_LISTS = ("hybrid_layer_ids", "attn_layer_indices", "index_layers", "mlp_only_layers", "moe_layers")
LAYER_SOURCES = ("kv_source_layers",)  # one entry per layer, each a layer index
# Shrunk even where the default is None.
SHRINK_NONE = ("head_dim", "num_key_value_heads", "num_experts_per_tok", "n_routed_experts", "n_shared_experts")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")
SOFTCAPS = ("attn_logit_softcapping", "attention_logit_softcapping", "attn_softcapping")

QWEN4_INDEXER = {  # its indexer has no defaults
    "indexer_budget": 64, "indexer_compress_ratio": 4, "indexer_n_heads": 2, "indexer_kv_heads": 1,
    "indexer_head_dim": 16,
}
# Per-model_type config changes the generic shrinking cannot guess (why, in each comment).
OVERRIDES: dict[str, dict[str, Any]] = {
    "zaya": {"num_experts_per_tok": 1},  # the only value its config accepts
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},  # its default has none
    "bamba": {"attn_layer_indices": [1]},  # its default has no attention layer
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},  # likewise
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},  # a cycle shorter than the layers
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},  # its attention needs both; no defaults
    "qwen4_exp_text": QWEN4_INDEXER,
    "qwen4_exp": {"text_config": QWEN4_INDEXER},
    "zamba": {  # its shared attention block is tied across hybrid layers: keep two of them
        "num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 1,
        "layers_block_type": ["linear_attention", "hybrid"] * 2,
    },
    "kolibri1_1": {"index_num_heads": 2},  # at most the query heads of one KV head
    # input / recurrent / output sections must add up to the layers kept (its defaults split 36: 8 + 20 + 8)
    "dory": {"n_input_layers": 0, "n_recurrent_layers": 2, "n_output_layers": 0},
    "reformer": {"axial_pos_embds_dim": [16, 48], "axial_pos_shape": [16, 16]},  # must sum to hidden 64
    "gemma3n_text": {  # the last layers read the KV of earlier ones: keep two of each
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "num_kv_shared_layers": 2,
        "activation_sparsity_pattern": [0.0] * 4,
        "intermediate_size": [96] * 4,
    },
    "cohere_compass_text": {  # its default has no rope parameters for its layer types
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {t: {"rope_type": "default", "rope_theta": 10000.0} for t in ("sliding_attention",
                                                                                          "full_attention")},
    },
}

# Entries of the mapping that are not swept, and why (encoder-decoders are found from their configs).
NOT_SWEPT = {
    "mamba": "state-space model: no attention layers",
    "mamba2": "state-space model: no attention layers",
    "falcon_mamba": "state-space model: no attention layers",
    "rwkv": "recurrent model: no attention layers",
    "xlstm": "recurrent model: no attention layers",
    "gemma4_assistant": "draft model for speculative decoding: runs on the target model's shared KV states",
    "gemma4_unified_assistant": "draft model for speculative decoding: runs on the target model's shared KV states",
    "gemma3n": "its vision tower needs timm; the text decoder is swept as gemma3n_text",
    "musicgen": "text-to-audio encoder-decoder",
    "musicgen_melody": "text-to-audio encoder-decoder",
}

# Calls a model needs after it is built, before any forward.
AFTER_BUILD: dict[str, Callable[[torch.nn.Module], None]] = {
    "xmod": lambda model: model.set_default_language(model.config.languages[0]),
}


@dataclass
class Check:
    """One check's outcome: ``status`` is pass | refused | FAIL | model; ``detail`` says why or by how much."""

    status: str
    detail: str = ""

    def cell(self) -> str:
        return self.status if not self.detail else f"{self.status}: {self.detail}"


@dataclass
class ArchResult:
    """An architecture's row: ``status`` is tested | skipped | refused at load | build error."""

    model_type: str
    class_name: str
    status: str = "tested"
    reason: str = ""
    reference: str = "sdpa"
    notes: str = ""
    checks: dict[str, Check] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failures(self) -> dict[str, Check]:
        return {name: c for name, c in self.checks.items() if c.status == "FAIL"}


# --------------------------------------------------------------------------------------------- tiny configs


def _shrink(config: PreTrainedConfig, mha: bool = False) -> dict[str, Any]:
    """Constructor kwargs that shrink ``config`` (recursing into sub-configs) while keeping its layer mix.

    ``mha``: as many KV heads as query heads, for configs that allow no grouped-query attention.
    """
    values = {name: _attribute(config, name, value) for name, value in config.to_dict().items()}
    kwargs: dict[str, Any] = {}
    for name, value in SHRINK.items():
        if name not in values:
            continue
        current = values[name]
        if (current is None and name in SHRINK_NONE) or (isinstance(current, int) and not isinstance(current, bool)
                                                         and current > 0):
            kwargs[name] = value
    if mha:
        kwargs.update({name: 4 for name in ("num_key_value_heads", "num_kv_heads", "n_kv_heads") if name in values})
    if values.get("head_dim") is not None and values.get("head_dim") == values.get("qk_rope_head_dim"):
        kwargs["head_dim"] = SHRINK["qk_rope_head_dim"]  # multi-head latent attention: head_dim is the rope part
    for name in TOKEN_IDS:
        token = values.get(name)
        if isinstance(token, int) and token >= VOCAB:
            kwargs[name] = min(TOKEN_IDS.index(name), VOCAB - 1)
    for name in SOFTCAPS:  # keep any softcap, but loose enough not to saturate
        if values.get(name):
            kwargs[name] = 50.0
    if values.get("is_decoder") is False and not values.get("is_encoder_decoder"):
        kwargs["is_decoder"] = True  # encoder-style LM heads (BERT family) are causal LMs only as decoders
    layers_key = next((k for k in LAYER_COUNTS if isinstance(values.get(k), int)), None)
    if layers_key is not None:
        kwargs.update(_shrink_layers(values, layers_key))
    for name in getattr(config, "sub_configs", {}):
        sub = getattr(config, name, None)
        if isinstance(sub, PreTrainedConfig):
            kwargs[name] = _shrink(sub, mha)
    return kwargs


def _attribute(config: PreTrainedConfig, name: str, serialized: Any) -> Any:
    """The attribute as the constructor takes it (to_dict may serialize another form); per-layer attributes some
    configs refuse to read globally fall back to the serialized value."""
    try:
        return getattr(config, name, serialized)
    except Exception:  # noqa: BLE001 - e.g. AmbiguousGlobalPerLayerAttributeError
        return serialized


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``changes``, sub-config dicts merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _shrink_layers(values: dict[str, Any], layers_key: str) -> dict[str, Any]:
    """Keep the first layer of each kind (at least two layers) and cut every per-layer setting to those layers:
    lists with one entry per layer, dicts keyed by layer index, and lists of layer indices."""
    total = values[layers_key]
    kinds = next((values[k] for k in LAYER_KINDS if isinstance(values.get(k), list) and len(values[k]) == total), None)
    keep = [0, 1]
    if kinds is not None and len(set(map(str, kinds))) > 1:
        first: dict[str, int] = {}
        for i, kind in enumerate(kinds):
            first.setdefault(str(kind), i)
        keep = sorted(first.values())
    keep = [i for i in keep if i < total] or [0]
    if total <= len(keep):
        return {}
    new_index = {old: new for new, old in enumerate(keep)}
    out: dict[str, Any] = {layers_key: len(keep)}
    for name, value in values.items():
        if name in LAYER_INDEX_LISTS and isinstance(value, list):
            out[name] = [new_index[i] for i in value if i in new_index]
        elif isinstance(value, list) and len(value) == total and name != "architectures":
            out[name] = [value[i] for i in keep]
            if name in LAYER_SOURCES:  # entries are layer indices too: a dropped source becomes the layer itself
                out[name] = [new_index.get(src, new) for new, src in enumerate(out[name])]
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value) and "label" not in name:
            width = len(str(next(iter(value))))
            out[name] = {
                str(new_index[int(k)]).zfill(width) if isinstance(k, str) else new_index[int(k)]: v
                for k, v in value.items()
                if int(k) in new_index
            }
    return out


def tiny_config(model_type: str, mha: bool = False, no_window: bool = False) -> PreTrainedConfig:
    """The model type's default config shrunk to a tiny random model (see module docstring).

    ``mha``: as many KV heads as query heads. ``no_window``: no model sliding window (for models whose every
    layer would otherwise be sliding, so that the pattern is tested somewhere).
    """
    config_class = CONFIG_MAPPING[model_type]
    kwargs = _merge(_shrink(config_class(), mha), OVERRIDES.get(model_type, {}))
    if no_window:
        for target in (kwargs, kwargs.get("text_config")):
            if isinstance(target, dict) and "sliding_window" in target:
                target["sliding_window"] = None
                kinds = target.get("layer_types")
                if isinstance(kinds, list) and set(kinds) == {"sliding_attention"}:
                    target["layer_types"] = ["full_attention"] * len(kinds)
    return config_class(**kwargs)


def skip_reason(model_type: str) -> str | None:
    """Why an entry of the mapping is not swept (None: it is)."""
    if model_type in NOT_SWEPT:
        return NOT_SWEPT[model_type]
    config_class = CONFIG_MAPPING[model_type]
    if getattr(config_class, "is_encoder_decoder", False) is True:
        return "encoder-decoder"
    return None


# --------------------------------------------------------------------------------------------- the oracle

_oracle_pattern: SparsePattern | None = None
_oracle_calls = {"layers": 0, "patterned": 0}  # attention calls seen, and how many of them the pattern restricted


def _oracle_mask(*args: Any, **kwargs: Any) -> torch.Tensor:
    """transformers' own sdpa mask (sliding, chunked, padding, packing), always materialized."""
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _oracle_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """fp64 masked softmax. On a layer whose own mask is plain causal, the mask is ANDed with the active pattern's
    token mask; layers with their own restriction (sliding window, chunks) keep the model's mask."""
    _oracle_calls["layers"] += 1
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    allowed = causal if attention_mask is None else attention_mask.to(torch.bool)
    restricted = sliding_window is not None or not bool((allowed == causal).all())
    if _oracle_pattern is not None and not restricted:
        _oracle_calls["patterned"] += 1
        allowed = allowed & exact_token_mask(_oracle_pattern, q_len, kv_len, device=query.device)
    group = query.shape[1] // key.shape[1]
    k = key.double().repeat_interleave(group, 1)
    v = value.double().repeat_interleave(group, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query.double() @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    sinks = kwargs.get("s_aux")
    if sinks is not None:  # learned sinks (gpt-oss): one extra logit per head that takes mass and no value
        sinks = sinks.double().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, q_len, 1)
        probs = torch.softmax(torch.cat([scores, sinks], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
    out = probs @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register_oracle() -> None:
    AttentionInterface.register(ORACLE, _oracle_attention)
    AttentionMaskInterface.register(ORACLE, _oracle_mask)


@contextlib.contextmanager
def _oracle_with(pattern: SparsePattern) -> Iterator[None]:
    global _oracle_pattern
    _oracle_pattern = pattern
    try:
        yield
    finally:
        _oracle_pattern = None


# --------------------------------------------------------------------------------------------- the checks


class Sweep:
    """One architecture's tiny model, shared by the six checks; forwards are cached per (implementation, input)."""

    def __init__(self, model: torch.nn.Module, reference: str) -> None:
        self.model = model
        self.reference = reference
        self.pad_id = 0
        gen = torch.Generator().manual_seed(SEED)
        self.ids_a = torch.randint(3, VOCAB, (1, LEN_A), generator=gen)
        self.ids_b = torch.randint(3, VOCAB, (1, LEN_B), generator=gen)
        params = inspect.signature(model.forward).parameters
        self.takes_positions = "position_ids" in params
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self.calls_interface = True
        self.patterned_layers = 0
        self.oracle_pattern = SPARSE  # what the sparse check expects on plain causal layers

    def use(self, impl: str) -> None:
        """Switch the model to ``impl``: "dense" / "sparse" (sparsek with that pattern) or an implementation name."""
        if impl == "dense":
            hf_sparsek.set_pattern(self.model, DENSE)
        elif impl == "sparse":
            hf_sparsek.set_pattern(self.model, SPARSE)
        else:
            self.model.set_attn_implementation(impl)

    def logits(self, impl: str, name: str, **inputs: Any) -> torch.Tensor:
        """fp32 logits of a no-cache forward under ``impl``, cached as (impl, name)."""
        key = (impl, name)
        if key not in self._cache:
            self.use(impl)
            with torch.no_grad():
                self._cache[key] = self.model(**inputs, use_cache=False).logits.float()
        return self._cache[key]

    def probe_interface(self) -> None:
        """Record whether any layer calls transformers' attention interface (else "sparsek" cannot act), and how
        many of those layers a pattern restricts (the others are the model's own sliding/chunked layers)."""
        before = dict(_oracle_calls)
        self._cache.pop((ORACLE, "a-oracle"), None)
        with _oracle_with(self.oracle_pattern):  # the sparse check's expected logits, computed once here
            self.logits(ORACLE, "a-oracle", **self.inputs(self.ids_a))
        self.calls_interface = _oracle_calls["layers"] > before["layers"]
        self.patterned_layers = _oracle_calls["patterned"] - before["patterned"]

    def inputs(self, ids: torch.Tensor, start: int = 0) -> dict[str, Any]:
        """``ids`` at positions start, start + 1, ...: explicit position_ids wherever the model takes them, so that
        every check numbers positions the same way (some models' defaults start elsewhere, e.g. RoBERTa's)."""
        if not self.takes_positions:
            return {"input_ids": ids}
        return {"input_ids": ids, "position_ids": torch.arange(start, start + ids.shape[1]).unsqueeze(0)}

    def full(self, impl: str, which: str) -> torch.Tensor:
        return self.logits(impl, which, **self.inputs(self.ids_a if which == "a" else self.ids_b))

    def check_dense(self) -> Check:
        return compare(self.full("dense", "a"), self.full(self.reference, "a"), TOL_EXACT)

    def check_sparse(self) -> Check:
        got = self.full("sparse", "a")
        expected = self._cache[(ORACLE, "a-oracle")]  # see probe_interface
        patterned = self.patterned_layers
        if patterned and compare(got, self.full(self.reference, "a"), TOL_EXACT).status == "pass":
            return Check("FAIL", "the sparse pattern changed nothing: it was not applied")
        result = compare(got, expected, TOL_EXACT)
        if result.status == "pass" and not patterned:
            result.detail = "every layer is the model's own sliding/chunked kind; they keep their window"
        return result

    def check_cache(self) -> Check:
        return self.controlled(self._cache_check)

    def check_padding(self) -> Check:
        return self.controlled(self._padding_check)

    def check_packing(self) -> Check:
        return self.controlled(self._packing_check)

    def check_generate(self) -> Check:
        return self.controlled(self._generate_check)

    def _cache_check(self, impl: str) -> Check:
        """Prefill [0, PREFILL), a chunk to CHUNK_END, then one-token steps; rows equal the full forward's."""
        self.use(impl)
        ids = self.ids_a[:, : CHUNK_END + DECODE_STEPS]
        rows = []
        with torch.no_grad():
            out = self.model(**self.inputs(ids[:, :PREFILL]), use_cache=True)
            rows.append(out.logits)
            steps = [(PREFILL, CHUNK_END)] + [(t, t + 1) for t in range(CHUNK_END, CHUNK_END + DECODE_STEPS)]
            for t0, t1 in steps:
                out = self.model(**self.inputs(ids[:, t0:t1], t0), past_key_values=out.past_key_values, use_cache=True)
                rows.append(out.logits)
        return compare(torch.cat(rows, 1).float(), self.full(impl, "a")[:, : ids.shape[1]], TOL_ORDER)

    def _padding_check(self, impl: str) -> Check:
        """[A; pad + B] with a 2D mask (and positions counting real tokens) equals A alone and B alone."""
        ids = torch.cat([self.ids_a, torch.cat([torch.full((1, PAD_B), self.pad_id), self.ids_b], 1)])
        mask = torch.ones_like(ids)
        mask[1, :PAD_B] = 0
        inputs: dict[str, Any] = dict(input_ids=ids, attention_mask=mask)
        if self.takes_positions:
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        got = self.logits(impl, "padded", **inputs)
        got = torch.cat([got[0, :], got[1, PAD_B:]])
        expected = torch.cat([self.full(impl, "a")[0], self.full(impl, "b")[0]])
        return compare(got, expected, TOL_ORDER)

    def _packing_check(self, impl: str) -> Check:
        """A[:PACK_A] and B[:PACK_B] in one row, positions restarting, equal each alone."""
        if not self.takes_positions:
            raise TypeError(f"{type(self.model).__name__}.forward takes no position_ids")
        ids = torch.cat([self.ids_a[:, :PACK_A], self.ids_b[:, :PACK_B]], 1)
        positions = torch.cat([torch.arange(PACK_A), torch.arange(PACK_B)]).unsqueeze(0)
        got = self.logits(impl, "packed", input_ids=ids, position_ids=positions)[0]
        expected = torch.cat([self.full(impl, "a")[0, :PACK_A], self.full(impl, "b")[0, :PACK_B]])
        return compare(got, expected, TOL_EXACT)

    def _generate_check(self, impl: str) -> Check:
        """generate() of a left-padded batch: the dynamic cache's step logits equal one forward without a cache over
        the generated tokens (the padding mask extended, positions counting real tokens), and the static cache gives
        the same tokens and logits (compared up to the first token a near-tie turns, if any)."""
        self.use(impl)
        pad = GEN_A - GEN_B
        ids = torch.cat([self.ids_a[:, :GEN_A], torch.cat([torch.full((1, pad), self.pad_id),
                                                           self.ids_b[:, :GEN_B]], 1)])
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
        runs = {cache: self._generate(ids, mask, cache) for cache in ("dynamic", "static")}
        seq, logits = runs["dynamic"]
        full_mask = torch.cat([mask, torch.ones_like(seq[:, GEN_A:])], 1)
        inputs: dict[str, Any] = dict(input_ids=seq, attention_mask=full_mask)
        if self.takes_positions:
            inputs["position_ids"] = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            full = self.model(**inputs, use_cache=False).logits.float()[:, GEN_A - 1: -1]
        result = compare(logits, full, TOL_ORDER)
        if result.status != "pass":
            result.detail = f"dynamic cache vs no cache: {result.detail}"
            return result
        seq_static, logits_static = runs["static"]
        differs = (seq_static[:, GEN_A:] != seq[:, GEN_A:]).any(0).nonzero()
        steps = differs[0].item() + 1 if len(differs) else GEN_NEW  # a near-tie turns a token: compare up to it
        result = compare(logits_static[:, :steps], logits[:, :steps], TOL_ORDER)
        if result.status != "pass":
            result.detail = f"static cache vs dynamic cache: {result.detail}"
        return result

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, cache: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy generate() with ``cache`` ("dynamic": the default): the sequences and the (batch, steps, vocab)
        fp32 logits of each step."""
        extra = {} if cache == "dynamic" else {"cache_implementation": cache}
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW,
                                      do_sample=False, pad_token_id=self.pad_id, output_logits=True,
                                      return_dict_in_generate=True, **extra)
        return out.sequences, torch.stack(out.logits, 1).float()

    def controlled(self, check: Callable[[str], Check]) -> Check:
        """Run ``check`` with the sparse pattern; where it fails, run it with the reference implementation too. A
        mismatch both show, or the same crash, is the model's own (status ``model``); a crash of sparse attention
        alone is a FAIL whatever the reference does."""
        crash = None
        try:
            result = check("sparse")
        except ValueError as exc:
            if _is_refusal(exc):
                raise
            crash = _describe_error(exc)
            result = Check("FAIL", f"crash: {crash}")
        except Exception as exc:  # noqa: BLE001 - a crash is a finding
            crash = _describe_error(exc)
            result = Check("FAIL", f"crash: {crash}")
        if result.status == "pass":
            return result
        try:
            ref = check(self.reference)
        except Exception as exc:  # noqa: BLE001 - the model's own failure
            if crash is None or crash == _describe_error(exc):
                return Check("model", f"{self.reference} fails too: {_describe_error(exc)}")
            return result
        if crash is None and ref.status != "pass":
            return Check("model", f"{self.reference} fails too: {ref.detail}")
        return result


def compare(got: torch.Tensor, expected: torch.Tensor, tol: float) -> Check:
    """pass, or FAIL with the largest difference and the first differing token (its row in the compared logits)."""
    if got.shape != expected.shape:
        return Check("FAIL", f"shape {tuple(got.shape)} != {tuple(expected.shape)}")
    diff = (got - expected).abs()
    bad = diff > tol + tol * expected.abs()
    if not bool(bad.any()) and bool(torch.isfinite(got).all()):
        return Check("pass")
    if not bool(torch.isfinite(got).all()):
        return Check("FAIL", "non-finite logits")
    rows = bad.reshape(-1, bad.shape[-1]).any(-1).nonzero()
    return Check("FAIL", f"max abs diff {diff.max().item():.1e} (tol {tol:.0e}), first bad token {rows[0].item()}")


def _describe_error(exc: BaseException) -> str:
    """``Type: first line`` of an error; a config validation error is described by its cause."""
    if type(exc).__name__ == "StrictDataclassClassValidationError" and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}"


def _is_refusal(exc: ValueError) -> bool:
    """hf_sparsek's refusals name the attention implementation."""
    return "sparsek" in str(exc)


def _run_check(sweep: Sweep, name: str) -> Check:
    try:
        return getattr(sweep, f"check_{name}")()
    except ValueError as exc:
        if _is_refusal(exc):
            return Check("refused", _describe_error(exc).removeprefix("ValueError: "))
        return Check("FAIL", f"crash: {_describe_error(exc)}")
    except Exception as exc:  # noqa: BLE001 - a crash is a finding, reported per check
        return Check("FAIL", f"crash: {_describe_error(exc)}")


def _reference_impl(model_class: type, config: PreTrainedConfig) -> str:
    if any(getattr(config, name, None) for name in SOFTCAPS) or not getattr(model_class, "_supports_sdpa", False):
        return "eager"
    return "sdpa"


def _build(model_type: str, result: ArchResult, mha: bool, no_window: bool) -> Sweep | None:
    """One attempt: the tiny model under its reference implementation, smoke-tested and probed. None (with
    ``result`` saying why) where transformers or hf_sparsek refuses "sparsek" at load; raises where it cannot run."""
    config = tiny_config(model_type, mha, no_window)
    if getattr(config, "is_encoder_decoder", False):
        result.status, result.reason = "skipped", "encoder-decoder"
        return None
    result.reference = _reference_impl(getattr(transformers, result.class_name), config)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=result.reference, dtype=torch.float32)
    model.eval()
    try:
        hf_sparsek.set_pattern(model, DENSE)
    except ValueError as exc:
        result.status, result.reason = "refused at load", _describe_error(exc).removeprefix("ValueError: ")
        return None
    if model_type in AFTER_BUILD:
        AFTER_BUILD[model_type](model)
    sweep = Sweep(model, result.reference)
    try:
        sweep.full(result.reference, "a")  # the model must run under its own reference implementation
        sweep.probe_interface()
    except Exception:
        if type(model).is_backend_compatible():
            raise
        sweep.calls_interface = False  # transformers' own flag says its attention ignores the interface
        result.notes = "forward fails in the harness; judged by is_backend_compatible()"
        return sweep
    if not sweep.calls_interface and type(model).is_backend_compatible():
        raise RuntimeError("the tiny model has no layer that calls the attention interface (harness config)")
    return sweep


def build(model_type: str) -> tuple[ArchResult, Sweep | None]:
    """The architecture's tiny model under its reference implementation, or the reason there is none.

    Tries grouped-query attention first, then as many KV heads as query heads (some configs allow no GQA). Where
    every attention layer of the model is a sliding one, it tries again without the model's window, so that the
    pattern meets at least one layer; it keeps the sliding model where that does not build.
    """
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    result = ArchResult(model_type, class_name)
    reason = skip_reason(model_type)
    if reason is not None:
        result.status, result.reason = "skipped", reason
        return result, None
    errors = []
    for mha in (False, True):
        try:
            sweep = _build(model_type, result, mha, no_window=False)
        except Exception as exc:  # noqa: BLE001 - reported as the harness's build error
            errors.append(_describe_error(exc))
            continue
        if sweep is not None and sweep.calls_interface and not sweep.patterned_layers:
            with contextlib.suppress(Exception):
                unslid = _build(model_type, ArchResult(model_type, class_name), mha, no_window=True)
                if unslid is not None and unslid.patterned_layers:
                    sweep, result.notes = unslid, "model sliding window removed: every layer was sliding"
        return result, sweep
    result.status, result.reason = "build error", errors[-1]
    return result, None


def _without_interface(sweep: Sweep, result: ArchResult) -> Check:
    """The outcome of every check for a model whose attention never calls transformers' attention interface: a
    refusal, a crash, or (where "sparsek" runs) a pattern silently ignored."""
    outcome = Check("FAIL", "silently ignored: no layer calls transformers' attention interface, yet 'sparsek' is "
                    "accepted")
    if result.notes:  # the harness cannot run this model at all: judged by transformers' flag alone
        return outcome
    try:
        with hf_sparsek.settings(backend="reference", dense_via_sdpa=False):
            sweep.full("dense", "a")
    except ValueError as exc:
        if _is_refusal(exc):
            return Check("refused", _describe_error(exc).removeprefix("ValueError: "))
        return Check("FAIL", f"crash: {_describe_error(exc)} (its attention does not call the interface)")
    except Exception as exc:  # noqa: BLE001 - a crash is a finding
        return Check("FAIL", f"crash: {_describe_error(exc)} (its attention does not call the interface)")
    return outcome


def run_architecture(model_type: str) -> ArchResult:
    """Build one architecture and run every check on it (reference backend, fp32)."""
    start = time.perf_counter()
    with one_thread(), _quiet():
        result, sweep = build(model_type)
        if sweep is not None and not sweep.calls_interface:
            result.checks = dict.fromkeys(CHECKS, _without_interface(sweep, result))
        elif sweep is not None:
            with hf_sparsek.settings(backend="reference", dense_via_sdpa=False):
                for name in CHECKS:
                    result.checks[name] = _run_check(sweep, name)
    result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; on a shared 2-core machine two threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers warns per model about defaults it fills in; the sweep reports its own findings."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            transformers.logging.set_verbosity(level)


def model_types() -> list[str]:
    """Every model_type transformers maps to a causal-LM class, in mapping order."""
    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# --------------------------------------------------------------------------------------------- report


def render_markdown(results: list[ArchResult], seconds: float) -> str:
    """docs/architectures.md: one row per architecture, one column per check, then the failures by cause."""
    swept = [r for r in results if r.status in ("tested", "refused at load")]
    cells = [c.status for r in swept for c in r.checks.values()]
    counts = {s: cells.count(s) for s in ("pass", "refused", "model", "FAIL")}
    lines = [
        "# Architectures: attn_implementation=\"sparsek\" across transformers' causal LMs",
        "",
        f"Generated by `python -m scripts.arch_sweep --write` on {datetime.date.today().isoformat()} with "
        f"transformers {transformers.__version__} and torch {torch.__version__.split('+')[0]}, in {seconds:.0f} s on "
        "CPU (reference backend, fp32). `tests/test_architectures.py` runs the same code, one test per "
        "(architecture, check), and lists the known failures as strict xfails; results depend on the transformers "
        "version (the script runs on 5.17 and 5.25).",
        "",
        "Every `model_type` of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is either swept or listed under *Not swept* with "
        "the reason. A swept model is the model type's default config shrunk (one layer of each kind, at least two; "
        "hidden 64; 4 query / 2 KV heads where the config allows; vocab 100; the model's own sliding windows 40 and "
        "chunks 80 tokens), random fp32 weights, eval mode. Checks:",
        "",
        "- **dense**: `SparsePattern(block_size=64)` under `settings(dense_via_sdpa=False, backend=\"reference\")` "
        "equals the same weights under the reference implementation (*ref*: `sdpa`, or `eager` where the model caps "
        "its logits or has no sdpa), rtol = atol = 1e-5.",
        "- **sparse**: sink 3 + window 48 over 160 tokens equals an fp64 masked softmax given the pattern's exact "
        "token mask on the model's plain causal layers and the model's own mask on its sliding / chunked layers "
        "(they keep the model's window whatever the pattern), 1e-5. It also fails when the pattern changed nothing.",
        "- **cache**: prefill 100 tokens, a 50-token chunk, then 4 one-token decode steps equal the full forward, "
        "1e-4.",
        "- **padding**: a batch of 160 and 130 (+30 left padding) tokens equals each sequence alone, 1e-4.",
        "- **packing**: 70 + 90 tokens in one row, position_ids restarting, equal each document alone, 1e-5.",
        "- **generate**: greedy `generate()` of 8 tokens from a batch of 70 and 50 (+20 left padding) tokens: the "
        "dynamic cache's step logits equal one forward without a cache over the generated tokens, and the static "
        "cache (`cache_implementation=\"static\"`) gives the same tokens and logits, 1e-4.",
        "",
        "Cells: `pass`; `refused: ...` (hf_sparsek raised a ValueError naming what it does not support); "
        "`FAIL: ...` (a silent mismatch with its size and first differing token, or a crash); `model: ...` (the "
        "reference implementation fails the same check, or crashes the same way: a limitation of the model, not of "
        "sparse attention); `(same)`: as the dense cell.",
        "",
        f"{len(swept)} of {len(results)} entries swept: {counts['pass']} checks pass, {counts['refused']} refused, "
        f"{counts['model']} not applicable to the model, {counts['FAIL']} FAIL.",
        "",
        "| model_type | class | ref | " + " | ".join(CHECKS) + " |",
        "|---|---|---|" + "---|" * len(CHECKS),
    ]
    for r in swept:
        if r.status == "refused at load":
            row = [f"refused at load: {r.reason}"] + ["(same)"] * (len(CHECKS) - 1)
        else:
            first = r.checks[CHECKS[0]].cell()
            row = [first] + ["(same)" if r.checks[n].cell() == first and r.checks[n].detail else r.checks[n].cell()
                             for n in CHECKS[1:]]
        name = r.class_name + (f" ({r.notes})" if r.notes else "")
        lines.append(f"| {r.model_type} | {name} | {r.reference} | " + " | ".join(c.replace("|", "/") for c in row)
                     + " |")
    lines += ["", "## Failures by cause", ""]
    for cause, items in failure_groups(results).items():
        listed = ", ".join(f"{m}" + ("" if len(n) == len(CHECKS) else f" ({', '.join(n)})") for m, n, _ in items)
        lines.append(f"- {cause} ({len(items)}): {listed}")
    lines += ["", "## Not swept", "", "| model_type | class | why |", "|---|---|---|"]
    for r in results:
        if r.status not in ("tested", "refused at load"):
            lines.append(f"| {r.model_type} | {r.class_name} | {r.status}: {r.reason.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def failure_groups(results: list[ArchResult]) -> dict[str, list[tuple[str, list[str], str]]]:
    """Every FAIL grouped by cause (its message with numbers blanked): cause -> [(model_type, checks, detail)]."""
    groups: dict[str, list[tuple[str, list[str], str]]] = {}
    for r in results:
        by_cause: dict[str, list[str]] = {}
        details: dict[str, str] = {}
        for name, check in r.failures.items():
            cause = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", check.detail)
            by_cause.setdefault(cause, []).append(name)
            details.setdefault(cause, check.detail)
        for cause, names in by_cause.items():
            groups.setdefault(cause, []).append((r.model_type, names, details[cause]))
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def render_failures(results: list[ArchResult]) -> str:
    """The grouped failure list (markdown), for fixing by cause."""
    lines = [f"# Architecture sweep failures (transformers {transformers.__version__})", ""]
    for cause, items in failure_groups(results).items():
        lines += [f"## {cause} [{len(items)} architectures]", ""]
        for model_type, names, detail in items:
            checks = "all checks" if len(names) == len(CHECKS) else ", ".join(names)
            lines.append(f"- {model_type}: {checks}" + (f" ({detail})" if detail != cause else ""))
        lines.append("")
    build_errors = [r for r in results if r.status == "build error"]
    if build_errors:
        lines += ["## harness could not build a tiny model", ""]
        lines += [f"- {r.model_type}: {r.reason}" for r in build_errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="default: all")
    parser.add_argument("--write", action="store_true", help=f"write {DOCS_PATH.relative_to(DOCS_PATH.parents[1])}")
    parser.add_argument("--failures", type=Path, help="write the grouped failure list here")
    args = parser.parse_args(argv)
    logging.getLogger("hf_sparsek").setLevel(logging.ERROR)
    register_oracle()
    start = time.perf_counter()
    results = []
    for model_type in args.model_types or model_types():
        with _quiet():
            result = run_architecture(model_type)
        results.append(result)
        cells = " ".join(f"{n}={c.status}" for n, c in result.checks.items()) or f"{result.status}: {result.reason}"
        cells += f" [{result.notes}]" if result.notes else ""
        print(f"{model_type:28s} {result.seconds:5.1f}s {cells}", flush=True)
        for name, check in result.checks.items():
            if check.status != "pass":
                print(f"    {name}: {check.cell()}", flush=True)
    seconds = time.perf_counter() - start
    print(f"total {seconds:.1f}s wall, {time.process_time():.1f}s CPU")
    if args.write:
        DOCS_PATH.write_text(render_markdown(results, seconds), encoding="utf-8")
    if args.failures:
        args.failures.write_text(render_failures(results), encoding="utf-8")


if __name__ == "__main__":
    main()
