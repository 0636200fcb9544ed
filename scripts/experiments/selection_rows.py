"""What closes the mass selector's perplexity gap to the oracle? Tile-mass estimates compared by perplexity.

The ``"mass"`` selector scores a query tile by its mean query against each key tile's max / min keys (Quest's bound)
and keeps the same tiles for all 64 rows. Its recall is close to the oracle's, yet perplexity is not (SmolLM2-135M
4K: mass +5.60%, oracle +3.30%). Candidates: ``perrow``: the bound per query row, a softmax per row, then the mean
over the tile's rows and the group's heads (``rows8``: every 8th row); ``probeN``: exact scores of every N-th row
(N = 64: the last row of each tile, MInference-style probing; the library's selector ``"probe"`` with
``probe_stride`` N); ``oracle``: every row; ``mix16``: half probe16, half mass; ``rerankNxF``: Quest keeps F x top-k
candidates and every N-th row's exact softmax over them ranks (the probe on a reduced key set); ``rowmaxN``: the max,
not the mean, over the sampled rows of a tile (a tile one row needs strongly ranks high); ``moment*`` /
``meanq_exact`` / ``momentrowsN`` / ``moment2``: second-order (Gaussian) estimates of each key tile's log-sum-exp
from its keys' mean and variance, with the tile's mean query, its exact ceiling, per sampled row, or with the
queries' spread (docs/evaluation.md, "Second-order estimates"). Everything else (competition, budget) is the mass
selector's.

Lab code: it swaps ``hf_sparsek.selection.mass.tile_mass`` for the candidate while its rows run (the CPU path of the
selector calls it), then restores it. Same held-out tokens as ``scripts/gpu_learned.py --cpu --seq-len 4096``; the
whole study (22 rows, about 45 minutes on 2 CPU cores)::

    python -m scripts.experiments.selection_rows --tokens .carry/learned/tokens.pt.xz --study --out /tmp/rows
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator

import torch

STUDY = [  # (pattern, candidates) of --study
    ('{"block_size": 64, "sink_tokens": 64, "window": 256, "topk_blocks": 3}',
     "mass,perrow,rows8,probe64,probe32,probe16,probe8,probe4,oracle,mix16,rerank16x2,rerank16x4,rerank4x4,"
     "rowmax16,rowmax4,rowmax1"),
    ('{"block_size": 64, "sink_tokens": 64, "window": 128, "topk_blocks": 5}', "mass,probe16,probe8,oracle"),
    ('{"block_size": 64, "sink_tokens": 64, "window": 64, "topk_blocks": 6}', "probe16,oracle"),
]


def row_tile_mass(stride: int):
    """A ``tile_mass`` replacement scoring every ``stride``-th query row of each tile (see the module docstring)."""
    from hf_sparsek.selection.mass import pool_tiles, query_valid

    def tile_mass(q, k, grid, block, q_offset, kv_offset, k_seg, scale=None, key_features=None):
        batch, hq, q_len, dim = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        scale = 1.0 / math.sqrt(dim) if scale is None else scale
        if key_features is None:
            _, kmax, kmin = pool_tiles(k, kv_offset, block, None if k_seg is None else k_seg >= 0)
        else:
            d_pad = key_features.shape[-1] // 2
            kmax, kmin = key_features[..., :dim], key_features[..., d_pad: d_pad + dim]
        valid = query_valid(q_len, q_offset, kv_offset, k_seg)
        valid = torch.ones(batch, q_len, dtype=torch.bool, device=q.device) if valid is None else valid
        pos = q_offset + torch.arange(q_len, device=q.device)
        take = (pos % stride == stride - 1) | (pos == q_offset + q_len - 1)  # the last row of each run, and the last
        rows = torch.nonzero(take).flatten()
        qr = q[:, :, rows].float().view(batch, hkv, group, len(rows), dim)
        feats = torch.cat([qr.clamp(min=0), qr.clamp(max=0)], -1)
        keys = torch.cat([kmax, kmin], -1)  # (B, Hkv, n_k, 2D)
        logits = torch.einsum("bhgtd,bhnd->bhgtn", feats, keys) * scale
        kb = kv_offset // block + torch.arange(grid.n_k, device=q.device)
        row_tile = (q_offset % block + rows - 0) // block  # relative query tile of each row
        cand = grid.candidate[:, :, row_tile]  # (B, 1, t, n_k): the tile-level competition of the row's tile
        causal = (kb.view(1, -1) * block <= pos[rows].view(-1, 1))  # the key tile starts at or before the row
        allowed = (cand & causal.view(1, 1, len(rows), -1)).unsqueeze(2)
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0).mean(2)  # (B, Hkv, t, n_k)
        probs = probs * valid[:, rows].view(batch, 1, -1, 1)
        out = torch.zeros(batch, hkv, grid.n_q, grid.n_k, device=q.device)
        out.index_add_(2, row_tile, probs)
        count = torch.zeros(batch, grid.n_q, device=q.device).index_add_(1, row_tile, valid[:, rows].float())
        return out / count.clamp(min=1).view(batch, 1, grid.n_q, 1)

    return tile_mass


def probe_tile_mass(stride: int):
    """A ``tile_mass`` replacement from exact scores: every ``stride``-th query row's true softmax over the causal
    real keys, summed per key tile, mean over those rows and the group's heads (MInference-style probing; stride 1
    is the oracle's own estimate). The library's selector ``"probe"`` is this at stride 16."""
    from hf_sparsek.selection.oracle import exact_tile_mass
    from hf_sparsek.selection.probe import probe_rows

    def tile_mass(q, k, grid, block, q_offset, kv_offset, k_seg, scale=None, key_features=None):
        rows = probe_rows(q.shape[2], q_offset, stride, q.device)
        return exact_tile_mass(q, k, block, q_offset, kv_offset, k_seg, scale, rows=rows)

    return tile_mass


def mixed_tile_mass(stride: int, weight: float = 0.5):
    """``weight`` x the probe estimate at ``stride`` + (1 - ``weight``) x the mass selector's Quest estimate: the
    sampled rows' exact mass, with the bound's view of every row's mean for the rows the sample misses."""
    import hf_sparsek.selection.mass as mass

    quest = mass.tile_mass  # the original, taken before any swap
    probe = probe_tile_mass(stride)

    def tile_mass(q, k, grid, block, q_offset, kv_offset, k_seg, scale=None, key_features=None):
        return (weight * probe(q, k, grid, block, q_offset, kv_offset, k_seg, scale)
                + (1 - weight) * quest(q, k, grid, block, q_offset, kv_offset, k_seg, scale, key_features))

    return tile_mass


def rerank_tile_mass(stride: int, factor: int, topk: int):
    """Two stages: the mass selector's Quest estimate keeps ``factor`` x ``topk`` candidate tiles per query tile
    (beside the static ones); every ``stride``-th row's exact softmax over the keys of those tiles only (the
    candidates and the static tiles: a restricted normaliser) ranks them. The probe's work shrinks from all causal
    keys to about ``(factor x topk + static tiles) x block`` keys per row."""
    import hf_sparsek.selection.mass as mass
    from hf_sparsek.selection.mass import query_valid
    from hf_sparsek.selection.probe import probe_rows

    quest = mass.tile_mass

    def tile_mass(q, k, grid, block, q_offset, kv_offset, k_seg, scale=None, key_features=None):
        est = quest(q, k, grid, block, q_offset, kv_offset, k_seg, scale, key_features)
        batch, hq, q_len, dim = q.shape
        hkv, kv_len = k.shape[1], k.shape[2]
        group = hq // hkv
        scale = 1.0 / math.sqrt(dim) if scale is None else scale
        compete = grid.candidate & ~grid.static_full
        score = est.masked_fill(~compete, -1.0)
        top = score.topk(min(factor * topk, grid.n_k), -1)
        keep = torch.zeros_like(est, dtype=torch.bool).scatter_(-1, top.indices, top.values >= 0)
        keep = keep | grid.static_full  # (B, Hkv, n_q, n_k)
        rows = probe_rows(q_len, q_offset, stride, q.device)
        row_tile = (q_offset % block + rows) // block
        k_shift = kv_offset % block
        key_tile = (k_shift + torch.arange(kv_len, device=q.device)) // block
        allowed = keep[:, :, row_tile][..., key_tile]  # (B, Hkv, R, kv_len)
        q_pos = q_offset + rows
        k_pos = kv_offset + torch.arange(kv_len, device=q.device)
        allowed = allowed & (k_pos.view(1, -1) <= q_pos.view(-1, 1)).view(1, 1, len(rows), kv_len)
        if k_seg is not None:
            allowed = allowed & (k_seg >= 0).view(batch, 1, 1, kv_len)
        qr = q[:, :, rows].float().view(batch, hkv, group, len(rows), dim)
        logits = torch.einsum("bhgtd,bhsd->bhgts", qr, k.float()) * scale
        probs = logits.masked_fill(~allowed.unsqueeze(2), float("-inf")).softmax(-1).nan_to_num(0.0)
        back = grid.n_k * block - k_shift - kv_len
        per = torch.nn.functional.pad(probs, (k_shift, back)).view(*probs.shape[:4], grid.n_k, block).sum(-1).mean(2)
        valid = query_valid(q_len, q_offset, kv_offset, k_seg)
        valid = torch.ones(batch, q_len, dtype=torch.bool, device=q.device) if valid is None else valid
        per = per * valid[:, rows].view(batch, 1, -1, 1)
        out = torch.zeros_like(est).index_add_(2, row_tile, per)
        count = torch.zeros(batch, grid.n_q, device=q.device).index_add_(1, row_tile, valid[:, rows].float())
        return out / count.clamp(min=1).view(batch, 1, grid.n_q, 1)

    return tile_mass


def rowmax_tile_mass(stride: int, chunk_rows: int = 256):
    """Every ``stride``-th row's exact softmax (and the call's last row), summed per key tile and averaged over the
    group's heads, as the probe; but a query tile's score for a key tile is the MAX over its sampled rows, not the
    mean: a tile one row needs strongly (a copied far token, a retrieved passkey) ranks high even when the tile's
    other rows ignore it. ``stride`` 1: the row-max oracle."""
    from hf_sparsek.selection.mass import query_valid
    from hf_sparsek.selection.probe import probe_rows

    def tile_mass(q, k, grid, block, q_offset, kv_offset, k_seg, scale=None, key_features=None):
        batch, hq, q_len, dim = q.shape
        hkv, kv_len = k.shape[1], k.shape[2]
        group = hq // hkv
        scale = 1.0 / math.sqrt(dim) if scale is None else scale
        rows = probe_rows(q_len, q_offset, stride, q.device)
        valid = query_valid(q_len, q_offset, kv_offset, k_seg)
        valid = torch.ones(batch, q_len, dtype=torch.bool, device=q.device) if valid is None else valid
        k_shift = kv_offset % block
        back = grid.n_k * block - k_shift - kv_len
        k_pos = kv_offset + torch.arange(kv_len, device=q.device)
        out = torch.zeros(batch, hkv, grid.n_q, grid.n_k, device=q.device)
        for r0 in range(0, len(rows), chunk_rows):
            r = rows[r0: r0 + chunk_rows]
            qr = q[:, :, r].float().view(batch, hkv, group, len(r), dim)
            logits = torch.einsum("bhgtd,bhsd->bhgts", qr, k.float()) * scale
            allowed = (k_pos.view(1, -1) <= (q_offset + r).view(-1, 1)).view(1, 1, 1, len(r), kv_len)
            if k_seg is not None:
                allowed = allowed & (k_seg >= 0).view(batch, 1, 1, 1, kv_len)
            probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
            per = torch.nn.functional.pad(probs, (k_shift, back)).view(*probs.shape[:4], grid.n_k, block)
            per = per.sum(-1).mean(2) * valid[:, r].view(batch, 1, -1, 1)  # (B, Hkv, t, n_k)
            tile = (q_offset % block + r) // block
            out.scatter_reduce_(2, tile.view(1, 1, -1, 1).expand_as(per), per, reduce="amax")
        return out

    return tile_mass


def _key_moments(k, kv_offset: int, block: int, k_seg, n_k: int):
    """Per key tile of k (B, Hkv, L, D) over its real keys: mean ``mu``, variance ``sigma^2``, second moment
    ``mu^2 + sigma^2`` (B, Hkv, n_k, D) and ``log n`` (B, 1, n_k; n real keys, at least 1), as the moment candidates
    read them."""
    from hf_sparsek.selection.mass import pool_tiles

    valid = None if k_seg is None else k_seg >= 0
    batch, kv_len = k.shape[0], k.shape[2]
    ok = torch.ones(batch, kv_len, dtype=torch.bool) if valid is None else valid
    k_shift = kv_offset % block
    okp = torch.nn.functional.pad(ok, (k_shift, n_k * block - k_shift - kv_len), value=False)
    log_n = okp.view(batch, 1, n_k, block).sum(-1).float().clamp(min=1).log()
    mean, _, _ = pool_tiles(k, kv_offset, block, valid)
    square, _, _ = pool_tiles(k.float() ** 2, kv_offset, block, valid)
    return mean, (square - mean**2).clamp(min=0), square, log_n


def moment_row_tile_mass(stride: int, variance: float = 0.5):
    """The second-order estimate of :func:`moment_tile_mass` per query row (every ``stride``-th row and the call's
    last), a softmax per row over the row's tile competition, then the mean over those rows and the group's heads
    (the probe's averaging with the moment estimate in place of exact scores)."""
    from hf_sparsek.selection.mass import query_valid
    from hf_sparsek.selection.probe import probe_rows

    def tile_mass(q, k, grid, block, q_offset, kv_offset, k_seg, scale=None, key_features=None):
        batch, hq, q_len, dim = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        scale = 1.0 / math.sqrt(dim) if scale is None else scale
        mean, var, _, log_n = _key_moments(k, kv_offset, block, k_seg, grid.n_k)
        rows = probe_rows(q_len, q_offset, stride, q.device)
        qr = q[:, :, rows].float().view(batch, hkv, group, len(rows), dim)
        logits = (torch.einsum("bhgtd,bhnd->bhgtn", qr, mean) * scale
                  + variance * 0.5 * scale**2 * torch.einsum("bhgtd,bhnd->bhgtn", qr**2, var)
                  + log_n.view(batch, 1, 1, 1, grid.n_k))
        pos = q_offset + rows
        kb = kv_offset // block + torch.arange(grid.n_k, device=q.device)
        row_tile = (q_offset % block + rows) // block
        cand = grid.candidate[:, :, row_tile]
        causal = kb.view(1, -1) * block <= pos.view(-1, 1)
        allowed = (cand & causal.view(1, 1, len(rows), -1)).unsqueeze(2)
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0).mean(2)
        valid = query_valid(q_len, q_offset, kv_offset, k_seg)
        valid = torch.ones(batch, q_len, dtype=torch.bool, device=q.device) if valid is None else valid
        probs = probs * valid[:, rows].view(batch, 1, -1, 1)
        out = torch.zeros(batch, hkv, grid.n_q, grid.n_k, device=q.device).index_add_(2, row_tile, probs)
        count = torch.zeros(batch, grid.n_q, device=q.device).index_add_(1, row_tile, valid[:, rows].float())
        return out / count.clamp(min=1).view(batch, 1, grid.n_q, 1)

    return tile_mass


def moment2_tile_mass(variance: float = 0.5):
    """Both sides' second moments, one estimate per query tile: with the tile's queries spread as a diagonal Gaussian
    (mean ``qbar``, variance ``tau^2`` over its real rows) and the key tile's as ``mu`` / ``sigma^2``,
    ``log E exp(s q . k) ~ s qbar . mu + variance * s^2 / 2 * (qbar^2 . sigma^2 + tau^2 . (mu^2 + sigma^2))`` (plus
    ``log n``); a softmax per query tile and head, then the group mean. The query spread stands in for the rows
    that the tile's mean hides, at the cost of one row per tile."""
    from hf_sparsek.selection.mass import pool_tiles, query_valid

    def tile_mass(q, k, grid, block, q_offset, kv_offset, k_seg, scale=None, key_features=None):
        batch, hq, q_len, dim = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        scale = 1.0 / math.sqrt(dim) if scale is None else scale
        q_ok = query_valid(q_len, q_offset, kv_offset, k_seg)
        qbar, _, _ = pool_tiles(q, q_offset, block, q_ok)
        qsq, _, _ = pool_tiles(q.float() ** 2, q_offset, block, q_ok)
        tau = (qsq - qbar**2).clamp(min=0)
        qbar = qbar.view(batch, hkv, group, grid.n_q, dim)
        tau = tau.view(batch, hkv, group, grid.n_q, dim)
        mean, var, square, log_n = _key_moments(k, kv_offset, block, k_seg, grid.n_k)
        logits = (torch.einsum("bhgmd,bhnd->bhgmn", qbar, mean) * scale
                  + variance * 0.5 * scale**2 * (torch.einsum("bhgmd,bhnd->bhgmn", qbar**2, var)
                                                 + torch.einsum("bhgmd,bhnd->bhgmn", tau, square))
                  + log_n.view(batch, 1, 1, 1, grid.n_k))
        cand = grid.candidate.unsqueeze(2)
        return logits.masked_fill(~cand, float("-inf")).softmax(-1).nan_to_num(0.0).mean(2)

    return tile_mass


def moment_tile_mass(variance: float = 1.0, exact_keys: bool = False):
    """A ``tile_mass`` replacement from the tile's mean query ``qbar`` and a second-order estimate of each key tile's
    log-sum-exp: ``log sum_j exp(s qbar . k_j) ~ log n + s qbar . mu + variance * s^2 / 2 * qbar^2 . sigma^2`` (the
    Gaussian moment-generating function with a diagonal covariance: mean ``mu`` and per-dimension variance
    ``sigma^2`` of the tile's keys, ``n`` real keys), then a softmax per query tile and head over the candidate
    tiles (the mass selector's competition). ``variance`` 0: mean keys only. ``exact_keys``: the exact log-sum-exp
    of ``qbar`` against every key (the ceiling of any key feature scored with the tile's mean query)."""
    from hf_sparsek.selection.mass import pool_tiles, query_valid

    def tile_mass(q, k, grid, block, q_offset, kv_offset, k_seg, scale=None, key_features=None):
        batch, hq, q_len, dim = q.shape
        hkv, kv_len = k.shape[1], k.shape[2]
        group = hq // hkv
        scale = 1.0 / math.sqrt(dim) if scale is None else scale
        qbar, _, _ = pool_tiles(q, q_offset, block, query_valid(q_len, q_offset, kv_offset, k_seg))
        qbar = qbar.view(batch, hkv, group, grid.n_q, dim)
        if exact_keys:
            k_shift = kv_offset % block
            s = torch.einsum("bhgmd,bhsd->bhgms", qbar, k.float()) * scale
            if k_seg is not None:
                s = s.masked_fill((k_seg < 0).view(batch, 1, 1, 1, kv_len), float("-inf"))
            s = torch.nn.functional.pad(s, (k_shift, grid.n_k * block - k_shift - kv_len), value=float("-inf"))
            logits = s.view(*s.shape[:4], grid.n_k, block).logsumexp(-1)
        else:
            mean, var, _, log_n = _key_moments(k, kv_offset, block, k_seg, grid.n_k)
            logits = (torch.einsum("bhgmd,bhnd->bhgmn", qbar, mean) * scale
                      + variance * 0.5 * scale**2 * torch.einsum("bhgmd,bhnd->bhgmn", qbar**2, var)
                      + log_n.view(batch, 1, 1, 1, grid.n_k))
        cand = grid.candidate.unsqueeze(2)
        return logits.masked_fill(~cand, float("-inf")).softmax(-1).nan_to_num(0.0).mean(2)

    return tile_mass


@contextlib.contextmanager
def swapped_tile_mass(fn) -> Iterator[None]:
    import hf_sparsek.selection.mass as mass

    original = mass.tile_mass
    mass.tile_mass = fn
    try:
        yield
    finally:
        mass.tile_mass = original


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", required=True, help="tokens.pt of scripts/gpu_learned.py --make-tokens")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--pattern", default='{"block_size": 64, "sink_tokens": 64, "window": 256, "topk_blocks": 3}')
    ap.add_argument("--candidates", default="mass,perrow,rows8,probe8,probe16,probe64",
                    help="comma-separated: mass, perrow, rows8, probe4/8/16/32/64, oracle (probe1), mix16 (half "
                         "probe16, half mass), rerankNxF (Quest keeps F x top-k candidates, every N-th row's exact "
                         "softmax over them ranks; N 4 or 16, F 2 or 4), rowmaxN (the max over every N-th row's exact "
                         "tile mass, N 1, 4 or 16), moment / moment_half / "
                         "moment0 (the tile mean query against the key tiles' mean and variance: a second-order "
                         "log-sum-exp; variance weight 1, 0.5, 0), meanq_exact (the mean query's exact log-sum-exp), "
                         "momentrowsN (the moment estimate per row, every N-th row, N 1, 8, 16 or 32), moment2 / "
                         "moment2_quarter (both sides' second moments, one estimate per query tile), "
                         "selector_moment (the library's selector \"moment\", stride 8: momentrows8 as built), "
                         "dense")
    ap.add_argument("--study", action="store_true",
                    help="the whole study in one run (overrides --pattern / --candidates): every candidate at "
                         "window 256 + top-3, and oracle / probes / mass at window 128 + top-5 and 64 + top-6")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from hf_sparsek.eval.modeling import PatternSpec
    from hf_sparsek.eval.offline import resolve_model
    from hf_sparsek.eval.ppl import run_ppl
    from transformers import AutoModelForCausalLM

    from hf_sparsek.patterns import as_model_sparsity
    from scripts.common import load_token_file, write_json

    torch.manual_seed(0)
    data = load_token_file(args.tokens)
    docs = [d.tolist() for d in data["docs"].values()]
    held = docs[len(docs) - int(data.get("heldout", 4)):]
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), attn_implementation="sparsek",
                                                 dtype=torch.float32).eval()
    runs = STUDY if args.study else [(args.pattern, args.candidates)]
    rows = []
    for text, candidates in runs:
        pattern = {**json.loads(text), "selector": "mass"}
        topk = pattern["topk_blocks"]
        fns = {"mass": None, "perrow": row_tile_mass(1), "rows8": row_tile_mass(8)}
        fns.update({f"probe{n}": probe_tile_mass(n) for n in (4, 8, 16, 32, 64)})
        fns.update({"oracle": probe_tile_mass(1), "mix16": mixed_tile_mass(16)})
        fns.update({f"rerank{n}x{f}": rerank_tile_mass(n, f, topk) for n in (4, 16) for f in (2, 4)})
        fns.update({f"rowmax{n}": rowmax_tile_mass(n) for n in (1, 4, 16)})
        fns.update({"moment": moment_tile_mass(), "moment0": moment_tile_mass(0.0),
                    "moment_half": moment_tile_mass(0.5), "meanq_exact": moment_tile_mass(exact_keys=True)})
        fns.update({f"momentrows{n}": moment_row_tile_mass(n) for n in (1, 8, 16, 32)})
        fns.update({"moment2": moment2_tile_mass(), "moment2_quarter": moment2_tile_mass(0.25)})
        for name in [c.strip() for c in candidates.split(",") if c.strip()]:
            chosen = {**pattern, "selector": "moment"} if name == "selector_moment" else pattern
            spec = PatternSpec("dense", None) if name == "dense" else PatternSpec(f"{name}: {text}",
                                                                                  as_model_sparsity(chosen))
            start = time.perf_counter()
            with swapped_tile_mass(fns[name]) if fns.get(name) else contextlib.nullcontext():
                result = run_ppl(model, held, [args.seq_len], [spec], torch.device("cpu"), None, args.ppl_tokens)
            rows += [{**r, "candidate": name, "base_pattern": text, "seconds": time.perf_counter() - start}
                     for r in result]
            write_json(os.path.join(args.out, "selection_rows.json"), {"rows": rows})
            print(json.dumps({k: rows[-1][k] for k in ("candidate", "base_pattern", "ppl", "density")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
