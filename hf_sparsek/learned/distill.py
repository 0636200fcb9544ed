"""Distil the learned selector from a frozen model's dense attention: ``hf-sparsek distill`` / :func:`distill`.

What a run does:

1. loads the model (its weights frozen, never trained here) and cuts the token documents into windows of
   ``seq_len`` tokens, the last ``heldout_docs`` documents held out;
2. runs each training window once, densely, through a registered attention function (transformers' public
   ``AttentionInterface.register`` + ``model.set_attn_implementation``) that records, per layer, the block features
   the scorer reads and the *true* block attention mass of every (query tile, KV head) (``block_attention_mass``,
   exact, on the model's device): the distillation targets;
3. trains the per-layer scorers on those records: per query tile, the KL divergence between the true mass the
   pattern's sink and window leave in each competing key tile (what selecting it gains, renormalised) and the
   scorer's softmax over them, weighted by the mass at stake, plus
   optionally (``coverage_weight``) the mass the soft SPARSEK mask (``sparsek_topk``) of the logits covers;
4. measures on the held-out windows the attention mass each selector covers at the same budget (the oracle, the
   learned scorer, the untrained one, the library's training-free selectors), token-exact;
5. writes ``final/``: the model with ``config.sparsek`` naming selector "learned" and ``sparsek_scorer.safetensors``
   beside it, so ``AutoModelForCausalLM.from_pretrained(final, attn_implementation="sparsek")`` runs the scorer.

Resumable (``resume=True``: the scorer, optimizer and step in ``checkpoint/``), a JSON log line per logged step in
``distill_log.jsonl``, the summary in ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import DEFAULT_PATTERN, DistillConfig
from .features import (
    competing_tiles,
    key_tile_features,
    lagged_query_features,
    own_query_features,
    query_tile_sums,
)
from .io import SCORER_FILE, attach_selector, load_selector, save_selector, uses_learned_selector
from .scorer import hard_topk_tiles
from .selector import LearnedSelector

CAPTURE_NAME = "sparsek_distill"
LOG_FILE = "distill_log.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- the dense pass: per layer, the scorer's inputs and the true block mass -------------------------------------


@dataclass
class LayerRecord:
    """What one layer of one window gives the distillation (tensors on the model's device, float32)."""

    qb: torch.Tensor  # (n,) the query tiles recorded (all, or every ``stride``-th)
    q_feat: torch.Tensor  # (B, Hkv, n, D) pooled queries of those tiles (the previous tile's or their own rows)
    k_feat: torch.Tensor  # (B, Hkv, n_k, 3 D)
    mass: torch.Tensor  # (B, Hkv, n, n_k) true attention mass the static part leaves in each tile (the gain)
    competing: torch.Tensor  # (B, 1, n, n_k)
    qk: tuple[torch.Tensor, torch.Tensor, float | None] | None = None  # (q, k, scale), eval windows only


def block_mass_rows(q: torch.Tensor, k: torch.Tensor, block: int, scale: float | None, tiles: torch.Tensor,
                    tiles_per_chunk: int = 8, sink_tokens: int = 0, window: int | None = None) -> torch.Tensor:
    """(B, Hkv, len(tiles), n_k) float32: the exact causal block attention mass of the listed query tiles of a
    prefill (queries = keys, from position 0), as ``eval.selection_recall.block_attention_mass`` defines it (per
    query tile, summed over its rows and the group's heads, each query tile summing to 1).

    With ``sink_tokens`` / ``window``, only the mass of the pairs that static part does not attend: what selecting
    a tile adds (its gain; zero for the tiles the static part keeps whole)."""
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    n_k = (length + block - 1) // block
    keys = k.float().repeat_interleave(group, 1).transpose(-1, -2)
    key_pos = torch.arange(length, device=q.device)
    out = []
    for c in range(0, len(tiles), tiles_per_chunk):
        chunk = tiles[c : c + tiles_per_chunk]
        rows = (chunk.view(-1, 1) * block + torch.arange(block, device=q.device)).view(-1)
        real = rows < length
        rows = rows.clamp(max=length - 1)
        scores = torch.matmul(q[:, :, rows].float(), keys) * scale
        scores.masked_fill_(key_pos.view(1, -1) > rows.view(-1, 1), float("-inf"))
        probs = scores.softmax(-1)
        if sink_tokens or window is not None:
            kept = key_pos.view(1, -1) < sink_tokens
            if window is not None:
                kept = kept | (rows.view(-1, 1) - key_pos.view(1, -1) < window)
            probs = probs.masked_fill(kept, 0.0)
        probs = torch.nn.functional.pad(probs, (0, n_k * block - length))
        probs = probs.view(batch, hkv, group, len(chunk), block, n_k, block) * real.view(1, 1, 1, len(chunk), block,
                                                                                       1, 1)
        out.append(probs.sum((2, 4, 6)) / (real.view(len(chunk), block).sum(-1).view(1, 1, -1, 1) * group))
    return torch.cat(out, dim=2)


_capture: dict[str, Any] | None = None


def _capture_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' sdpa; first records the layer's block features and true block mass (layers being captured)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(module, "layer_idx", None)
    if _capture is not None and layer in _capture["patterns"]:
        pattern = _capture["patterns"][layer]
        block, (batch, kv_heads, kv_len, _) = pattern.block_size, key.shape
        q_len = query.shape[2]
        with torch.no_grad():
            sums, counts = query_tile_sums(query, None, 0, block, kv_heads)
            stride, n_q = _capture["stride"], sums.shape[2]
            qb = torch.arange((layer * 7 + _capture["step"]) % min(stride, n_q), n_q, stride, device=query.device)
            competing = competing_tiles(0, q_len, 0, kv_len, block, pattern.sink_tokens, pattern.window, None,
                                        batch, query.device)
            record = LayerRecord(
                qb=qb,
                q_feat=(lagged_query_features(sums, counts, None) if _capture["query_rows"] == "previous"
                        else own_query_features(sums, counts))[:, :, qb],
                k_feat=key_tile_features(key, None, 0, block),
                mass=block_mass_rows(query, key, block, kwargs.get("scaling"), qb,
                                     sink_tokens=pattern.sink_tokens, window=pattern.window),
                competing=competing[:, :, qb],
                qk=(query.detach().float(), key.detach().float(), kwargs.get("scaling")) if _capture["keep_qk"]
                else None,
            )
        _capture["records"][layer] = record
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_capture() -> None:
    """Register "sparsek_distill" (attention and mask) through transformers' public interfaces; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)


@torch.no_grad()
def capture_layers(model: Any, ids: torch.Tensor, patterns: dict[int, Any], keep_qk: bool = False,
                   stride: int = 1, step: int = 0, query_rows: str = "previous") -> dict[int, LayerRecord]:
    """{layer: LayerRecord} of one dense forward of ``ids``; the model's attention implementation is restored.

    ``stride`` > 1 records the targets of every stride-th query tile only (the exact softmax of those rows: the
    cost of a CPU run), starting at an offset that varies with the layer and ``step``. ``query_rows``: the rows
    each query tile's feature pools (``LearnedSelector``'s option of that name).
    """
    global _capture
    register_capture()
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    _capture = {"patterns": patterns, "records": {}, "keep_qk": keep_qk, "stride": stride, "step": step,
                "query_rows": query_rows}
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    try:
        (body if isinstance(body, torch.nn.Module) else model)(input_ids=ids, use_cache=False)  # no LM head
        records = _capture["records"]
    finally:
        _capture = None
        model.set_attn_implementation(previous)
    missing = sorted(set(patterns) - set(records))
    if missing:
        raise ValueError(f"layers {missing} never called their attention function; cannot distil their scorers")
    return records


# --- the loss ---------------------------------------------------------------------------------------------------


def layer_loss(logits: torch.Tensor, record: LayerRecord, topk: int, coverage_weight: float = 0.0
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """KL(true mass over the competing tiles || softmax of the logits over them), weighted per (query tile, head)
    by the mass at stake; plus ``coverage_weight`` x (1 - the share of it the soft SPARSEK mask of k tiles covers)."""
    from hf_sparsek.sparsek_topk import sparsek_topk

    competing = record.competing.expand_as(logits)
    at_stake = (record.mass * competing).sum(-1)  # (B, H, n_q)
    rows = at_stake > 1e-6
    if not bool(rows.any()):
        return logits.sum() * 0.0, {"kl": 0.0, "soft_coverage": 0.0}
    target = torch.where(competing, record.mass, 0.0) / at_stake.clamp(min=1e-12).unsqueeze(-1)
    log_q = torch.log_softmax(logits.masked_fill(~competing, -1e9), dim=-1)
    kl = torch.where(competing & (target > 0), target * (torch.log(target.clamp(min=1e-12)) - log_q), 0.0).sum(-1)
    weight = torch.where(rows, at_stake, 0.0)
    weight = weight / weight.sum()
    loss = (kl * weight).sum()
    soft = sparsek_topk(logits.masked_fill(~competing, -1e4).double(), topk).float()
    covered = ((soft * target).sum(-1) * weight).sum()
    if coverage_weight:
        loss = loss + coverage_weight * (1.0 - covered)
    return loss, {"kl": float((kl * weight).sum().detach()), "soft_coverage": float(covered.detach())}


def selector_loss(selector: LearnedSelector, records: dict[int, LayerRecord], patterns: dict[int, Any],
                  coverage_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean of :func:`layer_loss` over the layers of one window."""
    total, stats = 0.0, {"kl": 0.0, "soft_coverage": 0.0}
    for layer, record in records.items():
        pattern = patterns[layer]
        kb = torch.arange(record.mass.shape[3], device=record.mass.device)
        logits = selector.scorer(layer)(record.q_feat, record.k_feat, record.qb, kb)
        loss, parts = layer_loss(logits, record, pattern.topk_blocks, coverage_weight)
        total = total + loss
        for name, value in parts.items():
            stats[name] += value / len(records)
    return total / len(records), stats


# --- held-out recall ----------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_recall(selector: LearnedSelector, initial: LearnedSelector, records: list[dict[int, LayerRecord]],
                   patterns: dict[int, Any], library: tuple[str, ...] = ("mass", "meanpool")) -> dict[str, Any]:
    """The attention mass each selector covers at the same budget, mean over windows, layers and KV heads.

    ``static``: the pattern's sink and window alone, token-exact (``eval.selection_recall.coverage``). The budgeted
    selectors choose ``topk_blocks`` whole competing tiles, so their coverage is the static one plus the exact mass
    the static part leaves in the chosen tiles (their gain): ``oracle`` (the best by true gain), ``learned``,
    ``untrained`` (the initial scorer). ``library`` names the package's training-free selectors, measured
    token-exact on the index the op builds for them (they may spend budget on tiles the window already visits).
    Densities: attended pairs over causal pairs, mean.
    """
    from hf_sparsek.eval.selection_recall import attended_fraction, coverage
    from hf_sparsek.ops import build_index_for

    cov: dict[str, list[float]] = {}
    dens: dict[str, list[float]] = {}
    per_layer: dict[str, dict[int, list[float]]] = {}

    def add(name: str, layer: int, value: float, density: float) -> None:
        cov.setdefault(name, []).append(value)
        dens.setdefault(name, []).append(density)
        per_layer.setdefault(name, {}).setdefault(layer, []).append(value)

    for window in records:
        for layer, record in window.items():
            q, k, scale = record.qk
            pattern = patterns[layer]
            block, length = pattern.block_size, q.shape[2]
            static_index = build_index_for(q, k, pattern.replace(topk_blocks=None, selector=None))
            static = float(coverage(q, k, static_index, scale, dtype=torch.float32).mean())
            add("static", layer, static, float(attended_fraction(static_index).mean()))
            kb = torch.arange(record.mass.shape[3], device=q.device)
            rows = (length - record.qb * block).clamp(max=block).float()
            weight = (rows / length).view(1, 1, -1, 1)
            choices = {"oracle": hard_topk_tiles(record.mass, record.competing, pattern.topk_blocks, kb)}
            for name, chosen in (("learned", selector), ("untrained", initial)):
                logits = chosen.scorer(layer)(record.q_feat, record.k_feat, record.qb, kb)
                choices[name] = hard_topk_tiles(logits, record.competing, pattern.topk_blocks, kb)
            for name, tiles in choices.items():
                # -1 (no tile) goes to a spare last column, dropped: clamped to 0 it overwrote tile 0's pick
                spare = torch.nn.functional.pad(torch.zeros_like(record.mass), (0, 1))
                slot = torch.where(tiles >= 0, tiles.long(), record.mass.shape[-1])
                picked = spare.scatter_(-1, slot, 1.0)[..., :-1]
                gain = float((record.mass * picked * weight).sum((-1, -2)).mean())
                index = build_index_for(q, k, pattern.replace(selector="learned"), selected_tiles=tiles)
                add(name, layer, static + gain, float(attended_fraction(index).mean()))
            for name in library:
                try:
                    index = build_index_for(q, k, pattern.replace(selector=name))
                except (ValueError, ImportError, NotImplementedError) as err:
                    print(f"selector {name!r} did not run: {err}", file=sys.stderr)
                    continue
                add(name, layer, float(coverage(q, k, index, scale, dtype=torch.float32).mean()),
                    float(attended_fraction(index).mean()))

    def mean(values: list[float]) -> float:
        return sum(values) / max(1, len(values))

    return {
        "coverage": {name: mean(v) for name, v in cov.items()},
        "density": {name: mean(v) for name, v in dens.items()},
        "coverage_per_layer": {name: {str(layer): mean(v) for layer, v in sorted(rows.items())}
                               for name, rows in per_layer.items()},
    }


# --- the run ------------------------------------------------------------------------------------------------------


def _layer_patterns(model: Any, pattern: Any) -> tuple[dict[int, Any], Any]:
    """{layer: pattern} of the full-attention layers whose pattern has a top-k budget, and the ModelSparsity with
    selector "learned" on every budgeted pattern."""
    from hf_sparsek.model_defaults import layer_kinds, resolve_layer_pattern, resolve_pattern

    if pattern is None:  # a model whose own pattern already selects with a learned scorer keeps it (a re-fit)
        import hf_sparsek

        own = uses_learned_selector(model.config)
        pattern = hf_sparsek.model_sparsity(model.config) if own else DEFAULT_PATTERN
    sparsity = resolve_pattern(pattern)
    if sparsity.default.topk_blocks is None and not any("topk_blocks" in o for o in sparsity.layer_overrides.values()):
        raise ValueError(f"the learned selector fills a top-k budget, but pattern {pattern!r} has no topk_blocks; "
                         "give one, e.g. '{\"sink_tokens\": 64, \"window\": 256, \"topk_blocks\": 4, "
                         "\"block_size\": 64}'")
    learned_default = sparsity.default
    if learned_default.topk_blocks is not None:
        learned_default = learned_default.replace(selector="learned", mass_threshold=None)
    overrides = {layer: ({**o, "selector": "learned", "mass_threshold": None} if
                         (o.get("topk_blocks", sparsity.default.topk_blocks) is not None) else o)
                 for layer, o in sparsity.layer_overrides.items()}
    sparsity = sparsity.replace(default=learned_default, layer_overrides=overrides)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kinds = layer_kinds(config)
    patterns = {}
    for layer in range(config.num_hidden_layers):
        kind = kinds[layer] if layer < len(kinds) else None
        if kind == "sliding_attention":
            continue
        p = resolve_layer_pattern(sparsity, layer, kind, None)
        if p.topk_blocks is not None:
            patterns[layer] = p
    if not patterns:
        raise ValueError("no full-attention layer of this model has a top-k budget under this pattern")
    blocks = {p.block_size for p in patterns.values()}
    if len(blocks) != 1:
        raise ValueError(f"the learned selector uses one block size for all layers; the pattern has {sorted(blocks)}")
    return patterns, sparsity


def _windows(docs: list[list[int]], seq_len: int, bos: int | None = None) -> list[list[int]]:
    """Consecutive windows of ``seq_len`` tokens from each document; with ``bos``, each is ``bos`` + the next
    ``seq_len - 1`` tokens."""
    if bos is None:
        return [d[i : i + seq_len] for d in docs for i in range(0, len(d) - seq_len + 1, seq_len)]
    n = seq_len - 1
    return [[bos, *d[i : i + n]] for d in docs for i in range(0, len(d) - n + 1, n)]


def _log(path: Path, entry: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


@dataclass
class DistillResult:
    """What :func:`distill` returns: the metrics (also in ``metrics.json``), the trained selector (attached to the
    model) and the frozen model."""

    metrics: dict[str, Any]
    selector: LearnedSelector
    model: Any


def _start_from(selector: LearnedSelector, path: str) -> None:
    """Load the scorer at ``path`` into ``selector`` (warm start); ValueError, naming both, when they differ."""
    start = load_selector(path)
    if start.meta() != selector.meta():
        raise ValueError(f"--init-scorer {path!r} was made for {start.meta()}, this run's scorer is "
                         f"{selector.meta()}: give the same pattern (layers, block_size), --mode and --query-rows")
    selector.load_state_dict(start.state_dict())


def distill(config: DistillConfig) -> DistillResult:
    """Run one distillation (module docstring); the metrics are also written to ``<output_dir>/metrics.json``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    import hf_sparsek
    from hf_sparsek.finetune.checkpoint import copy_tokenizer
    from hf_sparsek.finetune.data import load_token_documents
    from hf_sparsek.finetune.model import resolve_model_path
    from hf_sparsek.model_support import check_positions

    if not isinstance(config, DistillConfig):
        raise TypeError(f"distill() takes a DistillConfig, got {type(config).__name__}")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not config.cpu else "cpu")
    model_path = resolve_model_path(config.model)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=TORCH_DTYPES[config.dtype],
                                                 attn_implementation="sdpa")
    check_positions(model.config, config.seq_len, "seq_len")
    model.to(device).eval().requires_grad_(False)
    patterns, sparsity = _layer_patterns(model, config.pattern)
    block = next(iter(patterns.values())).block_size

    docs = load_token_documents(config.train_data, model_path, model.get_input_embeddings().num_embeddings)
    if config.heldout_docs >= len(docs):
        raise ValueError(f"heldout_docs={config.heldout_docs} leaves no training documents (have {len(docs)})")
    train_docs = docs[: len(docs) - config.heldout_docs]
    eval_docs = docs[len(docs) - config.heldout_docs :] if config.heldout_docs else []
    train_windows = _windows(train_docs, config.seq_len, config.bos_token_id)
    if not train_windows:
        raise ValueError(f"the training documents give no window of {config.seq_len} tokens")
    rng.shuffle(train_windows)
    train_windows = train_windows[: config.train_windows]
    eval_windows = _windows(eval_docs, config.seq_len, config.bos_token_id)[: config.eval_windows]

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT_DIR
    selector = LearnedSelector.for_model(model, block, config.mode, sorted(patterns), config.query_rows).to(device)
    initial = LearnedSelector.for_model(model, block, config.mode, sorted(patterns), config.query_rows).to(device)
    if config.init_scorer is not None:
        _start_from(selector, config.init_scorer)
    optimizer = torch.optim.AdamW(selector.parameters(), lr=config.lr, weight_decay=0.0)
    start_step = 0
    if config.resume and (ckpt / "state.json").is_file():
        saved = load_selector(ckpt)
        if saved.meta() != selector.meta():
            raise ValueError(f"--resume: the checkpoint in {str(ckpt)!r} was made for {saved.meta()}, this run's "
                             f"scorer is {selector.meta()}: resume with the same pattern, --mode and --query-rows, "
                             "or start a new --output-dir")
        selector.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        start_step = json.loads((ckpt / "state.json").read_text())["step"]
        print(f"resuming from step {start_step}", file=sys.stderr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, (s + start_step) / config.steps))))

    t0 = time.time()
    records = [capture_layers(model, torch.tensor([w], device=device), patterns, stride=config.query_tile_stride,
                              step=i, query_rows=config.query_rows)
               for i, w in enumerate(tqdm(train_windows, desc="dense passes (targets)", file=sys.stderr))]
    capture_seconds = time.time() - t0
    metrics: dict[str, Any] = {
        "config": {k: v for k, v in asdict(config).items()}, "device": str(device), "layers": sorted(patterns),
        "pattern": sparsity.to_dict(), "train_windows": len(train_windows), "eval_windows": len(eval_windows),
        "capture_seconds": capture_seconds,
    }
    log_path = out / LOG_FILE
    t1 = time.time()
    losses = []
    bar = tqdm(range(start_step, config.steps), desc="distilling scorer", file=sys.stderr, initial=start_step,
               total=config.steps)
    for step in bar:
        window = records[step % len(records)]
        loss, stats = selector_loss(selector, window, patterns, config.coverage_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(selector.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            entry = {"step": step + 1, "loss": sum(losses[-config.log_every:]) / len(losses[-config.log_every:]),
                     **stats, "lr": scheduler.get_last_lr()[0], "time": time.time()}
            _log(log_path, entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            save_selector(selector, ckpt)
            torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
            (ckpt / "state.json").write_text(json.dumps({"step": step + 1}))
    metrics["train_seconds"] = time.time() - t1
    metrics["losses"] = losses
    del records

    if eval_windows:
        t2 = time.time()
        held = [capture_layers(model, torch.tensor([w], device=device), patterns, keep_qk=True,
                               query_rows=config.query_rows)
                for w in tqdm(eval_windows, desc="held-out recall", file=sys.stderr)]
        library = ("mass", "meanpool") if config.compare_library else ()
        metrics["heldout"] = heldout_recall(selector, initial, held, patterns, library)
        metrics["eval_seconds"] = time.time() - t2
        print(json.dumps(metrics["heldout"]["coverage"], indent=1), file=sys.stderr)
    save_selector(selector, out)
    if config.save_model:
        final = out / FINAL_DIR
        hf_sparsek.set_pattern(model, sparsity)
        model.config.use_cache = True
        model.save_pretrained(final)
        save_selector(selector, final)
        copy_tokenizer(model_path, final)
        metrics["final"] = str(final)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
    attach_selector(model, selector)
    return DistillResult(metrics, selector, model)


__all__ = ["SCORER_FILE", "DistillConfig", "DistillResult", "capture_layers", "distill", "heldout_recall", "layer_loss"]
