"""Per-model default patterns (one JSON file per ``model_type``) and the model config's stored choice.

The choice lives in ``config.sparsek`` (a plain dict, so ``save_pretrained`` writes it to config.json and
``from_pretrained`` reads it back). A model without one gets the default file of its ``model_type``, or
``generic.json`` for other model types; a file may hold per-layer patterns calibrated for one checkpoint shape
(``"checkpoints"``, matched on ``CHECKPOINT_FIELDS``), which models of that shape get instead. A preset-qualified
attention name, ``attn_implementation="sparsek:<preset>"``, picks the preset wherever only an attention name can be
given (lm-eval ``--model_args``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from functools import cache, lru_cache
from importlib import resources
from typing import Any

import torch

from .patterns import BlockLayout, ModelSparsity, SparsePattern, as_model_sparsity
from .presets import PRESETS

CONFIG_ATTRIBUTE = "sparsek"
GENERIC = "generic"
ATTN_IMPLEMENTATION = "sparsek"
PRESET_SEPARATOR = ":"
logger = logging.getLogger(__name__)


def implementation_names() -> list[str]:
    """Every attention name registered with transformers: "sparsek" and "sparsek:<preset>" per preset."""
    return [ATTN_IMPLEMENTATION] + [f"{ATTN_IMPLEMENTATION}{PRESET_SEPARATOR}{name}" for name in PRESETS]


def is_sparsek_implementation(name: Any) -> bool:
    """True for "sparsek" and its preset-qualified names (use this, not ``== "sparsek"``)."""
    return isinstance(name, str) and (
        name == ATTN_IMPLEMENTATION or name.startswith(ATTN_IMPLEMENTATION + PRESET_SEPARATOR)
    )


def preset_of_implementation(name: Any) -> str | None:
    """The preset named by "sparsek:<preset>"; None for "sparsek" and other names. ValueError for unknown presets."""
    if not is_sparsek_implementation(name) or name == ATTN_IMPLEMENTATION:
        return None
    preset = name[len(ATTN_IMPLEMENTATION) + len(PRESET_SEPARATOR) :]
    if preset not in PRESETS:
        raise ValueError(f"attn_implementation={name!r} names no preset; use one of {implementation_names()}")
    return preset


def available_model_types() -> list[str]:
    """Model types with a default file of their own (others use generic.json)."""
    files = resources.files("hf_sparsek").joinpath("model_patterns").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json") and f.name[:-5] != GENERIC)


CHECKPOINT_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size")
SHAPE_SEPARATOR = "@"


def default_key(config: Any) -> str | None:
    """What picks a config's shipped default: its ``model_type``, with its shape (``CHECKPOINT_FIELDS``) appended as
    ``llama@30-9-3-576``, so a model type's file can hold patterns calibrated per layer for one checkpoint shape
    (its ``"checkpoints"`` list) beside the default every other shape gets."""
    model_type = getattr(config, "model_type", None)
    shape = [getattr(config, name, None) for name in CHECKPOINT_FIELDS]
    if model_type is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape):
        return model_type
    return model_type + SHAPE_SEPARATOR + "-".join(str(v) for v in shape)


def _shape_of(match: dict[str, Any]) -> str:
    missing = [name for name in CHECKPOINT_FIELDS if name not in match]
    if missing:
        raise ValueError(f"a checkpoint entry's 'match' needs {list(CHECKPOINT_FIELDS)}; missing {missing}")
    return "-".join(str(int(match[name])) for name in CHECKPOINT_FIELDS)


@cache
def _load_default(key: str) -> ModelSparsity:
    model_type, _, shape = key.partition(SHAPE_SEPARATOR)
    folder = resources.files("hf_sparsek").joinpath("model_patterns")
    path = folder.joinpath(f"{model_type}.json")
    if not path.is_file():
        path = folder.joinpath(f"{GENERIC}.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    checkpoints = data.pop("checkpoints", [])
    for entry in checkpoints:  # a pattern calibrated per layer for one checkpoint shape wins over the type's default
        if shape and _shape_of(entry.get("match", {})) == shape:
            data = {k: v for k, v in entry.items() if k != "match"}
            break
    data.pop("how_chosen", None)  # provenance for people; not a pattern field
    return ModelSparsity.from_dict(data)


def default_sparsity(model_type: str | None) -> ModelSparsity:
    """The shipped default of ``model_type`` (generic when it has none); a :func:`default_key` (type and shape)
    selects a checkpoint's calibrated entry where the type's file has one for that shape."""
    return _load_default(model_type or GENERIC)


def _freeze(value: Any) -> Any:
    """A stored pattern (nested dicts / lists) as a hashable key; plain Python, so torch.compile traces it."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_freeze(v) for v in value))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "dict":
        return {k: _thaw(v) for k, v in value[1]}
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "list":
        return [_thaw(v) for v in value[1]]
    return value


@lru_cache(maxsize=256)
def _resolve(frozen: Any, preset: str | None, model_type: str | None) -> ModelSparsity:
    if preset is not None:
        return ModelSparsity(default=PRESETS[preset], source=f"attn_implementation {ATTN_IMPLEMENTATION}:{preset}")
    if frozen is None:
        return default_sparsity(model_type)
    return ModelSparsity.from_dict(_thaw(frozen))


def _config_key(config: Any) -> tuple[Any, Any, str | None, str | None]:
    """(stored value, hashable key of it, preset of the attention name, model type): what decides the choice."""
    stored = getattr(config, CONFIG_ATTRIBUTE, None)
    preset = preset_of_implementation(getattr(config, "_attn_implementation", None))
    frozen = None
    if preset is None and stored is not None:
        frozen = _freeze(stored.to_dict() if isinstance(stored, ModelSparsity) else stored)
    return stored, frozen, preset, default_key(config)


@lru_cache(maxsize=256)
def _resolved_dict(frozen: Any, preset: str | None, model_type: str | None) -> dict:
    return _resolve(frozen, preset, model_type).to_dict()


def model_sparsity(config: Any) -> ModelSparsity:
    """The resolved choice of a model config: a preset named by ``attn_implementation="sparsek:<preset>"``, else
    its stored ``sparsek`` dict, else its model type's default.

    The choice is written into the config as a plain dict, so that a later ``save_pretrained`` keeps it. A
    preset-qualified name replaces a different stored pattern (it is the explicit request) and says so once in the
    log.
    """
    if not hasattr(config, "model_type") and hasattr(getattr(config, "config", None), "model_type"):
        config = config.config  # a model was given: its config holds the choice
    key = _config_key(config)
    _write_choice(config, *key)
    return _resolve(*key[1:])


def _write_choice(config: Any, stored: Any, frozen: Any, preset: str | None, model_type: str | None) -> None:
    if preset is not None or not isinstance(stored, dict):  # a name, nothing stored yet, or a ModelSparsity object
        wanted = _resolved_dict(frozen, preset, model_type)
        if stored != wanted:
            if preset is not None and stored is not None:
                _log_once(f"hf_sparsek: attn_implementation={config._attn_implementation!r} replaces the pattern "
                          "stored in config.sparsek")
            setattr(config, CONFIG_ATTRIBUTE, copy.deepcopy(wanted))


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def layer_kind(config: Any, layer_idx: int | None) -> str | None:
    """The layer's entry in ``config.layer_types`` (None when the config lists none or the layer is unknown)."""
    types = getattr(config, "layer_types", None)
    if not types or layer_idx is None or layer_idx >= len(types):
        return None
    return types[layer_idx]


def layer_kinds(config: Any) -> list[str]:
    """The kind of every layer: ``config.layer_types``, else sliding for all layers of a model-wide window."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    n_layers = int(config.num_hidden_layers)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return ["sliding_attention"] * n_layers
    return ["full_attention"] * n_layers


def check_layer_kind(kind: str | None, sliding_window: int | None, layer_idx: int | None) -> None:
    """ValueError for a layer whose mask is unknown to us: another type, or a sliding layer without its window."""
    if kind is not None and kind not in SUPPORTED_LAYER_TYPES:
        raise ValueError(
            f"attn_implementation='sparsek' does not support layer type {kind!r} (layer {layer_idx}); supported "
            f"layer types: {SUPPORTED_LAYER_TYPES}. Use attn_implementation='sdpa' for this model."
        )
    if kind == "sliding_attention" and sliding_window is None:
        raise ValueError(
            f"layer {layer_idx} is a 'sliding_attention' layer but no sliding_window is known for it (the model "
            "passes none to its attention function); attn_implementation='sparsek' cannot know its window"
        )


def resolve_layer_pattern(
    sparsity: ModelSparsity, layer_idx: int | None, kind: str | None, sliding_window: int | None
) -> SparsePattern:
    """The one rule for the pattern of one layer: a model's sliding layers keep exactly their window, chunked layers
    are dense within their chunk (the chunks are applied as segments), other layers take ``sparsity``'s pattern.

    ``kind``: the layer's type (None: a plain layer); ``sliding_window``: the window the model applies to it.
    """
    check_layer_kind(kind, sliding_window, layer_idx)
    if sliding_window is not None or kind == "chunked_attention":
        window = None if sliding_window is None else int(sliding_window)
        return SparsePattern(block_size=sparsity.default.block_size, window=window)
    return sparsity.for_layer(layer_idx)


@torch.compiler.assume_constant_result  # run while tracing; its arguments are config values the graph guards on
def _layer_fields(frozen: Any, preset: str | None, model_type: str | None, layer_idx: int | None, kind: str | None,
                  sliding_window: int | None) -> tuple:
    return _layer_fields_cached(frozen, preset, model_type, layer_idx, kind, sliding_window)


@lru_cache(maxsize=1024)
def _layer_fields_cached(frozen: Any, preset: str | None, model_type: str | None, layer_idx: int | None,
                         kind: str | None, sliding_window: int | None) -> tuple:
    """A layer's pattern as sorted (field, value) pairs of plain values, the layout as pairs too."""
    pattern = resolve_layer_pattern(_resolve(frozen, preset, model_type), layer_idx, kind, sliding_window)
    fields = pattern.to_dict()
    fields["dense_heads"] = tuple(fields["dense_heads"])
    if fields["layout"] is not None:
        fields["layout"] = tuple(sorted(fields["layout"].items()))
    return tuple(sorted(fields.items()))


def _pattern_from_fields(fields: tuple) -> SparsePattern:
    values = dict(fields)
    if values["layout"] is not None:
        values["layout"] = BlockLayout(**dict(values["layout"]))
    return SparsePattern(**values)


_pattern_cached = lru_cache(maxsize=1024)(_pattern_from_fields)


def layer_pattern(config: Any, layer_idx: int | None, sliding_window: int | None = None) -> SparsePattern:
    """The pattern layer ``layer_idx`` (None: a plain layer) of a model config runs: :func:`resolve_layer_pattern`
    over :func:`model_sparsity`, the layer's type from ``config.layer_types`` and the window the model passes.

    torch.compile traces this: the resolution runs once while tracing (its inputs are config values the graph guards
    on), and the pattern is rebuilt from plain fields inside the graph. Eager calls also write the choice into the
    config, like :func:`model_sparsity`.
    """
    compiling = torch.compiler.is_compiling()
    kind = layer_kind(config, layer_idx)
    check_layer_kind(kind, sliding_window, layer_idx)
    stored, frozen, preset, model_type = _config_key(config)
    if not compiling:
        _write_choice(config, stored, frozen, preset, model_type)
    fields = _layer_fields(frozen, preset, model_type, layer_idx, kind, sliding_window)
    return _pattern_from_fields(fields) if compiling else _pattern_cached(fields)


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def resolve_pattern(pattern: ModelSparsity | SparsePattern | dict | str) -> ModelSparsity:
    """A pattern in any accepted form -> ModelSparsity; ValueError naming the forms for a string that is none."""
    if isinstance(pattern, str):
        if pattern in PRESETS:
            return ModelSparsity(default=PRESETS[pattern])
        if not pattern.lstrip().startswith("{") and not os.path.isfile(pattern):
            raise ValueError(
                f"pattern {pattern!r} is not a preset ({', '.join(PRESETS)}), a JSON string (starting with '{{') or "
                "an existing JSON file; a dict, SparsePattern or ModelSparsity is accepted as well"
            )
    return as_model_sparsity(pattern)


def set_pattern(model_or_config: Any, pattern: ModelSparsity | SparsePattern | dict | str) -> ModelSparsity:
    """Pick a pattern for a model (or its config) in one line; also switches a model to "sparsek" attention.

    ``pattern``: a ModelSparsity, a SparsePattern (applied to every full-attention layer), a dict of either, a
    JSON string or file, or a preset name (see :data:`hf_sparsek.presets.PRESETS`). A preset-qualified attention
    name ("sparsek:<preset>") becomes plain "sparsek", so that the name does not override this choice.
    """
    sparsity = resolve_pattern(pattern)
    if hasattr(model_or_config, "set_attn_implementation"):
        from .model_support import check_model

        check_model(model_or_config)  # a model whose attention never reaches "sparsek" would stay dense
    config = getattr(model_or_config, "config", model_or_config)
    configs = [config]
    sub_config = getattr(config, "text_config", None)
    if sub_config is not None and sub_config is not config:
        configs.append(sub_config)
    layers = getattr(sub_config or config, "num_hidden_layers", None)
    if isinstance(layers, int):  # a layer the model does not have does nothing: say so (a model type's shipped
        # default names the layers of the model it was tuned on, so this is a warning, not an error)
        named = sorted({*sparsity.dense_layers, *sparsity.layer_overrides})
        beyond = [i for i in named if i >= layers]
        if beyond:
            _log_once(f"hf_sparsek: dense_layers / layer_overrides name layers {beyond}, but the model has {layers} "
                      f"layers (0-{layers - 1}): they have no effect")
    for cfg in configs:
        setattr(cfg, CONFIG_ATTRIBUTE, sparsity.to_dict())
    if hasattr(model_or_config, "set_attn_implementation"):
        if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            model_or_config.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        for cfg in configs:
            if preset_of_implementation(getattr(cfg, "_attn_implementation", None)) is not None:
                cfg._attn_implementation = ATTN_IMPLEMENTATION
    return sparsity
