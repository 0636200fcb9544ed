"""Passkey (needle-in-a-haystack) retrieval at several lengths and depths, dense vs sparse patterns.

A random 5-digit passkey sentence is hidden at a relative depth of a filler haystack; the prompt ends with a
question. A trial passes when greedy decoding reproduces the passkey. Two checks (``ANSWER_CHECKS``):

* ``"generate"`` (default): ``model.generate`` with its cache, greedy, as a user runs it: the prompt is prefilled in
  one call and each answer token after the first comes from a decode step. This is the check that counts for
  dynamic selection, whose decode steps choose key tiles for their own single query row, while a prefill chooses
  them once per 64-query tile.
* ``"forward"``: one teacher-forced forward over prompt + answer (the argmax at every answer position equals the
  answer token). Identical to greedy generation for dense attention and static (token-position) patterns, cheaper,
  but with dynamic selection the answer rows share their query tile's choice with the question rows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from .modeling import PatternSpec, apply_pattern, density_summary

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


class NeedleCase(NamedTuple):
    """One passkey trial: the prompt ids, the answer ids, and where the needle sentence sits in the prompt
    (``prompt[needle[0]:needle[1]]`` is the encoded needle)."""

    prompt: list[int]
    answer: list[int]
    needle: tuple[int, int]


def build_needle_case(encode: Callable[[str], list[int]], length: int, depth: float, key: str, bos: int | None,
                      filler_ids: list[int] | None = None) -> NeedleCase:
    """A prompt of about ``length`` tokens with the needle at relative ``depth``, its answer and the needle's span."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = ([bos] if bos is not None else []) + encode(INTRO)
    needle = encode(NEEDLE.format(key=key))
    question = encode(QUESTION)
    answer = encode(" " + key)
    filler_ids = encode(FILLER) if filler_ids is None else filler_ids
    room = length - len(head) - len(needle) - len(question) - len(answer)
    if room < len(filler_ids):
        raise ValueError(f"length {length} is too short for a needle prompt (needs > {length - room} tokens)")
    repeats = room // len(filler_ids) + 1
    hay = (filler_ids * repeats)[:room]
    # Put the needle at a sentence boundary of the filler, nearest to the requested depth.
    at = int(round(depth * room / len(filler_ids))) * len(filler_ids)
    at = min(at, room)
    prompt = head + hay[:at] + needle + hay[at:] + question
    start = len(head) + at
    return NeedleCase(prompt, answer, (start, start + len(needle)))


def build_prompt(encode: Callable[[str], list[int]], length: int, depth: float, key: str, bos: int | None,
                 filler_ids: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids of about ``length`` tokens with the needle at relative ``depth``, answer ids)."""
    case = build_needle_case(encode, length, depth, key, bos, filler_ids)
    return case.prompt, case.answer


ANSWER_CHECKS = ("generate", "forward")


def parse_answer_checks(text: str) -> list[str]:
    """A comma list of answer checks (scripts' ``--answer-check``) -> the checks, each one of ``ANSWER_CHECKS``."""
    checks = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in checks if c not in ANSWER_CHECKS]
    if bad or not checks:
        raise ValueError(f"answer checks {bad or text!r}: choose one or more of {list(ANSWER_CHECKS)}")
    return checks


def _leading_matches(got: list[int], answer: list[int]) -> int:
    """How many of ``answer``'s tokens ``got`` reproduces before the first wrong one."""
    n = 0
    for a, b in zip(got, answer, strict=False):
        if a != b:
            break
        n += 1
    return n


@torch.inference_mode()
def generated_prefix(model: Any, prompt: list[int], answer: list[int], device: torch.device) -> int:
    """How many leading tokens of ``answer`` ``model.generate`` (greedy, with its default cache) emits right after
    ``prompt``: 0 = the first answer token (the prompt's last row) is already wrong; ``len(answer)`` = a pass."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    n = len(answer)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         top_p=None, top_k=None, temperature=None, pad_token_id=_pad_id(model))
    return _leading_matches(out[0, len(prompt):].cpu().tolist(), list(answer))


def greedy_generates(model: Any, prompt: list[int], answer: list[int], device: torch.device) -> bool:
    """True when ``model.generate`` (greedy, with its default cache) emits ``answer`` right after ``prompt``."""
    return generated_prefix(model, prompt, answer, device) == len(answer)


def _pad_id(model: Any) -> int:
    """A pad id for generate() (the model's, else its first end-of-sequence id, else 0): batch 1 never pads."""
    cfg = model.generation_config
    for cand in (cfg.pad_token_id, cfg.eos_token_id):
        if isinstance(cand, list):
            cand = cand[0] if cand else None
        if cand is not None:
            return int(cand)
    return 0


@torch.inference_mode()
def matched_prefix(model: Any, prompt: list[int], answer: list[int], device: torch.device) -> int:
    """How many leading tokens of ``answer`` greedy decoding after ``prompt`` gets right, teacher-forced (one forward
    over prompt + answer, last logits only)."""
    ids = torch.tensor([prompt + answer], dtype=torch.long, device=device)
    n = len(answer)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :n]
    return _leading_matches(logits.argmax(-1).cpu().tolist(), list(answer))


def greedy_matches(model: Any, prompt: list[int], answer: list[int], device: torch.device) -> bool:
    """True when greedy decoding after ``prompt`` emits ``answer`` (one teacher-forced forward, last logits only)."""
    return matched_prefix(model, prompt, answer, device) == len(answer)


def needle_cases(encode: Callable[[str], list[int]], lengths: list[int], depths: list[float], bos: int | None,
                 trials: int = 3, seed: int = 0) -> dict[tuple[int, float], list[NeedleCase]]:
    """{(length, depth): [NeedleCase] * trials}, random passkeys from ``seed``."""
    rng = random.Random(seed)
    filler_ids = encode(FILLER)
    cases = {}
    for length in lengths:
        for depth in depths:
            keys = [str(rng.randint(10000, 99999)) for _ in range(trials)]
            cases[(length, depth)] = [build_needle_case(encode, length, depth, k, bos, filler_ids) for k in keys]
    return cases


def needle_prompts(encode: Callable[[str], list[int]], lengths: list[int], depths: list[float], bos: int | None,
                   trials: int = 3, seed: int = 0) -> dict[tuple[int, float], list[tuple[list[int], list[int]]]]:
    """{(length, depth): [(prompt ids, answer ids)] * trials}: :func:`needle_cases` without the needle spans."""
    return {cell: [(c.prompt, c.answer) for c in cases]
            for cell, cases in needle_cases(encode, lengths, depths, bos, trials, seed).items()}


def answer_prefix(model: Any, prompt: list[int], answer: list[int], device: torch.device,
                  answer_check: str = "generate") -> int:
    """One trial by ``answer_check`` (one of ``ANSWER_CHECKS``; see the module docstring): how many leading answer
    tokens come out right (all of them: a pass)."""
    if answer_check == "generate":
        return generated_prefix(model, prompt, answer, device)
    if answer_check == "forward":
        return matched_prefix(model, prompt, answer, device)
    raise ValueError(f"answer_check must be one of {ANSWER_CHECKS}, got {answer_check!r}")


def check_answer(model: Any, prompt: list[int], answer: list[int], device: torch.device,
                 answer_check: str = "generate") -> bool:
    """One trial by ``answer_check``: True when every answer token comes out right."""
    return answer_prefix(model, prompt, answer, device, answer_check) == len(answer)


def run_needle_prompts(model: Any, prompts: dict[tuple[int, float], list[tuple[list[int], list[int]]]],
                       specs: list[PatternSpec], device: torch.device,
                       answer_check: str = "generate") -> list[dict[str, Any]]:
    """One row per (pattern, length, depth): accuracy over the prompts (the same prompts for each pattern), which
    trials passed and, per trial, how many leading answer tokens came out right (``correct_prefix``: 0 = the
    prompt's last row already chose wrong; more = a later step lost it). ``prompts`` holds (prompt, answer) pairs
    or NeedleCase tuples."""
    if answer_check not in ANSWER_CHECKS:
        raise ValueError(f"answer_check must be one of {ANSWER_CHECKS}, got {answer_check!r}")
    rows = []
    for spec in specs:
        apply_pattern(model, spec)
        for (length, depth), cases in tqdm(prompts.items(), desc=f"needle {spec.label}", leave=False):
            prefix = [answer_prefix(model, case[0], case[1], device, answer_check) for case in cases]
            passed = [p == len(case[1]) for p, case in zip(prefix, cases, strict=True)]
            rows.append({"pattern": spec.label, "length": length, "depth": depth,
                         "accuracy": sum(passed) / len(cases), "trials": len(cases), "passed": passed,
                         "correct_prefix": prefix, "answer_tokens": len(cases[0][1]),
                         "answer_check": answer_check,
                         "tokens": len(cases[0][0]) + len(cases[0][1]),
                         **density_summary(model.config, spec.sparsity, length)})
        done = [r for r in rows if r["pattern"] == spec.label]
        print(f"  needle {spec.label:<28} mean accuracy {sum(r['accuracy'] for r in done) / len(done):.2f}",
              flush=True)
    return rows


def run_needle(model: Any, encode: Callable[[str], list[int]], lengths: list[int], depths: list[float],
               specs: list[PatternSpec], device: torch.device, bos: int | None, trials: int = 3,
               seed: int = 0, answer_check: str = "generate") -> list[dict[str, Any]]:
    """Build the prompts and score them for every pattern (see :func:`run_needle_prompts`)."""
    prompts = needle_prompts(encode, lengths, depths, bos, trials, seed)
    return run_needle_prompts(model, prompts, specs, device, answer_check)


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value of paired pass / fail trials: ``lost`` trials the reference passed and the other
    failed, ``gained`` the reverse (a binomial test of the discordant pairs at 1/2). 1.0 when none differ."""
    if lost < 0 or gained < 0:
        raise ValueError(f"lost and gained are counts >= 0, got {lost}, {gained}")
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_with_dense(rows: list[dict[str, Any]], reference: str = "dense") -> list[dict[str, Any]]:
    """Each pattern's passkey trials beside the ``reference`` pattern's on the same prompts (same length, depth and
    answer check): trials it lost and gained, and McNemar's exact p-value (small: the difference is unlikely to be
    chance at this many trials; 20 trials detect only large losses, e.g. 6 lost and none gained gives 0.031).
    Rows without per-trial results or without a reference row are left out."""
    base = {(r["length"], r["depth"], r.get("answer_check")): r["passed"] for r in rows
            if r["pattern"] == reference and r.get("passed")}
    out = []
    for r in rows:
        ref = base.get((r["length"], r["depth"], r.get("answer_check")))
        if r["pattern"] == reference or ref is None or len(r.get("passed") or []) != len(ref):
            continue
        lost = sum(d and not s for d, s in zip(ref, r["passed"], strict=True))
        gained = sum(s and not d for d, s in zip(ref, r["passed"], strict=True))
        out.append({"pattern": r["pattern"], "length": r["length"], "depth": r["depth"],
                    "answer_check": r.get("answer_check"), "reference": reference, "lost": lost, "gained": gained,
                    "p_value": mcnemar_exact_p(lost, gained)})
    return out
