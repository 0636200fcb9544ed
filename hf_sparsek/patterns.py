"""Typed, validated, JSON-serializable sparsity patterns.

A :class:`SparsePattern` says which keys one attention layer may attend. Every term is token-exact except the
block layouts, which select whole key blocks of ``block_size`` tokens on the absolute position grid:

* causal, always: query at position ``i`` never sees key ``j > i``;
* ``sink_tokens`` s: the first s tokens of the query's own sequence (rank < s, so padding and packing are honoured);
* ``window`` w: keys with ``i - j < w``;
* ``layout``: a static block layout (``strided`` or ``random``) selecting key blocks;
* ``topk_blocks``: a dynamic budget of k key blocks per query block, chosen from the data by ``selector``
  (``"mass"`` by default, ``"meanpool"``, ``"learned"``, ``"probe"``: exact scores of one query row in every
  ``probe_stride`` (default 16), ``"refine"``: those exact scores over the candidates ``"mass"`` passes on,
  ``"moment"``: a second-order estimate from key tiles' mean and variance per sampled row (default one in 8), or
  ``"oracle"``: the true attention mass, for evaluation);
  with ``mass_threshold`` t, the fewest blocks whose estimated attention mass reaches t, at most k; by default
  one list per KV group (the group's query heads share it), with ``per_query_head`` one per query head (the op
  then reads K / V once per query head: group-size times the K / V bytes);
* ``dense_heads``: KV heads that stay dense; ``min_sparse_len``: queries at positions below it attend densely;
  ``dense_tail`` t: in a call of more than t query rows, its last t rows attend densely (a prefill's last row
  predicts the first generated token; decode steps and short chunks keep the pattern).

A pattern with no selection term (no sink, window, layout or top-k) is dense causal.

:class:`ModelSparsity` holds the per-model choice: a default pattern, the layers that stay dense and per-layer
overrides. It is stored in ``model.config.sparsek`` and survives ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_BLOCK_SIZES = (64, 128)
LAYOUT_KINDS = ("strided", "random")
SELECTORS = ("mass", "meanpool", "learned", "oracle", "probe", "refine", "moment")
PROBING_SELECTORS = ("probe", "refine", "moment")  # selectors that score sampled query rows (``probe_stride``)
DEFAULT_SELECTOR = "mass"


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"invalid sparsity pattern field {name!r}={value!r}: {allowed}")


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        _fail(name, value, allowed)


@dataclass(frozen=True)
class BlockLayout:
    """A static block layout over key blocks.

    ``strided``: key block ``kb`` is selected iff ``kb % stride == offset`` (every stride-th block, the summary
    columns of the Sparse Transformer). ``random``: each causal (query block, key block, KV head) is selected with
    probability ``density``, from a hash of the three and ``seed`` (the same on every device and call).
    """

    kind: str
    stride: int | None = None
    offset: int = 0
    density: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            _fail("layout.kind", self.kind, f"one of {LAYOUT_KINDS}")
        if self.kind == "strided":
            _check_int("layout.stride", self.stride, 1)
            _check_int("layout.offset", self.offset, 0)
            if self.offset >= self.stride:
                _fail("layout.offset", self.offset, f"an integer in [0, stride={self.stride})")
            if self.density is not None:
                _fail("layout.density", self.density, "only for kind 'random'")
            if self.seed != 0:
                _fail("layout.seed", self.seed, "only for kind 'random' (a strided layout has no randomness)")
        else:
            if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
                _fail("layout.density", self.density, "a number in (0, 1]")
            if not 0.0 < float(self.density) <= 1.0:
                _fail("layout.density", self.density, "a number in (0, 1]")
            if self.stride is not None:
                _fail("layout.stride", self.stride, "only for kind 'strided'")
            _check_int("layout.seed", self.seed, 0)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "strided":
            return {"kind": "strided", "stride": self.stride, "offset": self.offset}
        return {"kind": "random", "density": float(self.density), "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockLayout:
        if not isinstance(data, dict):
            _fail("layout", data, "an object such as {'kind': 'strided', 'stride': 8}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            _fail("layout", data, f"unknown keys {sorted(unknown)}; allowed: kind, stride, offset, density, seed")
        return cls(**data)


@dataclass(frozen=True)
class SparsePattern:
    """Which keys one layer's queries attend. See the module docstring for the exact rules."""

    block_size: int = 128
    sink_tokens: int = 0
    window: int | None = None
    layout: BlockLayout | None = None
    topk_blocks: int | None = None
    dense_heads: tuple[int, ...] = ()
    min_sparse_len: int = 0
    selector: str | None = None
    mass_threshold: float | None = None
    probe_stride: int | None = None
    per_query_head: bool = False
    dense_tail: int = 0

    def __post_init__(self) -> None:
        if (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                or self.block_size not in SUPPORTED_BLOCK_SIZES):
            _fail("block_size", self.block_size, f"one of {SUPPORTED_BLOCK_SIZES}")
        _check_int("sink_tokens", self.sink_tokens, 0)
        _check_int("window", self.window, 1, allow_none=True)
        _check_int("topk_blocks", self.topk_blocks, 1, allow_none=True)
        _check_int("min_sparse_len", self.min_sparse_len, 0)
        _check_int("dense_tail", self.dense_tail, 0)
        if self.min_sparse_len % self.block_size:
            _fail("min_sparse_len", self.min_sparse_len, f"a multiple of block_size={self.block_size}")
        if isinstance(self.layout, dict):
            object.__setattr__(self, "layout", BlockLayout.from_dict(self.layout))
        if self.layout is not None and not isinstance(self.layout, BlockLayout):
            _fail("layout", self.layout, "null or a BlockLayout / layout object")
        if not isinstance(self.dense_heads, (list, tuple)):
            _fail("dense_heads", self.dense_heads, "a list of KV head indices")
        heads = tuple(self.dense_heads)
        for h in heads:
            _check_int("dense_heads", h, 0)
        if len(set(heads)) != len(heads):
            _fail("dense_heads", self.dense_heads, "distinct KV head indices")
        object.__setattr__(self, "dense_heads", tuple(sorted(heads)))
        self._check_selection()
        self._check_probe_stride()
        self._check_per_query_head()
        if self.dense_tail and self.selector == "learned":
            _fail("dense_tail", self.dense_tail, "0 with selector 'learned' (its scorer chooses tiles for the whole "
                  "call; the op splits a call with a dense tail in two)")

    def _check_selection(self) -> None:
        """``selector`` and ``mass_threshold`` only mean something beside a ``topk_blocks`` budget."""
        if self.selector is not None:
            if self.selector not in SELECTORS:
                _fail("selector", self.selector, f"null or one of {SELECTORS}")
            if self.topk_blocks is None:
                _fail("selector", self.selector, "only with topk_blocks set (the selector fills that budget)")
        threshold = self.mass_threshold
        if threshold is None:
            return
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            _fail("mass_threshold", threshold, "null (fixed k) or a number in (0, 1]")
        if self.topk_blocks is None:
            _fail("mass_threshold", threshold, "only with topk_blocks set (the threshold's hard cap)")
        if self.selector in ("meanpool", "refine"):
            _fail("mass_threshold", threshold,
                  "only with selector 'mass', 'learned', 'probe', 'moment' or 'oracle' (meanpool scores are not mass; "
                  "refine's restricted softmax is not the row's true mass)")
        object.__setattr__(self, "mass_threshold", float(threshold))

    def _check_probe_stride(self) -> None:
        """``probe_stride``: selectors ``"probe"`` / ``"refine"`` / ``"moment"`` only, a power of two up to the block
        (the fused kernels' grid)."""
        stride = self.probe_stride
        if stride is None:
            return
        if self.selector not in PROBING_SELECTORS:
            _fail("probe_stride", stride, "only with selector 'probe', 'refine' or 'moment' (it sets how many query "
                  "rows they score)")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or stride & (stride - 1) \
                or stride > self.block_size:
            _fail("probe_stride", stride, f"null (the selector's default) or a power of two from 1 to "
                  f"block_size={self.block_size}")

    def _check_per_query_head(self) -> None:
        """``per_query_head``: a bool, only beside a ``topk_blocks`` budget the op's own selector fills."""
        if not isinstance(self.per_query_head, bool):
            _fail("per_query_head", self.per_query_head, "true or false")
        if not self.per_query_head:
            return
        if self.topk_blocks is None:
            _fail("per_query_head", True, "only with topk_blocks set (it makes each query head choose its own tiles)")
        if self.selector == "learned":
            _fail("per_query_head", True, "not with selector 'learned' (its scorer chooses one list per KV head)")

    @property
    def resolved_selector(self) -> str | None:
        """The selector that fills ``topk_blocks``: ``selector``, or ``"mass"`` when unset; None without top-k."""
        if self.topk_blocks is None:
            return None
        return self.selector or DEFAULT_SELECTOR

    @property
    def is_dense(self) -> bool:
        """True when no term restricts the causal pattern."""
        return self.sink_tokens == 0 and self.window is None and self.layout is None and self.topk_blocks is None

    def replace(self, **changes: Any) -> SparsePattern:
        """A copy with ``changes``; dropping ``topk_blocks`` also drops the selector fields it carried (the static
        part of a top-k pattern is ``pattern.replace(topk_blocks=None)``)."""
        return dataclasses.replace(self, **_without_orphan_selection(changes))

    def to_dict(self) -> dict[str, Any]:
        out = {
            "block_size": self.block_size,
            "sink_tokens": self.sink_tokens,
            "window": self.window,
            "layout": None if self.layout is None else self.layout.to_dict(),
            "topk_blocks": self.topk_blocks,
            "dense_heads": list(self.dense_heads),
            "min_sparse_len": self.min_sparse_len,
            "selector": self.selector,
            "mass_threshold": self.mass_threshold,
        }
        if self.probe_stride is not None:  # only where set: files without it stay as they were
            out["probe_stride"] = self.probe_stride
        if self.per_query_head:
            out["per_query_head"] = True
        if self.dense_tail:
            out["dense_tail"] = self.dense_tail
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsePattern:
        if not isinstance(data, dict):
            _fail("pattern", data, "an object with fields " + ", ".join(f.name for f in dataclasses.fields(cls)))
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            allowed = ", ".join(f.name for f in dataclasses.fields(cls))
            _fail("pattern", sorted(unknown), f"unknown field(s); allowed: {allowed}")
        data = dict(data)
        if data.get("layout") is not None:
            data["layout"] = BlockLayout.from_dict(data["layout"])
        if "dense_heads" in data:
            if not isinstance(data["dense_heads"], (list, tuple)):
                _fail("dense_heads", data["dense_heads"], "a list of KV head indices")
            data["dense_heads"] = tuple(data["dense_heads"])
        return cls(**data)

    def describe(self) -> str:
        """One line a person can read, e.g. ``sink 128 + window 4096, block 128``."""
        if self.is_dense:
            return "dense causal"
        parts = []
        if self.sink_tokens:
            parts.append(f"sink {self.sink_tokens}")
        if self.window is not None:
            parts.append(f"window {self.window}")
        if self.layout is not None:
            if self.layout.kind == "strided":
                parts.append(f"strided every {self.layout.stride} blocks")
            else:
                parts.append(f"random {self.layout.density:.0%} of blocks")
        if self.topk_blocks is not None:
            if self.mass_threshold is not None:
                parts.append(f"blocks to mass {self.mass_threshold:g} (at most {self.topk_blocks})")
            else:
                parts.append(f"top-{self.topk_blocks} blocks")
            if self.selector is not None:
                parts[-1] += f" by {self.selector}"
            if self.probe_stride is not None:
                parts[-1] += f" (one row in {self.probe_stride})"
            if self.per_query_head:
                parts[-1] += " per query head"
        text = " + ".join(parts) + f", block {self.block_size}"
        if self.dense_heads:
            text += f", dense KV heads {list(self.dense_heads)}"
        if self.min_sparse_len:
            text += f", dense below {self.min_sparse_len}"
        if self.dense_tail:
            text += f", last {self.dense_tail} rows of a call dense"
        return text


def _without_orphan_selection(changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` setting ``topk_blocks`` to None also reset ``selector``, ``mass_threshold``, ``probe_stride`` and
    ``per_query_head`` unless given; a selector other than ``"probe"`` / ``"refine"`` / ``"moment"`` resets
    ``probe_stride`` unless given."""
    if "topk_blocks" in changes and changes["topk_blocks"] is None:
        return {"selector": None, "mass_threshold": None, "probe_stride": None, "per_query_head": False, **changes}
    if "selector" in changes and changes["selector"] not in PROBING_SELECTORS:
        return {"probe_stride": None, **changes}
    return changes


def _parse_layer_key(key: Any) -> int:
    """A layer index from an int or its decimal string (JSON object keys); floats and bools are refused."""
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        _fail("layer_overrides", key, "keys must be layer indices (integers)")
    try:
        layer = int(key)
    except (TypeError, ValueError):
        _fail("layer_overrides", key, "keys must be layer indices (integers)")
    if layer < 0:
        _fail("layer_overrides", key, "layer indices must be >= 0")
    return layer


@dataclass(frozen=True)
class ModelSparsity:
    """The per-model choice: a default pattern, layers kept dense, per-layer overrides.

    ``layer_overrides`` maps a layer index to a partial pattern (only the fields that differ from ``default``).
    ``source`` records where the values came from (a default file, a tuning command), for people, not code.
    """

    default: SparsePattern = field(default_factory=SparsePattern)
    dense_layers: tuple[int, ...] = ()
    layer_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.default, dict):
            object.__setattr__(self, "default", SparsePattern.from_dict(self.default))
        if not isinstance(self.default, SparsePattern):
            _fail("default", self.default, "a SparsePattern or an object of its fields")
        if not isinstance(self.dense_layers, (list, tuple)):
            _fail("dense_layers", self.dense_layers, "a list of layer indices")
        dense = tuple(self.dense_layers)
        for layer in dense:
            _check_int("dense_layers", layer, 0)
        object.__setattr__(self, "dense_layers", tuple(sorted(set(dense))))
        overrides = {}
        for key, value in dict(self.layer_overrides).items():
            layer = _parse_layer_key(key)
            if isinstance(value, SparsePattern):
                value = value.to_dict()
            if not isinstance(value, dict):
                _fail(f"layer_overrides[{layer}]", value, "an object of pattern fields")
            merged = {**self.default.to_dict(), **_without_orphan_selection(value)}
            SparsePattern.from_dict(merged)  # validates now, not at the first forward
            overrides[layer] = dict(value)
        object.__setattr__(self, "layer_overrides", overrides)
        if not isinstance(self.source, str):
            _fail("source", self.source, "a string")

    def for_layer(self, layer_idx: int | None) -> SparsePattern:
        """The pattern of one layer; dense layers get a dense pattern of the same block size."""
        if layer_idx is not None and layer_idx in self.dense_layers:
            return SparsePattern(block_size=self.default.block_size)
        if layer_idx is not None and layer_idx in self.layer_overrides:
            override = _without_orphan_selection(self.layer_overrides[layer_idx])
            return SparsePattern.from_dict({**self.default.to_dict(), **override})
        return self.default

    def replace(self, **changes: Any) -> ModelSparsity:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": self.default.to_dict(),
            "dense_layers": list(self.dense_layers),
            "layer_overrides": {str(k): v for k, v in sorted(self.layer_overrides.items())},
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSparsity:
        if not isinstance(data, dict):
            _fail("sparsek", data, "an object with fields default, dense_layers, layer_overrides, source")
        allowed = {"default", "dense_layers", "layer_overrides", "source"}
        unknown = set(data) - allowed
        if unknown:
            _fail("sparsek", sorted(unknown), f"unknown field(s); allowed: {sorted(allowed)}")
        data = dict(data)
        if "dense_layers" in data:
            if not isinstance(data["dense_layers"], (list, tuple)):
                _fail("dense_layers", data["dense_layers"], "a list of layer indices")
            data["dense_layers"] = tuple(data["dense_layers"])
        if "layer_overrides" in data and not isinstance(data["layer_overrides"], dict):
            _fail("layer_overrides", data["layer_overrides"], "an object mapping layer index to pattern fields")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSparsity:
        return cls.from_dict(json.loads(text))


def as_model_sparsity(value: ModelSparsity | SparsePattern | dict[str, Any] | str) -> ModelSparsity:
    """Accept a ModelSparsity, a single SparsePattern, a dict of either, or a JSON string/path."""
    if isinstance(value, ModelSparsity):
        return value
    if isinstance(value, SparsePattern):
        return ModelSparsity(default=value)
    if isinstance(value, str):
        text = value
        if not value.lstrip().startswith("{"):
            with open(value, encoding="utf-8") as handle:
                text = handle.read()
        value = json.loads(text)
    if isinstance(value, dict):
        if "default" in value:
            return ModelSparsity.from_dict(value)
        return ModelSparsity(default=SparsePattern.from_dict(value))
    raise TypeError(f"expected a ModelSparsity, SparsePattern, dict or JSON, got {type(value).__name__}")
