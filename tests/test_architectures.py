"""Every causal-LM architecture transformers ships, through attn_implementation="sparsek" (scripts/arch_sweep.py).

One test per (model_type, check): a tiny random model is built once per model_type and shared by its six
checks (dense, sparse, cache, padding, packing, generate; see the script's docstring). A check passes when sparse
attention matches (``pass``) or refuses with a ValueError naming what it does not support (``refused``); it is
skipped when the model itself fails it under sdpa/eager (``model``) or the entry is not swept (encoder-decoders,
models without attention).
A silent mismatch or a crash fails, with the check's size of mismatch in the message. Known failures are listed
below by cause, as strict xfails: a fix flips them (and the entry then comes off the list).
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from packaging.version import Version

import hf_sparsek
from hf_sparsek import SparsePattern
from scripts import arch_sweep as sweep

NEW_TRANSFORMERS = Version(transformers.__version__) >= Version("5.25")

# Causes of the failures the sweep finds today: cause -> {model_type: checks that fail}. Models whose attention
# bypasses transformers' interface are refused at load (hf_sparsek.model_support); models whose code reads the mask
# tensor are refused at the first forward (integration.MaskNotMaterialized).
HARNESS = "the harness cannot build a tiny model of this architecture on this transformers version"
ALL = sweep.CHECKS
KNOWN_FAILURES: dict[str, dict[str, tuple[str, ...]]] = {
    HARNESS: {} if NEW_TRANSFORMERS else {"cohere_compass_text": ALL},
}


def _known(model_type: str, check: str) -> str | None:
    for cause, entries in KNOWN_FAILURES.items():
        if check in entries.get(model_type, ()):
            return cause
    return None


def _params() -> list:
    params = []
    for model_type in sweep.model_types():
        for check in sweep.CHECKS:
            cause = _known(model_type, check)
            marks = [pytest.mark.xfail(strict=True, reason=cause)] if cause else []
            params.append(pytest.param(model_type, check, marks=marks, id=f"{model_type}-{check}"))
    return params


@functools.cache
def _result(model_type: str) -> sweep.ArchResult:
    """The architecture's row, computed once for its six tests."""
    sweep.register_oracle()
    return sweep.run_architecture(model_type)


@pytest.mark.parametrize(("model_type", "check"), _params())
def test_architecture(model_type: str, check: str) -> None:
    result = _result(model_type)
    if result.status == "skipped":
        pytest.skip(f"{model_type}: {result.reason}")
    if result.status == "refused at load":
        assert "sparsek" in result.reason, result.reason
        return
    assert result.status == "tested", f"{model_type}: {result.status}: {result.reason}"
    outcome = result.checks[check]
    if outcome.status == "model":
        pytest.skip(f"{model_type} {check}: the model itself fails it ({outcome.detail})")
    assert outcome.status in ("pass", "refused"), f"{model_type} {check}: {outcome.cell()}"


def test_sweep_catches_a_pattern_that_differs_from_the_expected_one() -> None:
    """The sparse check fails, with its size, when sparse attention and the expected token mask disagree."""
    sweep.register_oracle()
    with sweep.one_thread():
        result, arch = sweep.build("llama")
        assert arch is not None and arch.patterned_layers == 2, result
        arch.oracle_pattern = SparsePattern(block_size=64, sink_tokens=3, window=47)  # one token narrower
        arch.probe_interface()
        with hf_sparsek.settings(backend="reference", dense_via_sdpa=False):
            outcome = arch.check_sparse()
    assert outcome.status == "FAIL" and "max abs diff" in outcome.detail, outcome


def test_sweep_catches_a_pattern_that_was_not_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sparse run that equals the dense reference (the model ignored the pattern) fails the sparse check."""
    sweep.register_oracle()
    with sweep.one_thread():
        result, arch = sweep.build("llama")
        assert arch is not None, result
        full = arch.full  # the "sparse" run answers with the reference's logits, as a model ignoring it would
        monkeypatch.setattr(arch, "full", lambda impl, which: full(arch.reference if impl == "sparse" else impl, which))
        outcome = arch.check_sparse()
    assert outcome.status == "FAIL" and "changed nothing" in outcome.detail, outcome


@pytest.mark.parametrize("fault, where", [
    ("decode", "dynamic cache vs no cache"),  # one-token steps off by 0.1%: the dynamic cache's logits drift
    ("static prefill", "static cache vs dynamic cache"),  # only a static cache hands a prefill more keys than queries
])
def test_sweep_catches_generate_steps_that_differ(fault: str, where: str) -> None:
    """The generate check fails, naming which comparison, when sparse attention is off in one generate() path."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sweep.register_oracle()
    original = ALL_ATTENTION_FUNCTIONS["sparsek"]

    def faulty(module, query, key, value, attention_mask, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, **kwargs)
        q_len, kv_len = query.shape[2], key.shape[2]
        hit = q_len == 1 if fault == "decode" else 1 < q_len < kv_len
        return (out * 1.001 if hit else out), weights

    with sweep.one_thread():
        result, arch = sweep.build("llama")
        assert arch is not None, result
        with hf_sparsek.settings(backend="reference", dense_via_sdpa=False):
            assert arch.check_generate().status == "pass"
            AttentionInterface.register("sparsek", faulty)
            try:
                outcome = arch.check_generate()
            finally:
                AttentionInterface.register("sparsek", original)
    assert ALL_ATTENTION_FUNCTIONS["sparsek"] is original
    assert outcome.status == "FAIL" and outcome.detail.startswith(where), outcome


def test_compare_reports_size_and_first_bad_token() -> None:
    expected = torch.randn(1, 10, 7)
    got = expected.clone()
    got[0, 6, 3] += 0.25
    outcome = sweep.compare(got, expected, 1e-5)
    assert outcome.status == "FAIL"
    assert "max abs diff 2.5e-01" in outcome.detail and "first bad token 6" in outcome.detail
    assert sweep.compare(expected.clone(), expected, 1e-5).status == "pass"


@pytest.mark.parametrize("make, expected", [
    (lambda: transformers.LlamaConfig(num_attention_heads=8, num_key_value_heads=2, hidden_size=256), (2, 32)),
    (lambda: transformers.LlamaConfig(num_attention_heads=8, num_key_value_heads=None, hidden_size=256), (8, 32)),
    (lambda: transformers.FalconConfig(num_attention_heads=8, hidden_size=256), (1, 32)),  # multi-query
    (lambda: transformers.FalconConfig(num_attention_heads=8, hidden_size=256, new_decoder_architecture=True,
                                       num_kv_heads=4), (4, 32)),
    (lambda: transformers.DeepseekV3Config(num_attention_heads=8, num_key_value_heads=8, hidden_size=256,
                                           kv_lora_rank=16, qk_nope_head_dim=24, qk_rope_head_dim=8), (8, 32)),
])
def test_attention_shape_reads_kv_heads_and_head_dim_as_the_layer_hands_them(make, expected) -> None:
    """One place reads (KV heads, head dim) from a config; describe's density and the learned selector both use it."""
    from hf_sparsek.describe import kv_head_count
    from hf_sparsek.model_support import attention_shape

    config = make()
    assert attention_shape(config) == expected
    assert kv_head_count(config) == expected[0]
