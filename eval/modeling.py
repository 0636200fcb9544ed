"""Load one model, switch it between dense (sdpa) and sparse patterns, and score tokens without full logits.

One model load serves every pattern: :func:`apply_pattern` switches the attention implementation in place.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

import torch

import hf_sparsek
from hf_sparsek.describe import kv_head_count, pattern_density
from hf_sparsek.model_defaults import SHAPE_SEPARATOR, default_sparsity, layer_kinds, resolve_layer_pattern
from hf_sparsek.patterns import DEFAULT_SELECTOR, ModelSparsity, SparsePattern, as_model_sparsity

DENSE = "dense"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class PatternSpec:
    """A pattern to evaluate: a label and a ModelSparsity, or None for the dense sdpa baseline."""

    label: str
    sparsity: ModelSparsity | None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "sparsity": None if self.sparsity is None else self.sparsity.to_dict()}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} requested but CUDA is not available here; use --device cpu")
    return device


def load_model(name: str, device: torch.device, dtype: torch.dtype, cache_dir: str | None = None,
               tokenizer: bool = True) -> tuple[Any, Any, str]:
    """(model in eval mode on ``device``, tokenizer or None, resolved path). Offline names are converted once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .offline import resolve_model

    path = resolve_model(name, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except Exception as err:
        raise ValueError(
            f"could not load model {name!r} (resolved to {path!r}): {type(err).__name__}: {err}. Use an offline "
            "name (smollm2-135m, gemma3-270m), a hub id, or a local checkpoint folder."
        ) from err
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as err:
            raise ValueError(f"could not load the tokenizer of {name!r} ({path!r}): {err}") from err
    model.to(device).eval()
    return model, tok, path


def text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "text_config", None) or config


def parse_patterns(names: list[str | dict], default: str | None) -> list[PatternSpec]:
    """Pattern arguments -> specs: "dense", "default" (the shipped default of ``default``: a model type, or
    ``model_defaults.default_key(config)`` so a checkpoint's calibrated entry counts), a preset, JSON text, a pattern
    dict (as in a JSON list of patterns) or a file."""
    specs = []
    auto: set[int] = set()  # specs labelled from their pattern (JSON text), not named
    for name in names:
        if isinstance(name, dict):
            name = json.dumps(name)
        elif not isinstance(name, str):
            raise ValueError(f"pattern {name!r}: expected 'dense', 'default', a preset name, JSON text, a pattern dict "
                             "or a JSON file")
        if name == DENSE:
            specs.append(PatternSpec(DENSE, None))
        elif name == "default":
            model_type = (default or "generic").partition(SHAPE_SEPARATOR)[0]
            specs.append(PatternSpec(f"default({model_type})", default_sparsity(default)))
        elif name in hf_sparsek.PRESETS:
            specs.append(PatternSpec(name, ModelSparsity(default=hf_sparsek.PRESETS[name], source=f"preset {name}")))
        else:
            try:
                sparsity = as_model_sparsity(name)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"pattern {name!r} is not 'dense', 'default', a preset ({sorted(hf_sparsek.PRESETS)}), a JSON "
                    f"pattern or a JSON file: {err}"
                ) from err
            if name.endswith(".json"):
                specs.append(PatternSpec(os.path.basename(name)[:-5], sparsity))
            else:
                auto.add(len(specs))
                specs.append(PatternSpec(_short_label(sparsity), sparsity))
    labels = [s.label for s in specs]
    clash = {label for label in labels if labels.count(label) > 1}
    if clash:  # JSON patterns differing only in selector / stride / threshold / block: the detailed label
        specs = [PatternSpec(_short_label(s.sparsity, detailed=True), s.sparsity) if i in auto and s.label in clash
                 else s for i, s in enumerate(specs)]
        labels = [s.label for s in specs]
    clash = {label for label in labels if labels.count(label) > 1}
    if clash:  # still equal labels (dense heads, min_sparse_len, layouts' offsets, overrides, files of one name):
        # each pattern's own fields, or the file's path
        specs = [PatternSpec(_full_label(str(names[i]), s.sparsity), s.sparsity) if s.label in clash and s.sparsity
                 else s for i, s in enumerate(specs)]
        labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"patterns must be distinct, got {labels}")
    return specs


def _full_label(name: str, sparsity: ModelSparsity) -> str:
    """A label that tells any two different patterns apart: a file's path, else the pattern's compact JSON."""
    if name.endswith(".json"):
        return name
    base = SparsePattern().to_dict()
    own = sparsity.default.to_dict()
    if sparsity.default.topk_blocks is not None:  # the selector named or left to the default is the same pattern
        own["selector"] = sparsity.default.resolved_selector
    fields = {k: v for k, v in own.items() if v != base.get(k)}
    if sparsity.dense_layers:
        fields["dense_layers"] = list(sparsity.dense_layers)
    if sparsity.layer_overrides:
        fields["layer_overrides"] = {str(k): v for k, v in sorted(sparsity.layer_overrides.items())}
    return json.dumps(fields, separators=(",", ":"))


def _short_label(sparsity: ModelSparsity, detailed: bool = False) -> str:
    """``sink64-window1024-topk15``, with the selector, probe stride, mass threshold and per-query-head choice where
    they are not the defaults (they change what a row measures); ``detailed`` adds the block size, used where the
    short labels of one run would collide."""
    p = sparsity.default
    parts = []
    if p.sink_tokens:
        parts.append(f"sink{p.sink_tokens}")
    if p.window:
        parts.append(f"window{p.window}")
    if p.layout is not None:
        parts.append(f"strided{p.layout.stride}" if p.layout.kind == "strided" else f"random{p.layout.density:g}")
    if p.topk_blocks:
        parts.append(f"topk{p.topk_blocks}")
        if p.resolved_selector != DEFAULT_SELECTOR:
            parts.append(p.resolved_selector)
        if p.probe_stride is not None:
            parts.append(f"stride{p.probe_stride}")
        if p.mass_threshold is not None:
            parts.append(f"mass{p.mass_threshold:g}")
        if p.per_query_head:
            parts.append("perhead")
    if p.dense_tail:
        parts.append(f"tail{p.dense_tail}")
    if detailed and parts and p.block_size != SparsePattern.block_size:
        parts.append(f"b{p.block_size}")
    label = "-".join(parts) or "dense-pattern"
    if sparsity.dense_layers:
        label += f"+dense{len(sparsity.dense_layers)}L"
    return label


def apply_pattern(model: Any, spec: PatternSpec) -> None:
    """Switch the loaded model in place: sdpa for dense, "sparsek" with the spec's pattern otherwise."""
    if spec.sparsity is None:
        model.set_attn_implementation("sdpa")
    else:
        hf_sparsek.set_pattern(model, spec.sparsity)


def layer_densities(config: Any, sparsity: ModelSparsity | None, seq_len: int) -> list[float]:
    """Per-layer attended / causal pairs at ``seq_len`` (``sparsity`` None: the dense baseline), each layer's pattern
    as the attention function resolves it (model sliding layers keep their own window)."""
    config = text_config(config)
    window = getattr(config, "sliding_window", None)
    sparsity = sparsity or ModelSparsity(default=SparsePattern())
    out = []
    cache: dict[str, float] = {}
    for layer, kind in enumerate(layer_kinds(config)):
        pattern = resolve_layer_pattern(sparsity, layer, kind, window if kind == "sliding_attention" else None)
        if seq_len <= pattern.min_sparse_len:
            pattern = SparsePattern()
        key = repr(pattern)
        if key not in cache:
            cache[key] = pattern_density(pattern, seq_len, kv_head_count(config))
        out.append(cache[key])
    return out


def density_summary(config: Any, sparsity: ModelSparsity | None, seq_len: int) -> dict[str, float]:
    """``density``: mean over the layers the pattern controls (full-attention layers); ``model_density``: all."""
    config = text_config(config)
    dens = layer_densities(config, sparsity, seq_len)
    kinds = layer_kinds(config)
    full = [d for d, k in zip(dens, kinds, strict=True) if k != "sliding_attention"] or dens
    return {"density": sum(full) / len(full), "model_density": sum(dens) / len(dens)}


def _decoder(model: Any) -> Any:
    base = getattr(model, model.base_model_prefix, None)
    if base is None:
        raise ValueError(f"cannot find the decoder of {type(model).__name__} (base_model_prefix)")
    return base


@torch.inference_mode()
def token_nll(model: Any, input_ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """NLL (fp32, nats) of tokens 1..L-1 of each row given the previous ones: (B, L-1). Logits in chunks, never
    the full (L x vocab) matrix, so 32K contexts with a 262K vocabulary fit."""
    hidden = _decoder(model)(input_ids=input_ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    out = []
    for s in range(0, hidden.shape[1] - 1, chunk):
        e = min(s + chunk, hidden.shape[1] - 1)
        logits = head(hidden[:, s:e]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        target = input_ids[:, s + 1 : e + 1]
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none"))
    return torch.cat(out, dim=1)


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Device and versions for the JSON results."""
    import transformers

    info: dict[str, Any] = {
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "transformers": transformers.__version__, "hf_sparsek": hf_sparsek.__version__,
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
        "backend": hf_sparsek.get_settings().backend,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def dump_json(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
