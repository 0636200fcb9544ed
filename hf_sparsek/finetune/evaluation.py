"""Held-out perplexity during fine-tuning, and running the same weights under another attention.

The perplexity is computed here (not by the Trainer's evaluate) so that it runs the same way on plain, LoRA-wrapped
and FSDP-sharded models, one window per forward pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .config import ATTN_CHOICES
from .model import set_pattern

if TYPE_CHECKING:
    import torch


def heldout_nll(
    model: torch.nn.Module, docs: Sequence[Sequence[int]], seq_len: int, autocast_dtype: torch.dtype | None = None,
    max_windows: int | None = None,
) -> dict[str, float]:
    """Token-weighted mean next-token NLL over held-out documents, in non-overlapping windows of ``seq_len``.

    Each window is one forward pass (batch 1, positions from 0, no padding). Windows shorter than 2 tokens are
    skipped. Returns ``{"nll", "ppl", "tokens", "windows"}``.
    """
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, windows = 0.0, 0, 0
    for doc in docs:
        for start in range(0, len(doc), seq_len):
            window = doc[start : start + seq_len]
            if len(window) < 2 or (max_windows is not None and windows >= max_windows):
                continue
            ids = torch.tensor([window], device=device)
            with torch.no_grad():
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(input_ids=ids).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total += float(loss)
            count += len(window) - 1
            windows += 1
    model.train(was_training)
    if count == 0:
        raise ValueError("held-out data has no window of at least 2 tokens")
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count, "windows": windows}


@contextlib.contextmanager
def attention(model: torch.nn.Module, attn: str, pattern: Any = None) -> Iterator[None]:
    """Run ``model`` with another attention inside the block (``sparsek`` with ``pattern``, or ``sdpa``/``eager``).

    Used to evaluate a dense-trained model under the sparse pattern (and the reverse) with the same weights.
    """
    import hf_sparsek
    from hf_sparsek.model_defaults import CONFIG_ATTRIBUTE

    if attn not in ATTN_CHOICES:
        raise ValueError(f"attn={attn!r}; supported: {ATTN_CHOICES}")
    previous = model.config._attn_implementation
    previous_pattern = getattr(model.config, CONFIG_ATTRIBUTE, None)
    if attn == "sparsek":
        set_pattern(model, pattern if pattern is not None else hf_sparsek.model_sparsity(model.config),
                    "--eval-pattern")
    else:
        model.set_attn_implementation(attn)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        setattr(model.config, CONFIG_ATTRIBUTE, previous_pattern)
