"""Scorer weights on disk and which model they belong to.

On disk: ``sparsek_scorer.safetensors`` beside the model's ``config.json`` (the selector's shape in the file's
metadata). In memory: a registry from a model's config object to its :class:`LearnedSelector` (the attention layers
of one model share their config object), outside the model's modules, so the model's own ``state_dict``,
``save_pretrained`` and ``from_pretrained`` stay those of transformers. The face finds a layer's selector with
:func:`selector_for`: the attached one, else the file in the folder the model was loaded from
(``config._name_or_path``), loaded on first use; else a ValueError saying how to give it one.
"""

from __future__ import annotations

import json
import os
import weakref
from typing import Any

import torch

from .selector import LearnedSelector

SCORER_FILE = "sparsek_scorer.safetensors"
FORMAT = "hf_sparsek.learned/1"
_attached: dict[int, tuple[weakref.ref, LearnedSelector]] = {}


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def _configs(model_or_config: Any) -> list[Any]:
    """The config object and, for composite models, its text config (the one text attention layers hold)."""
    config = _config_of(model_or_config)
    found = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        found.append(text)
    return found


def attach_selector(model_or_config: Any, selector: LearnedSelector | None) -> None:
    """Make ``selector`` the one the layers of this model use (None detaches)."""
    for config in _configs(model_or_config):
        key = id(config)
        if selector is None:
            _attached.pop(key, None)
            continue
        _attached[key] = (weakref.ref(config, lambda _ref, key=key: _attached.pop(key, None)), selector)


def attached_selector(model_or_config: Any) -> LearnedSelector | None:
    entry = _attached.get(id(_config_of(model_or_config)))
    if entry is None or entry[0]() is not _config_of(model_or_config):
        return None
    return entry[1]


def save_selector(selector: LearnedSelector, folder: str | os.PathLike) -> str:
    """Write ``folder/sparsek_scorer.safetensors`` (float32 weights; the shape in the metadata); returns the path."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SCORER_FILE)
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in selector.state_dict().items()}
    save_file(tensors, path, metadata={"format": FORMAT, "selector": json.dumps(selector.meta())})
    return path


def load_selector(path: str | os.PathLike, device: torch.device | str | None = None) -> LearnedSelector:
    """A :class:`LearnedSelector` from a scorer file or the folder holding ``sparsek_scorer.safetensors``."""
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, SCORER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no learned scorer at {path!r} (expected {SCORER_FILE}, written by hf-sparsek distill)")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a hf_sparsek learned scorer file (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        shape = json.loads(meta["selector"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    selector = LearnedSelector(shape["layers"], shape["kv_heads"], shape["head_dim"], shape["block_size"],
                               shape["mode"], shape["buckets"], shape.get("query_rows", "previous"))
    selector.load_state_dict(tensors)
    if device is not None:
        selector.to(device)
    return selector


def uses_learned_selector(config: Any) -> bool:
    """True when a layer of the model holding ``config`` takes its tiles from a learned scorer (selector
    "learned"): its rows must not be packed across documents, and its scorer travels with the saved model."""
    import hf_sparsek
    from hf_sparsek.model_defaults import CONFIG_ATTRIBUTE

    if getattr(config, CONFIG_ATTRIBUTE, None) is None:
        return False
    sparsity = hf_sparsek.model_sparsity(config)
    layers = [sparsity.default, *(sparsity.for_layer(i) for i in sparsity.layer_overrides)]
    return any(p.resolved_selector == "learned" for p in layers)


def selector_for(config: Any) -> LearnedSelector:
    """The selector of the model whose attention layers hold ``config``: attached, else loaded once from
    ``config._name_or_path``; ValueError when neither exists."""
    selector = attached_selector(config)
    if selector is not None:
        return selector
    folder = getattr(config, "_name_or_path", None) or ""
    path = os.path.join(folder, SCORER_FILE) if folder else ""
    if path and os.path.isfile(path):
        selector = load_selector(path)
        attach_selector(config, selector)
        return selector
    raise ValueError(
        "this model's sparsek pattern uses selector 'learned' but no learned scorer was found"
        + (f" (no {SCORER_FILE} in {folder!r})" if folder else "")
        + ": train one with `hf-sparsek distill`, load the model from the folder it wrote, or attach one with "
        "hf_sparsek.learned.attach_selector(model, hf_sparsek.learned.load_selector(path))"
    )
