"""Per-model default patterns (one JSON file per ``model_type``) and the model config's stored choice.

The choice lives in ``config.sparsek`` (a plain dict, so ``save_pretrained`` writes it to config.json and
``from_pretrained`` reads it back). A model without one gets the default file of its ``model_type``, or
``generic.json`` for other model types.
"""

from __future__ import annotations

import json
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from .patterns import ModelSparsity, SparsePattern, as_model_sparsity

CONFIG_ATTRIBUTE = "sparsek"
GENERIC = "generic"


def available_model_types() -> list[str]:
    """Model types with a default file of their own (others use generic.json)."""
    files = resources.files("hf_sparsek").joinpath("model_patterns").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json") and f.name[:-5] != GENERIC)


@cache
def _load_default(model_type: str) -> ModelSparsity:
    folder = resources.files("hf_sparsek").joinpath("model_patterns")
    path = folder.joinpath(f"{model_type}.json")
    if not path.is_file():
        path = folder.joinpath(f"{GENERIC}.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("how_chosen", None)  # provenance for people; not a pattern field
    return ModelSparsity.from_dict(data)


def default_sparsity(model_type: str | None) -> ModelSparsity:
    """The shipped default of ``model_type`` (generic when it has none)."""
    return _load_default(model_type or GENERIC)


@lru_cache(maxsize=256)
def _parse(serialized: str) -> ModelSparsity:
    return ModelSparsity.from_dict(json.loads(serialized))


def model_sparsity(config: Any) -> ModelSparsity:
    """The resolved choice of a model config (its stored ``sparsek`` dict, or its model type's default).

    The default is written into the config the first time, so that a later ``save_pretrained`` keeps it.
    """
    stored = getattr(config, CONFIG_ATTRIBUTE, None)
    if stored is None:
        model_type = getattr(config, "model_type", None)
        sparsity = default_sparsity(model_type)
        setattr(config, CONFIG_ATTRIBUTE, sparsity.to_dict())
        return sparsity
    if isinstance(stored, ModelSparsity):
        setattr(config, CONFIG_ATTRIBUTE, stored.to_dict())
        return stored
    return _parse(json.dumps(stored, sort_keys=True))


def set_pattern(model_or_config: Any, pattern: ModelSparsity | SparsePattern | dict | str) -> ModelSparsity:
    """Pick a pattern for a model (or its config) in one line; also switches a model to "sparsek" attention.

    ``pattern``: a ModelSparsity, a SparsePattern (applied to every full-attention layer), a dict of either, a
    JSON string or file, or a preset name (see :data:`hf_sparsek.presets.PRESETS`).
    """
    from .presets import PRESETS

    if isinstance(pattern, str) and pattern in PRESETS:
        pattern = PRESETS[pattern]
    sparsity = as_model_sparsity(pattern)
    config = getattr(model_or_config, "config", model_or_config)
    setattr(config, CONFIG_ATTRIBUTE, sparsity.to_dict())
    for sub in ("text_config",):
        sub_config = getattr(config, sub, None)
        if sub_config is not None and sub_config is not config:
            setattr(sub_config, CONFIG_ATTRIBUTE, sparsity.to_dict())
    if hasattr(model_or_config, "set_attn_implementation"):
        from .integration import ATTN_IMPLEMENTATION

        if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            model_or_config.set_attn_implementation(ATTN_IMPLEMENTATION)
    return sparsity
