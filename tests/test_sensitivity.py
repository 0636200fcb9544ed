"""Per-layer patterns chosen by measured sensitivity (hf_sparsek.eval.sensitivity): the knapsack against brute
force, the candidates, the ModelSparsity it writes, and the measurement on a small model against a direct one."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hf_sparsek.eval.sensitivity import (
    Choice,
    allocate,
    calibrate_by_sensitivity,
    candidate_choices,
    choice_density,
    sparsity_from_choices,
)
from transformers import LlamaConfig, LlamaForCausalLM

from hf_sparsek.describe import pattern_density
from hf_sparsek.patterns import ModelSparsity, SparsePattern, as_model_sparsity


@pytest.mark.parametrize("seed", range(6))
def test_allocate_is_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    layers, options = 4, 3
    costs = torch.rand(layers, options, generator=g).tolist()
    dens = (torch.rand(layers, options, generator=g) * 0.9 + 0.05).tolist()
    target = float(torch.rand(1, generator=g)) * 0.5 + 0.3
    best = min((sum(costs[i][j] for i, j in enumerate(pick)), pick)
               for pick in itertools.product(range(options), repeat=layers)
               if sum(dens[i][j] for i, j in enumerate(pick)) / layers <= target - 1e-3)  # the grid rounds up
    pick = allocate(costs, dens, target, resolution=100000)
    assert sum(dens[i][j] for i, j in enumerate(pick)) / layers <= target + 1e-9
    assert sum(costs[i][j] for i, j in enumerate(pick)) <= best[0] + 1e-12


def test_allocate_prefers_the_cheap_layer_and_refuses_the_impossible():
    # layer 0 is sensitive (sparse costs 1.0), layer 1 is not (0.01): the one dense layer the budget allows is 0
    costs = [[1.0, 0.0], [0.01, 0.0]]
    dens = [[0.2, 1.0], [0.2, 1.0]]
    assert allocate(costs, dens, target=0.6) == [1, 0]
    assert allocate(costs, dens, target=0.59) == [0, 0]
    with pytest.raises(ValueError, match="no choice fits"):
        allocate(costs, dens, target=0.1)
    with pytest.raises(ValueError, match="one non-empty"):
        allocate([[0.1]], [[0.2, 0.3]], target=0.5)


def test_candidate_choices_cover_windows_budgets_and_dense_heads():
    base = SparsePattern(block_size=64, sink_tokens=64, window=512, topk_blocks=7, selector="mass")
    choices = candidate_choices(base, [0, 7], [256, 512], kv_heads=3)
    assert len(choices) == 2 * 2 * 4 + 1 and choices[-1].pattern is None
    by_label = {c.label: c.pattern for c in choices}
    plain = by_label["window 256 + top-0"]
    assert plain.topk_blocks is None and plain.selector is None and plain.window == 256
    head = by_label["window 512 + top-7 + dense head 2"]
    assert (head.topk_blocks, head.selector, head.dense_heads, head.sink_tokens) == (7, "mass", (2,), 64)
    assert len(candidate_choices(base, [3], kv_heads=1)) == 2  # one KV head: no dense-head choices
    with pytest.raises(ValueError, match="dense_heads"):
        candidate_choices(base.replace(dense_heads=(0,)), [3])
    with pytest.raises(ValueError, match=">= 0"):
        candidate_choices(base, [-1])


def test_density_of_a_dense_head_with_selection():
    """A dense KV head has every pair: top-k adds pairs only on the heads that select."""
    sparse = SparsePattern(block_size=64, sink_tokens=64, window=512, topk_blocks=7)
    one = pattern_density(sparse, 8192, kv_heads=3)
    with_dense = pattern_density(sparse.replace(dense_heads=(1,)), 8192, kv_heads=3)
    assert with_dense == pytest.approx((1.0 + 2 * one) / 3)
    assert choice_density(Choice("dense", None), 8192, 3) == 1.0


def test_sparsity_from_choices_gives_each_layer_its_choice():
    base = SparsePattern(block_size=64, sink_tokens=64, window=512, topk_blocks=7, selector="mass")
    choices = {c.label: c for c in candidate_choices(base, [0, 3, 7], [256, 512], kv_heads=3)}
    picked = {0: choices["dense"], 1: choices["window 512 + top-7"], 2: choices["window 256 + top-0"],
              3: choices["window 512 + top-7"], 4: choices["window 512 + top-3 + dense head 0"], 5: choices["dense"]}
    sparsity = as_model_sparsity(json.loads(sparsity_from_choices(picked, "test").to_json()))
    assert sparsity.dense_layers == (0, 5)
    for layer, choice in picked.items():
        if choice.pattern is not None:
            assert sparsity.for_layer(layer) == choice.pattern, layer
    assert sparsity_from_choices({0: choices["dense"]}, "t").dense_layers == (0,)


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # sharper attention than the default initialisation: sparse patterns visibly change logits
    return model


def test_calibrate_by_sensitivity_measures_what_it_allocates():
    from hf_sparsek.eval.layers import _forward_capture, logit_kl
    from hf_sparsek.eval.modeling import PatternSpec, apply_pattern

    model = _model()
    ids = torch.randint(0, 97, (2, 320), generator=torch.Generator().manual_seed(1))
    base = SparsePattern(block_size=64, sink_tokens=8, window=32, topk_blocks=1, selector="mass")
    choices = candidate_choices(base, [0, 2], kv_heads=2)
    result = calibrate_by_sensitivity(model, ids, choices, [0.6, 0.35], progress=False)
    table = result["table"]
    assert sorted(table) == ["0", "1", "2"] and result["choices"] == [c.label for c in choices]
    assert all(row["dense"]["kl"] == 0.0 and row["dense"]["density"] == 1.0 for row in table.values())
    assert all(cell["kl"] > 0 for row in table.values() for label, cell in row.items() if label != "dense")

    # one cell by hand: only layer 1 under "window 32 + top-2", the mean KL over both windows
    pattern = next(c.pattern for c in choices if c.label == "window 32 + top-2")
    apply_pattern(model, PatternSpec("dense", None))
    dense = [_forward_capture(model, ids[w: w + 1])[1] for w in range(2)]
    apply_pattern(model, PatternSpec("one", ModelSparsity(default=pattern, dense_layers=(0, 2))))
    direct = sum(logit_kl(model, dense[w], _forward_capture(model, ids[w: w + 1])[1]) for w in range(2)) / 2
    assert table["1"]["window 32 + top-2"]["kl"] == pytest.approx(direct, rel=1e-5)

    for alloc, target in zip(result["allocations"], [0.6, 0.35], strict=True):
        assert alloc["density"] <= target + 1e-9
        picked = [table[layer][label] for layer, label in alloc["chosen"].items()]
        assert alloc["predicted_kl"] == pytest.approx(sum(c["kl"] for c in picked))
        assert alloc["measured_kl"] >= 0
        sparsity = as_model_sparsity(alloc["sparsity"])
        for layer, label in alloc["chosen"].items():
            choice = next(c for c in choices if c.label == label)
            if choice.pattern is None:
                assert int(layer) in sparsity.dense_layers
            else:
                assert sparsity.for_layer(int(layer)) == choice.pattern
    assert result["allocations"][0]["predicted_kl"] <= result["allocations"][1]["predicted_kl"]
    with pytest.raises(ValueError, match="target"):
        calibrate_by_sensitivity(model, ids, choices, [], progress=False)


def test_cli_sensitivity(tmp_path, capsys) -> None:
    from conftest import tiny_llama_with_docs

    from hf_sparsek.cli import main

    model_dir, docs = tiny_llama_with_docs(tmp_path)
    out = tmp_path / "out"
    pattern = '{"block_size": 64, "sink_tokens": 8, "window": 64, "topk_blocks": 1}'
    args = ["eval", "sensitivity", "--model", str(model_dir), "--data", str(docs), "--seq-len", "384",
            "--device", "cpu", "--out", str(out), "--pattern", pattern, "--topks", "0,2", "--window-sizes",
            "32,64", "--densities", "0.5,0.3"]
    assert main(args) == 0
    data = json.loads((out / "sensitivity_model_384.json").read_text())
    assert sorted(data["table"]) == ["0", "1", "2"]
    assert len(data["choices"]) == 2 * 2 * 3 + 1  # windows x budgets x (no / head 0 / head 1 dense) + dense
    for alloc in data["allocations"]:
        assert alloc["density"] <= alloc["target_density"] + 1e-9
        sparsity = as_model_sparsity(str(out / f"sensitivity_model_384_pattern_{alloc['target_density']:.4f}.json"))
        for layer, label in alloc["chosen"].items():
            assert (label == "dense") == (int(layer) in sparsity.dense_layers)
    assert "measured on the mixed pattern" in (out / "sensitivity_model_384.md").read_text()
    for bad, message in ((args[:-2] + ["--densities", "0.01"], "no choice fits"),
                         (args[:-8] + ["--pattern", '{"block_size": 64}'], "must be sparse")):
        assert main(bad) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--topks", "0,-1"])
    assert "counts >= 0" in capsys.readouterr().err


def test_probes_add_the_answer_kl_and_weigh_into_the_choice():
    """A retrieval probe's answer KL is the KL at the positions that predict the answer (checked by hand for one
    cell); with a large weight the allocation follows the answer KL, and a weight without probes is refused."""
    from hf_sparsek.eval.layers import _forward_capture, logit_kl
    from hf_sparsek.eval.modeling import PatternSpec, apply_pattern

    model = _model()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (1, 320), generator=g)
    probe = (torch.randint(0, 97, (300,), generator=g).tolist(), [5, 7, 11])
    base = SparsePattern(block_size=64, sink_tokens=8, window=32, topk_blocks=1, selector="mass")
    choices = candidate_choices(base, [0, 2], kv_heads=2)
    uniform = base.replace(topk_blocks=2)
    result = calibrate_by_sensitivity(model, ids, choices, [0.6], probes=[probe], probe_weights=[0.0, 1000.0],
                                      uniform=uniform, progress=False)
    pattern = next(c.pattern for c in choices if c.label == "window 32 + top-0")
    full = torch.tensor([probe[0] + probe[1]])
    apply_pattern(model, PatternSpec("dense", None))
    dense = _forward_capture(model, full)[1][:, 299:302]
    apply_pattern(model, PatternSpec("one", ModelSparsity(default=pattern, dense_layers=(0, 1))))
    direct = logit_kl(model, dense, _forward_capture(model, full)[1][:, 299:302])
    assert result["table"]["2"]["window 32 + top-0"]["answer_kl"] == pytest.approx(direct, rel=1e-5)
    assert result["uniform"] == uniform.describe() and result["uniform_kl"] > 0
    text_only, answer_heavy = result["allocations"]
    assert (text_only["probe_weight"], answer_heavy["probe_weight"]) == (0.0, 1000.0)
    assert answer_heavy["predicted_answer_kl"] <= text_only["predicted_answer_kl"] + 1e-12
    assert text_only["predicted_kl"] <= answer_heavy["predicted_kl"] + 1e-12
    with pytest.raises(ValueError, match="needs probes"):
        calibrate_by_sensitivity(model, ids, choices, [0.6], probe_weights=[1.0], progress=False)
