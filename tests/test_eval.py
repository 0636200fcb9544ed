"""Evaluation: exact perplexity arithmetic, windowing, and CLI smoke tests on a tiny random model (CPU, seconds)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from hf_sparsek.eval.modeling import PatternSpec, density_summary, parse_patterns
from hf_sparsek.eval.ppl import TILE_ROWS, evaluate_windows, make_windows, paired_change, run_ppl
from transformers import LlamaConfig, LlamaForCausalLM

from hf_sparsek.patterns import ModelSparsity, SparsePattern

WORDS = ("the king queen sword crown night day love death honour blood fair foul rose thorn ghost castle sea "
         "storm").split()


def tiny_model(vocab: int = 97) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def random_docs(lengths: list[int], vocab: int = 97) -> list[list[int]]:
    return [torch.randint(3, vocab, (n,)).tolist() for n in lengths]


@pytest.mark.parametrize("bos", [None, 1])
def test_ppl_is_exp_of_mean_nll_by_hand(bos: int | None) -> None:
    model = tiny_model()
    docs = random_docs([330, 70])
    windows = make_windows([len(d) for d in docs], window=160, has_bos=bos is not None)
    got = evaluate_windows(model, docs, windows, bos, torch.device("cpu"))
    # By hand: every window through the full model, full logits, log-softmax, gather, skip what is not scored.
    nll, count = 0.0, 0
    for w in windows:
        ids = ([bos] if bos is not None else []) + docs[w.doc][w.begin : w.end]
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        first_target = w.begin if bos is not None else w.begin + 1
        for t in range(len(ids) - 1):
            if first_target + t >= w.score_from:
                nll -= float(logp[t, ids[t + 1]].detach())
                count += 1
    expected_tokens = sum(len(d) for d in docs) - (0 if bos is not None else len(docs))
    assert count == got["tokens"] == expected_tokens
    assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # Tile-final rows by hand: input position t with t % 64 == 63, scored.
    final = []
    for w in windows:
        ids = ([bos] if bos is not None else []) + docs[w.doc][w.begin : w.end]
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        first_target = w.begin if bos is not None else w.begin + 1
        final += [-float(logp[t, ids[t + 1]].detach()) for t in range(len(ids) - 1)
                  if first_target + t >= w.score_from and t % TILE_ROWS == TILE_ROWS - 1]
    assert len(final) > 0
    assert got["tile_final_nll"] == pytest.approx(final, rel=1e-5)


def test_paired_change_of_a_constant_shift_and_its_error() -> None:
    base = [random.Random(i).uniform(0.5, 4.0) for i in range(50)]
    assert paired_change(base, base) == {"delta_pct": 0.0, "se_pct": 0.0}
    shifted = paired_change([b + 0.01 for b in base], base)
    assert shifted["delta_pct"] == pytest.approx(100 * (math.exp(0.01) - 1))
    assert shifted["se_pct"] == pytest.approx(0.0, abs=1e-9)
    noisy = paired_change([b + (0.02 if i % 2 else 0.0) for i, b in enumerate(base)], base)
    assert noisy["se_pct"] > 0
    assert paired_change([2.0], [1.5])["se_pct"] is None  # one token: no spread to estimate
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_change(base[:3], base)


@pytest.mark.parametrize("block", [64, 128])
def test_tile_final_rows_are_free_of_lookahead_and_earlier_rows_are_not(block: int) -> None:
    """Dynamic selection pools a tile's rows: an earlier row's prediction can depend on later tokens of its tile
    (what the tile-final measure avoids); the last row of a 128-row tile never does, on either grid."""
    torch.manual_seed(0)
    model = tiny_model()
    from hf_sparsek.eval.modeling import apply_pattern

    pattern = SparsePattern(block_size=block, sink_tokens=block, window=block, topk_blocks=1, selector="mass")
    apply_pattern(model, PatternSpec("topk", ModelSparsity(default=pattern)))
    changed_early = 0
    for trial in range(6):
        gen = torch.Generator().manual_seed(trial)
        ids = torch.randint(3, 97, (1, 640), generator=gen)
        with torch.no_grad():
            logits = model(ids).logits[0]
            for t in (383, 511, 460 + trial):  # tile-final rows (t % 128 == 127), then an earlier row
                other = ids.clone()
                other[0, t + 1 :] = torch.randint(3, 97, (ids.shape[1] - t - 1,), generator=gen)
                diff = float((model(other).logits[0, t] - logits[t]).abs().max())
                if t % TILE_ROWS == TILE_ROWS - 1:
                    assert diff < 1e-5, (trial, t, diff)
                else:
                    changed_early += diff > 1e-4
    assert changed_early > 0


@pytest.mark.parametrize("has_bos", [False, True])
@pytest.mark.parametrize("window,stride", [(16, None), (16, 5), (7, 7), (32, 1)])
def test_windows_score_every_token_exactly_once(has_bos: bool, window: int, stride: int | None) -> None:
    lengths = [1, 2, 15, 16, 17, 50, 64]
    counts = [[0] * n for n in lengths]
    for w in make_windows(lengths, window, stride, has_bos=has_bos):
        assert 0 <= w.begin <= w.score_from < w.end <= lengths[w.doc]
        assert w.end - w.begin <= window
        for i in range(w.score_from, w.end):
            counts[w.doc][i] += 1
    for n, c in zip(lengths, counts, strict=True):
        first = 0 if has_bos else min(1, n)
        assert c[:first] == [0] * first
        assert c[first:] == [1] * (n - first)


def test_budget_mode_takes_full_windows_only() -> None:
    windows = make_windows([10, 40, 100], window=32, max_windows=3)
    assert len(windows) == 3
    assert all(w.end - w.begin == 32 for w in windows)
    assert windows[0].doc == 1  # the 10-token document is too short for one full window


def test_sparse_pattern_changes_ppl_and_density_but_not_tokens() -> None:
    model = tiny_model()
    docs = random_docs([300])
    specs = [PatternSpec("dense", None),
             PatternSpec("w64", ModelSparsity(default=SparsePattern(block_size=64, window=64)))]
    rows = run_ppl(model, docs, [256], specs, torch.device("cpu"), bos=None, max_tokens=256)
    dense, sparse = rows
    assert dense["tokens"] == sparse["tokens"] == 255
    assert dense["density"] == 1.0 and 0.0 < sparse["density"] < 0.6
    assert sparse["ppl"] != dense["ppl"]
    assert sparse["delta_pct"] == pytest.approx(100 * (sparse["ppl"] / dense["ppl"] - 1))


def test_parse_patterns_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="not 'dense', 'default', a preset"):
        parse_patterns(["no-such-pattern"], "llama")
    specs = parse_patterns(["dense", "default", "sink128-window1024"], "llama")
    assert [s.sparsity is None for s in specs] == [True, False, False]


def test_parse_patterns_takes_pattern_dicts_like_their_json_text() -> None:
    pattern = {"block_size": 64, "sink_tokens": 64, "window": 128, "topk_blocks": 29, "selector": "probe"}
    from_dict, from_text = parse_patterns([pattern], "llama"), parse_patterns([json.dumps(pattern)], "llama")
    assert [s.label for s in from_dict] == [s.label for s in from_text]
    assert from_dict[0].sparsity.default == from_text[0].sparsity.default
    assert from_dict[0].sparsity.default.topk_blocks == 29
    with pytest.raises(ValueError, match="expected 'dense', 'default'"):
        parse_patterns([29], "llama")


def test_density_summary_counts_only_full_layers_as_pattern_density() -> None:
    config = LlamaConfig(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                         sliding_window=128)
    sparsity = ModelSparsity(default=SparsePattern(window=256))
    d = density_summary(config, sparsity, 1024)
    assert d["density"] > d["model_density"]  # the sliding layers (window 128) are sparser than window 256


# ---------------------------------------------------------------- CLI smoke tests (tiny model, tiny text)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(400))
    root = tmp_path_factory.mktemp("tiny")
    (root / "text.txt").write_text(text)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    model_dir = root / "model"
    tiny_model(vocab=tok.get_vocab_size()).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return str(model_dir), str(root / "text.txt")


def _run_cli(argv: list[str]) -> None:
    from hf_sparsek.cli import main

    assert main(argv) == 0


def test_cli_ppl(tiny_checkpoint: tuple[str, str], tmp_path) -> None:
    model, text = tiny_checkpoint
    _run_cli(["eval", "ppl", "--model", model, "--data", text, "--contexts", "128,256", "--max-tokens", "256",
              "--device", "cpu", "--out", str(tmp_path), "--patterns", "dense",
              '{"block_size": 64, "window": 64}'])
    data = json.loads((tmp_path / "ppl_model.json").read_text())
    for key in ("model", "patterns", "environment", "results", "documents"):
        assert key in data
    assert {"device", "torch", "transformers", "hf_sparsek", "dtype"} <= set(data["environment"])
    rows = data["results"]
    assert [(r["context"], r["pattern"]) for r in rows] == [(128, "dense"), (128, "window64"), (256, "dense"),
                                                            (256, "window64")]
    for r in rows:
        for key in ("ppl", "nll", "delta_pct", "density", "tokens", "tokens_per_s"):
            assert key in r
        assert r["ppl"] == pytest.approx(math.exp(r["nll"]))
    assert (tmp_path / "ppl_model.md").read_text().startswith("| context |")
    assert (tmp_path / "ppl_model_context.png").stat().st_size > 1000
    assert (tmp_path / "ppl_model_density.png").stat().st_size > 1000
    assert (tmp_path / "ppl_model_layout_window64.png").stat().st_size > 1000


def test_cli_needle(tiny_checkpoint: tuple[str, str], tmp_path) -> None:
    model, _ = tiny_checkpoint
    _run_cli(["eval", "needle", "--model", model, "--lengths", "384", "--depths", "0.2,0.8", "--trials", "1",
              "--device", "cpu", "--out", str(tmp_path), "--patterns", '{"block_size": 64, "window": 64}'])
    data = json.loads((tmp_path / "needle_model.json").read_text())
    rows = data["results"]
    assert {r["pattern"] for r in rows} == {"dense", "window64"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["trials"] == 1 and r["answer_check"] == "generate" for r in rows)
    assert all(abs(r["tokens"] - 384) <= 2 for r in rows)
    assert (tmp_path / "needle_model.png").stat().st_size > 1000


def test_cli_layers(tiny_checkpoint: tuple[str, str], tmp_path) -> None:
    model, text = tiny_checkpoint
    _run_cli(["eval", "layers", "--model", model, "--data", text, "--seq-len", "256", "--isolate",
              "--device", "cpu", "--out", str(tmp_path), "--patterns", '{"block_size": 64, "window": 64}'])
    data = json.loads((tmp_path / "layers_model.json").read_text())
    (res,) = data["results"]
    assert [r["layer"] for r in res["layers"]] == [0, 1]
    assert all(r["rel_error"] > 0 for r in res["layers"])  # a 64-token window changes a 256-token attention
    assert res["logit_kl"] > 0
    assert [r["layer"] for r in res["isolated"]] == [0, 1]


def test_cli_clear_error_for_missing_model(tmp_path, capsys) -> None:
    from hf_sparsek.cli import main

    code = main(["eval", "ppl", "--model", str(tmp_path / "nope"), "--device", "cpu", "--out", str(tmp_path)])
    assert code == 2
    assert "could not load model" in capsys.readouterr().err


def test_pattern_labels_tell_selectors_strides_thresholds_and_blocks_apart() -> None:
    """Patterns that differ only in how they select (or in block size) get distinct labels, so one eval run can
    compare them; a label always names a selector other than the default (a probe row never reads as a mass row),
    the block size only where labels would clash."""
    base = {"sink_tokens": 64, "window": 1024, "topk_blocks": 15}
    names = [json.dumps(base), json.dumps({**base, "selector": "probe"}),
             json.dumps({**base, "selector": "probe", "probe_stride": 4}), json.dumps({**base, "selector": "oracle"}),
             json.dumps({**base, "mass_threshold": 0.9}), json.dumps({**base, "block_size": 64})]
    labels = [s.label for s in parse_patterns(["dense", *names], "llama")]
    assert labels == ["dense", "sink64-window1024-topk15", "sink64-window1024-topk15-probe",
                      "sink64-window1024-topk15-probe-stride4", "sink64-window1024-topk15-oracle",
                      "sink64-window1024-topk15-mass0.9", "sink64-window1024-topk15-b64"]
    assert [s.label for s in parse_patterns([names[1]], "llama")] == ["sink64-window1024-topk15-probe"]  # no clash
    assert [s.label for s in parse_patterns([names[5]], "llama")] == ["sink64-window1024-topk15"]
    per_head = json.dumps({**base, "selector": "probe", "probe_stride": 4, "per_query_head": True})
    assert [s.label for s in parse_patterns([per_head], "llama")] == ["sink64-window1024-topk15-probe-stride4-perhead"]
    with pytest.raises(ValueError, match="distinct"):  # "mass" named or not is the same selection
        parse_patterns([names[0], json.dumps({**base, "selector": "mass"})], "llama")


def test_pattern_labels_tell_any_two_different_patterns_apart() -> None:
    """Patterns whose short and detailed labels still agree (dense heads, min_sparse_len) get their own fields as
    labels; the same pattern twice is still refused."""
    a = json.dumps({"block_size": 64, "window": 8})
    b = json.dumps({"block_size": 64, "window": 8, "dense_heads": [0]})
    c = json.dumps({"block_size": 64, "window": 8, "min_sparse_len": 128})
    labels = [s.label for s in parse_patterns(["dense", a, b, c], "llama")]
    assert len(set(labels)) == 4 and "dense_heads" in labels[2] and "min_sparse_len" in labels[3]
    with pytest.raises(ValueError, match="distinct"):
        parse_patterns([a, a], "llama")


def test_cli_triton_backend_that_cannot_run_is_refused_before_any_pass(tiny_checkpoint, tmp_path, capsys,
                                                                       monkeypatch) -> None:
    """``--backend triton`` where the kernels cannot run (CPU without the interpreter) is one error line right
    after loading, before the dense pass (it failed only at the first sparse pattern)."""
    import hf_sparsek
    from hf_sparsek.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("HF_SPARSEK_DEBUG", raising=False)
    model, text = tiny_checkpoint
    code = main(["eval", "ppl", "--model", model, "--data", text, "--contexts", "128", "--max-tokens", "128",
                 "--device", "cpu", "--out", str(tmp_path), "--backend", "triton", "--patterns", "dense",
                 '{"block_size": 64, "window": 64}'])
    err = capsys.readouterr().err
    assert code == 2 and "--backend triton cannot run here" in err
    assert not (tmp_path / "ppl_model.json").exists()
    assert hf_sparsek.get_settings().backend == "auto"  # the refused choice did not become the process's
