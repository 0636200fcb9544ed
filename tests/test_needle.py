"""The passkey checks: ``generate`` is greedy ``model.generate`` with its cache, ``forward`` one teacher-forced pass."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hf_sparsek.eval.modeling import PatternSpec, apply_pattern
from hf_sparsek.eval.needle import (
    ANSWER_CHECKS,
    answer_prefix,
    check_answer,
    greedy_generates,
    greedy_matches,
    mcnemar_exact_p,
    paired_with_dense,
    parse_answer_checks,
    run_needle_prompts,
)
from hf_sparsek.eval.report import needle_table
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_sparsek.patterns import ModelSparsity, SparsePattern

CPU = torch.device("cpu")
TOPK = SparsePattern(block_size=64, sink_tokens=64, window=64, topk_blocks=1, min_sparse_len=0)
WINDOW = SparsePattern(block_size=64, sink_tokens=64, window=64, min_sparse_len=0)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 61, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens, each from a full forward over everything so far (no cache)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@torch.inference_mode()
def greedy_by_cache_loop(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from one prefill and single-token decode steps through a DynamicCache, written out by hand."""
    cache = DynamicCache(config=model.config)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.25 renamed
    out = model(torch.tensor([prompt]), use_cache=True, **{name: cache})
    toks = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(torch.tensor([[toks[-1]]]), use_cache=True, **{name: cache})
        toks.append(int(out.logits[0, -1].argmax()))
    return toks


@pytest.mark.parametrize("pattern", [None, WINDOW], ids=["dense", "window"])
def test_both_checks_accept_the_greedy_answer_and_reject_a_changed_one(pattern: SparsePattern | None) -> None:
    model = tiny_model()
    apply_pattern(model, PatternSpec("p", None if pattern is None else ModelSparsity(default=pattern)))
    for seed in range(3):
        prompt = _prompt(301 + 17 * seed, seed)
        answer = greedy_by_recompute(model, prompt, 4)
        wrong = answer[:-1] + [(answer[-1] + 1) % 61]
        for check in ANSWER_CHECKS:
            assert check_answer(model, prompt, answer, CPU, check), (check, seed)
            assert not check_answer(model, prompt, wrong, CPU, check), (check, seed)


def test_generate_check_follows_decode_steps_with_dynamic_selection() -> None:
    """With top-k selection a decode step chooses tiles for its own row, a prefill per 64-query tile: the generate
    check must follow the decode steps, and on some prompts it then differs from the teacher-forced check."""
    differ = 0
    for model_seed in range(4):
        model = tiny_model(model_seed)
        apply_pattern(model, PatternSpec("topk", ModelSparsity(default=TOPK)))
        for seed in range(6):
            prompt = _prompt(333 + 29 * seed, 10 + seed)
            answer = greedy_by_cache_loop(model, prompt, 5)
            assert greedy_generates(model, prompt, answer, CPU), (model_seed, seed)
            assert not greedy_generates(model, prompt, answer[:2] + [(answer[2] + 1) % 61] + answer[3:], CPU)
            differ += not greedy_matches(model, prompt, answer, CPU)
    assert differ > 0


@pytest.mark.parametrize("check", ANSWER_CHECKS)
def test_answer_prefix_counts_the_leading_right_tokens(check: str) -> None:
    """The right answer gives its length; a wrong token at position i gives i (the tokens after it are not
    counted); the needle rows record it per trial."""
    model = tiny_model()
    apply_pattern(model, PatternSpec("window", ModelSparsity(default=WINDOW)))
    prompt = _prompt(301, 4)
    answer = greedy_by_recompute(model, prompt, 4)
    assert answer_prefix(model, prompt, answer, CPU, check) == 4
    for i in range(4):
        wrong = answer[:i] + [(answer[i] + 1) % 61] + answer[i + 1:]
        assert answer_prefix(model, prompt, wrong, CPU, check) == i
    rows = run_needle_prompts(model, {(301, 0.5): [(prompt, answer), (prompt, answer[:2] + [(answer[2] + 1) % 61]
                                                                          + answer[3:])]},
                              [PatternSpec("window", ModelSparsity(default=WINDOW))], CPU, check)
    assert rows[0]["correct_prefix"] == [4, 2] and rows[0]["passed"] == [True, False]
    assert rows[0]["answer_tokens"] == 4


def test_rows_record_the_check_and_bad_checks_are_refused() -> None:
    model = tiny_model()
    prompts = {(320, 0.5): [(_prompt(318, 3), [5, 7])]}
    spec = PatternSpec("window", ModelSparsity(default=WINDOW))
    rows = run_needle_prompts(model, prompts, [spec], CPU, "forward")
    rows += run_needle_prompts(model, prompts, [spec], CPU, "generate")
    assert [r["answer_check"] for r in rows] == ["forward", "generate"]
    assert rows[0]["accuracy"] == rows[1]["accuracy"]
    with pytest.raises(ValueError, match="answer_check must be one of"):
        run_needle_prompts(model, prompts, [spec], CPU, "sample")
    with pytest.raises(ValueError, match="answer_check must be one of"):
        check_answer(model, prompts[(320, 0.5)][0][0], [5], CPU, "beam")


def test_the_cli_offers_exactly_the_answer_checks() -> None:
    from hf_sparsek.cli import build_parser

    args = build_parser().parse_args(["eval", "needle", "--answer-check", "forward"])
    assert args.answer_check == "forward"
    assert build_parser().parse_args(["eval", "needle"]).answer_check == ANSWER_CHECKS[0] == "generate"
    for check in ANSWER_CHECKS:
        assert build_parser().parse_args(["eval", "needle", "--answer-check", check]).answer_check == check
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "needle", "--answer-check", "sample"])


def test_scripts_parse_a_comma_list_of_checks() -> None:
    assert parse_answer_checks("generate, forward") == ["generate", "forward"]
    for bad in ("sample", "generate,beam", ""):
        with pytest.raises(ValueError, match="choose one or more of"):
            parse_answer_checks(bad)


def test_needle_table_shows_accuracy_and_first_token_share() -> None:
    from hf_sparsek.eval.report import needle_table

    rows = [{"pattern": "p", "answer_check": "generate", "length": 1024, "depth": 0.1, "accuracy": 0.5,
             "density": 0.25, "correct_prefix": [5, 0, 5, 3]},
            {"pattern": "p", "answer_check": "generate", "length": 1024, "depth": 0.9, "accuracy": 1.0,
             "density": 0.25}]  # an older row without prefixes
    table = needle_table(rows)
    assert "| p | generate | 1024 | 0.250 | 0.50 (first 0.75) | 1.00 |" in table


def _binomial_two_sided(k: int, n: int) -> float:
    """The exact two-sided binomial test at 1/2 by summing every outcome no likelier than k (the definition)."""
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-12)))


@pytest.mark.parametrize("lost,gained", [(0, 0), (1, 0), (6, 0), (4, 1), (2, 7), (5, 5), (13, 2), (0, 9)])
def test_mcnemar_p_is_the_binomial_test_of_the_discordant_pairs(lost: int, gained: int) -> None:
    p = mcnemar_exact_p(lost, gained)
    assert p == pytest.approx(_binomial_two_sided(lost, lost + gained) if lost + gained else 1.0)
    assert p == mcnemar_exact_p(gained, lost)
    with pytest.raises(ValueError, match="counts"):
        mcnemar_exact_p(-1, 2)


def test_paired_with_dense_pairs_trials_by_prompt_and_the_table_shows_it() -> None:
    def row(pattern: str, passed: list[bool], depth: float = 0.5, check: str = "generate") -> dict:
        return {"pattern": pattern, "length": 512, "depth": depth, "accuracy": sum(passed) / len(passed),
                "trials": len(passed), "passed": passed, "correct_prefix": [5 * p for p in passed],
                "answer_check": check, "density": 0.5}

    dense = [True] * 8 + [False] * 2
    sparse = [False] * 6 + [True] * 2 + [True, False]  # lost 6, gained 1 (the same accuracy would hide nothing)
    rows = [row("dense", dense), row("sparse", sparse), row("sparse", dense, depth=0.9),
            row("sparse", sparse, check="forward"), {**row("old", sparse), "passed": None}]
    paired = paired_with_dense(rows)
    assert [(p["pattern"], p["depth"], p["lost"], p["gained"]) for p in paired] == [("sparse", 0.5, 6, 1)]
    assert paired[0]["p_value"] == pytest.approx(mcnemar_exact_p(6, 1)) and paired[0]["p_value"] < 0.13
    table = needle_table(rows)
    assert f"-6 +1, p {mcnemar_exact_p(6, 1):.2g}" in table
    assert table.count(", p ") == 1  # no reference at depth 0.9 / the forward check / without per-trial results
