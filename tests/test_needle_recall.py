"""Needle recall: the needle's span in a passkey prompt, and the share of the last row's needle attention a pattern
keeps, against masks and softmaxes computed by hand."""

from __future__ import annotations

import pytest
import torch
from hf_sparsek.eval.modeling import PatternSpec
from hf_sparsek.eval.needle import NEEDLE, build_prompt, needle_cases, needle_prompts
from hf_sparsek.eval.needle_recall import last_row_recall, needle_recall, needle_recall_table
from transformers import LlamaConfig, LlamaForCausalLM

from hf_sparsek.masks import exact_token_mask
from hf_sparsek.patterns import ModelSparsity, SparsePattern


def encode(text: str) -> list[int]:
    """A toy tokenizer: one id per character (3..), so spans are easy to check."""
    return [3 + (ord(c) % 90) for c in text]


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_needle_case_span_holds_the_needle(depth: float) -> None:
    cases = needle_cases(encode, [700], [depth], bos=1, trials=3, seed=5)[(700, depth)]
    plain = needle_prompts(encode, [700], [depth], bos=1, trials=3, seed=5)[(700, depth)]
    for case, (prompt, answer) in zip(cases, plain, strict=True):
        start, end = case.needle
        key = "".join(chr(i - 3) for i in case.answer)[1:]  # the toy ids map back to digits (code points 48..57)
        assert case.prompt[start:end] == encode(NEEDLE.format(key=key))
        assert (case.prompt, case.answer) == (prompt, answer)
        assert build_prompt(encode, 700, depth, key, 1) == (prompt, answer)


def _qk(seed: int, hq: int = 4, hkv: int = 2, n: int = 300, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, hq, n, dim, generator=g), torch.randn(1, hkv, n, dim, generator=g)


def _last_row_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(Hq, n) float64 softmax of the last row over every key, written out."""
    group = q.shape[1] // k.shape[1]
    kk = k[0].double().repeat_interleave(group, dim=0)
    scores = (kk @ q[0, :, -1].double().unsqueeze(-1)).squeeze(-1) / q.shape[-1] ** 0.5
    return scores.softmax(-1)


@pytest.mark.parametrize("needle", [(40, 60), (100, 120), (230, 250)])
def test_static_window_keeps_exactly_its_token_mask(needle: tuple[int, int]) -> None:
    q, k = _qk(0)
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=64, min_sparse_len=0)
    got = last_row_recall(q, k, pattern, needle)
    probs = _last_row_probs(q, k)
    mask = exact_token_mask(pattern, 300)[0, 0, -1]  # the last row's allowed keys
    s, e = needle
    torch.testing.assert_close(got["needle_mass"], probs[:, s:e].sum(-1))
    torch.testing.assert_close(got["needle_covered"], (probs * mask)[:, s:e].sum(-1))
    torch.testing.assert_close(got["row_kept"], (probs * mask).sum(-1))
    if e <= 64:  # inside the sink: all of it kept
        torch.testing.assert_close(got["needle_covered"], got["needle_mass"])
    if 64 <= s and e <= 300 - 64:  # between the sink and the window: none of it
        assert float(got["needle_covered"].abs().max()) == 0.0
    assert float(got["needle_mass"].min()) > 0


def _steered(n: int = 320, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Query heads 0 and 1 share KV head 0: head 0 reads keys 70..89 (tile 1), head 1 reads keys 200..239 (tile 3)
    more strongly, so one tile for the pair goes to head 1; heads 2 and 3 (KV head 1) are random."""
    q, k = _qk(1, n=n, dim=dim)
    a, b = torch.zeros(dim), torch.zeros(dim)
    a[0], b[1] = 1.0, 1.0
    q[0, 0] = 6.0 * a + 0.1 * q[0, 0]
    q[0, 1] = 12.0 * b + 0.1 * q[0, 1]
    k[0, 0] = 0.1 * k[0, 0]
    k[0, 0, 70:90] += 3.0 * a
    k[0, 0, 200:240] += 3.0 * b
    return q, k


def test_topk_selection_per_kv_group_loses_what_per_query_head_keeps() -> None:
    q, k = _steered()
    grouped = SparsePattern(block_size=64, sink_tokens=0, window=16, topk_blocks=1, selector="oracle",
                            min_sparse_len=0)
    per_head = grouped.replace(per_query_head=True)
    needle = (70, 90)
    g = last_row_recall(q, k, grouped, needle)
    h = last_row_recall(q, k, per_head, needle)
    assert float(g["needle_mass"][0]) > 0.5  # head 0 reads the needle
    assert float(g["needle_covered"][0]) == 0.0  # the group's one tile went to head 1's keys
    torch.testing.assert_close(h["needle_covered"][0], h["needle_mass"][0])  # its own tile keeps it
    assert float(h["row_kept"][1]) > 0.5


def test_dense_and_full_window_keep_everything() -> None:
    q, k = _qk(2, n=200)
    for pattern in (SparsePattern(block_size=64), SparsePattern(block_size=64, sink_tokens=0, window=256,
                                                                min_sparse_len=0)):
        got = last_row_recall(q, k, pattern, (10, 30))
        torch.testing.assert_close(got["needle_covered"], got["needle_mass"])
        torch.testing.assert_close(got["row_kept"], torch.ones(4, dtype=torch.float64))


def test_last_row_recall_refuses_bad_inputs() -> None:
    q, k = _qk(3, n=100)
    pattern = SparsePattern(block_size=64, sink_tokens=64, window=64, min_sparse_len=0)
    with pytest.raises(ValueError, match="not inside"):
        last_row_recall(q, k, pattern, (90, 120))
    with pytest.raises(ValueError, match="not inside"):
        last_row_recall(q, k, pattern, (30, 30))
    with pytest.raises(ValueError, match=r"\(1, heads, length, dim\)"):
        last_row_recall(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), pattern, (10, 20))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        last_row_recall(q[:, :3], k, pattern, (10, 20))


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def test_needle_recall_on_a_model() -> None:
    model = _tiny_llama()
    cases = needle_cases(encode, [400], [0.2, 0.9], bos=1, trials=2, seed=0)
    window = SparsePattern(block_size=64, sink_tokens=64, window=64, min_sparse_len=0)
    wide = SparsePattern(block_size=64, sink_tokens=0, window=512, min_sparse_len=0)
    topk = SparsePattern(block_size=64, sink_tokens=64, window=64, topk_blocks=1, min_sparse_len=0)
    specs = [PatternSpec("dense", None), PatternSpec("window", ModelSparsity(default=window)),
             PatternSpec("wide", ModelSparsity(default=wide)), PatternSpec("topk", ModelSparsity(default=topk))]
    rows = needle_recall(model, cases, specs)
    assert {r["pattern"] for r in rows} == {"window", "wide", "topk"}
    layers = [r for r in rows if r["layer"] is not None]
    summary = [r for r in rows if r["layer"] is None]
    assert len(layers) == 3 * 2 * 2 and len(summary) == 3 * 2
    for r in layers:
        assert r["trials"] == 2 and len(r["needle_mass"]) == len(r["needle_kept"]) == 4
        assert all(0.0 <= x <= 1.0 + 1e-9 for x in r["needle_kept"] + r["row_kept"] + r["needle_mass"])
    for r in summary:
        assert len(r["trial_kept"]) == 2 and 0.0 <= r["needle_kept"] <= 1.0 + 1e-9
        if r["pattern"] == "wide":
            assert r["needle_kept"] == pytest.approx(1.0)
    # the needle at depth 0.2 of 400 tokens lies between the sink and the window of the last row
    win = next(r for r in summary if r["pattern"] == "window" and r["depth"] == 0.2)
    assert win["needle_kept"] == 0.0
    needle_rows = [{"pattern": "window", "length": 400, "depth": 0.2, "passed": [True, False]}]
    table = needle_recall_table(rows, needle_rows)
    assert "0.000 (1) / 0.000 (1)" in table and "| wide | 400 | 0.9 |" in table
    with pytest.raises(ValueError, match="other than 'dense'"):
        needle_recall(model, cases, specs[:1])


def test_needle_recall_on_the_sparse_models_own_activations() -> None:
    """activations="sparse": each pattern is scored on the q and k its own sparse forward computes. Layer 0's q and
    k come before any attention (equal to the dense forward's); later layers' follow the sparse layers below; a
    pattern that keeps every pair gives the dense figures everywhere."""
    model = _tiny_llama()
    cases = needle_cases(encode, [400], [0.2], bos=1, trials=2, seed=0)
    window = SparsePattern(block_size=64, sink_tokens=64, window=64, min_sparse_len=0)
    wide = SparsePattern(block_size=64, sink_tokens=0, window=512, min_sparse_len=0)
    specs = [PatternSpec("window", ModelSparsity(default=window)), PatternSpec("wide", ModelSparsity(default=wide))]
    dense = {(r["pattern"], r["layer"]): r for r in needle_recall(model, cases, specs)}
    own = {(r["pattern"], r["layer"]): r for r in needle_recall(model, cases, specs, activations="sparse")}
    assert own[("window", 1)]["activations"] == "sparse" and dense[("window", 1)]["activations"] == "dense"
    for name in ("needle_mass", "needle_kept", "row_kept"):
        assert own[("window", 0)][name] == pytest.approx(dense[("window", 0)][name], rel=1e-5)
        assert own[("wide", 1)][name] == pytest.approx(dense[("wide", 1)][name], rel=1e-5)
    moved = max(abs(a - b) for a, b in zip(own[("window", 1)]["needle_mass"], dense[("window", 1)]["needle_mass"],
                                           strict=True))
    assert moved > 1e-5  # layer 1 reads layer 0's sparse output (a random model: small, far above rounding)
    with pytest.raises(ValueError, match="activations must be one of"):
        needle_recall(model, cases, specs, activations="mixed")
