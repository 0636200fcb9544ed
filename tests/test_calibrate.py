"""Per-layer budget calibration (hf_sparsek.eval.calibrate): the greedy allocation, one layer's coverage / density
curve against exact quantities, the ModelSparsity it writes, and the ``eval calibrate`` command."""

from __future__ import annotations

import json

import pytest
import torch
from hf_sparsek.eval.calibrate import allocate, calibrated_sparsity, layer_curve
from transformers import LlamaConfig, LlamaForCausalLM

from hf_sparsek.patterns import SparsePattern, as_model_sparsity


def _curve(gains: list[float], static_cov: float, static_density: float, cost: float) -> dict[str, list[float]]:
    cov, dens = [static_cov], [static_density]
    for g in gains:
        cov.append(cov[-1] + g)
        dens.append(dens[-1] + cost)
    return {"coverage": cov, "density": dens}


def test_allocate_gives_the_budget_to_the_layer_that_gains():
    curves = {0: _curve([0.1, 0.08, 0.05, 0.01], 0.5, 0.2, 0.05),
              1: _curve([0.001, 0.001, 0.001, 0.001], 0.95, 0.2, 0.05)}
    budgets = allocate(curves, target_density=0.2 + 0.05 * 2 / 2)  # two tiles in all, mean over two layers
    assert budgets == {0: 2, 1: 0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocate_meets_the_target_and_beats_the_uniform_budget(seed):
    """Concave curves of equal tile cost: the greedy choice is optimal, so never below the uniform budget's mass."""
    g = torch.Generator().manual_seed(seed)
    curves = {}
    for layer in range(6):
        gains = sorted(torch.rand(10, generator=g).mul(0.05).tolist(), reverse=True)
        curves[layer] = _curve(gains, float(torch.rand(1, generator=g)) * 0.5 + 0.3, 0.15, 0.03)
    uniform_k = 3
    target = sum(c["density"][uniform_k] for c in curves.values()) / len(curves)
    budgets = allocate(curves, target)
    density = sum(curves[i]["density"][k] for i, k in budgets.items()) / len(curves)
    cov = sum(curves[i]["coverage"][k] for i, k in budgets.items())
    assert density <= target + 1e-9
    assert sum(budgets.values()) == uniform_k * len(curves)  # equal costs: the whole budget is spent
    assert cov >= sum(c["coverage"][uniform_k] for c in curves.values()) - 1e-12
    assert len(set(budgets.values())) > 1  # random gains: some layer deserves more than another


@pytest.mark.parametrize("length", [320, 300])
def test_layer_curve_is_exact_at_the_ends(length):
    """k = 0 is the static part; a budget that takes every tile covers all the mass at density 1 (exact pairs);
    in between, the oracle's curve rises and is never below the mass selector's."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, length, 16, generator=g) * 2
    k = torch.randn(2, 2, length, 16, generator=g) * 2
    base = SparsePattern(block_size=64, sink_tokens=8, window=16, topk_blocks=1)
    oracle = layer_curve(q, k, base.replace(selector="oracle"), max_topk=5)
    mass = layer_curve(q, k, base.replace(selector="mass"), max_topk=5)
    assert oracle["coverage"][0] == pytest.approx(mass["coverage"][0])
    assert 0.2 < oracle["coverage"][0] < 0.97
    assert oracle["coverage"][-1] == pytest.approx(1.0, abs=1e-5)
    assert oracle["density"][-1] == pytest.approx(1.0, abs=1e-6)
    assert mass["density"][-1] == pytest.approx(1.0, abs=1e-6)
    steps = torch.tensor(oracle["coverage"]).diff()
    assert (steps >= -1e-7).all() and (steps[:2] > 0).all()
    assert all(o >= m - 1e-6 for o, m in zip(oracle["coverage"], mass["coverage"], strict=True))
    assert all(torch.tensor(oracle["density"]).diff() > 0)


def test_calibrated_sparsity_round_trips_and_drops_selection_at_zero():
    base = SparsePattern(block_size=64, sink_tokens=64, window=256, topk_blocks=4, selector="mass")
    sparsity = calibrated_sparsity(base, {0: 3, 1: 0, 2: 3, 3: 7}, "test")
    again = as_model_sparsity(json.loads(sparsity.to_json()))
    assert again.for_layer(0).topk_blocks == 3 and again.for_layer(0).selector == "mass"
    assert again.for_layer(1).topk_blocks is None and again.for_layer(1).selector is None
    assert again.for_layer(3).topk_blocks == 7 and again.for_layer(3).window == 256
    mostly_zero = calibrated_sparsity(base.replace(mass_threshold=0.9), {0: 0, 1: 0, 2: 5}, "test")
    assert mostly_zero.for_layer(0).topk_blocks is None
    layer2 = mostly_zero.for_layer(2)
    assert (layer2.topk_blocks, layer2.selector, layer2.mass_threshold) == (5, "mass", 0.9)


def test_calibrate_refuses_what_it_cannot_measure():
    from hf_sparsek.eval.calibrate import calibrate

    model, ids = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              num_key_value_heads=1)), torch.zeros(1, 64, dtype=torch.long)
    base = SparsePattern(block_size=64, window=64, topk_blocks=2)
    for bad, message in ((base.replace(dense_heads=(0,)), "dense_heads"), (base.replace(topk_blocks=None), "topk"),
                         (base.replace(selector="learned"), "learned"), (base, "max_topk")):
        with pytest.raises(ValueError, match=message):
            calibrate(model, ids, bad, max_topk=1, progress=False)


def test_cli_calibrate(tmp_path, capsys) -> None:
    from conftest import tiny_llama_with_docs

    from hf_sparsek.cli import main

    model_dir, docs = tiny_llama_with_docs(tmp_path)
    out = tmp_path / "out"
    pattern = '{"block_size": 64, "sink_tokens": 8, "window": 64, "topk_blocks": 1, "selector": "oracle"}'
    args = ["eval", "calibrate", "--model", str(model_dir), "--data", str(docs), "--seq-len", "384",
            "--windows", "2", "--device", "cpu", "--out", str(out), "--pattern", pattern, "--max-topk", "3"]
    assert main(args) == 0
    data = json.loads((out / "calibrate_model_384.json").read_text())
    assert sorted(data["budgets"]) == ["0", "1", "2"]
    assert data["calibrated"]["density"] <= data["target_density"] + 1e-9
    assert data["calibrated"]["coverage"] >= data["uniform"]["coverage"] - 1e-6  # oracle curves are concave
    sparsity = as_model_sparsity(str(out / "calibrate_model_384_pattern.json"))
    assert [sparsity.for_layer(i).topk_blocks or 0 for i in range(3)] == [data["budgets"][str(i)] for i in range(3)]
    for bad, message in ((args[:-4] + ["--pattern", '{"block_size": 64, "window": 64}'], "needs topk_blocks"),
                         (args[:8] + ["--windows", "3"] + args[10:], "3 window(s) asked")):
        assert main(bad) == 2
        assert message in capsys.readouterr().err
