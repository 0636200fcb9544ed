"""Fine-tuning with sparse attention: packing, training, checkpoints, LoRA, resume and clear errors (tiny, CPU)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_sparsek
from hf_sparsek.finetune import PATTERN_FILE, FinetuneConfig, checks, finetune, load_finetuned, load_model
from hf_sparsek.finetune import cli as ft_cli
from hf_sparsek.finetune.packing import (
    IGNORE_INDEX,
    PackedDataset,
    collate_packed,
    document_rows,
    pack_documents,
    segment_ids,
)

PATTERN = hf_sparsek.SparsePattern(block_size=64, sink_tokens=4, window=64)
SEQ = 192


def _tiny_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(_tiny_config()).save_pretrained(path)
    return str(path)


def _cli_config(tiny_dir: str, out: Path, *extra: str, pattern: bool = True) -> FinetuneConfig:
    """The FinetuneConfig of `hf-sparsek finetune` options: a small synthetic run on CPU (under ``PATTERN`` unless
    ``pattern`` is False: a dense run), plus ``extra``."""
    parser = argparse.ArgumentParser()
    ft_cli.add_arguments(parser)
    base = ["--model", tiny_dir, "--output-dir", str(out), "--train-data", "synthetic", "--synthetic-docs", "24",
            "--heldout-docs", "3", "--seq-len", str(SEQ), "--batch-size", "2", "--lr", "5e-3", "--dtype", "fp32",
            *(["--pattern", json.dumps(PATTERN.to_dict())] if pattern else []), "--scheduler", "constant",
            "--max-steps", "6", "--save-steps", "3", "--eval-max-windows", "6", "--cpu"]
    return ft_cli.config_from_args(parser.parse_args(base + list(extra)))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _probe() -> torch.Tensor:
    return torch.randint(0, 48, (1, SEQ), generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------------------------------------ packing
def test_packing_positions_labels_and_splits():
    docs = [list(range(1, 6)), list(range(10, 13)), list(range(20, 30))]
    rows = pack_documents(docs, seq_len=8)
    assert [len(r.input_ids) for r in rows] == [8, 8]
    r0, r1 = rows
    assert r0.input_ids == [1, 2, 3, 4, 5, 10, 11, 12]
    assert r0.position_ids == [0, 1, 2, 3, 4, 0, 1, 2]
    assert r0.labels == [IGNORE_INDEX, 2, 3, 4, 5, IGNORE_INDEX, 11, 12]
    # The third document does not fit in row 0: it starts row 1 with positions from 0; its last 2 tokens are dropped.
    assert r1.position_ids == list(range(8)) and r1.labels[0] == IGNORE_INDEX
    assert segment_ids(torch.tensor(r0.position_ids)).tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    kept = pack_documents(docs, seq_len=8, drop_last=False)
    assert len(kept) == 3 and kept[2].input_ids[:2] == [28, 29] and kept[2].labels[2:] == [IGNORE_INDEX] * 6
    long = pack_documents([list(range(100, 120))], seq_len=8)
    assert all(max(r.position_ids) <= 7 for r in long)
    # A long document is cut only at row ends: its second row is one segment with positions 0..7.
    spans = pack_documents([list(range(1, 6)), list(range(100, 120))], seq_len=8)
    assert spans[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2] and spans[1].position_ids == list(range(8))
    assert spans[1].input_ids == list(range(103, 111)) and spans[1].labels[0] == IGNORE_INDEX


def test_packed_rows_do_not_attend_across_documents(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sparsek")
    hf_sparsek.set_pattern(model, PATTERN)
    gen = torch.Generator().manual_seed(3)
    doc1, doc2 = torch.randint(0, 48, (100,), generator=gen), torch.randint(0, 48, (156,), generator=gen)
    batch = collate_packed(PackedDataset(pack_documents([doc1.tolist(), doc2.tolist()], seq_len=256)))
    model.eval()
    with torch.no_grad():
        # Without a cache, as in training: transformers detects packing only then (for every implementation).
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone2 = model(input_ids=doc2[None], use_cache=False).logits
        alone1 = model(input_ids=doc1[None], use_cache=False).logits
        unpacked = model(input_ids=batch["input_ids"]).logits  # same tokens as one sequence: doc 2 sees doc 1
    torch.testing.assert_close(packed[0, 100:], alone2[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, :100], alone1[0], rtol=1e-5, atol=1e-5)
    assert (unpacked[0, 100:] - alone2[0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ training
def test_full_finetune_learns_and_checkpoint_reloads(tiny_dir, tmp_path):
    result = finetune(_cli_config(tiny_dir, tmp_path, "--eval-steps", "3"))
    m = result.metrics
    assert m["eval_after"]["nll"] < m["eval_before"]["nll"] - 0.05
    losses = [loss for _, loss in m["losses"]]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    log = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert any("eval_ppl" in e for e in log) and any("loss" in e for e in log)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final", attn_implementation="sparsek")
    assert hf_sparsek.model_sparsity(reloaded.config).default == PATTERN
    assert reloaded.config._attn_implementation == "sparsek"
    probe = _probe()
    torch.testing.assert_close(_logits(reloaded, probe), _logits(result.model, probe), rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sparsek")
    assert (_logits(base, probe) - _logits(reloaded, probe)).abs().max() > 1e-3  # training changed the weights


def test_lora_adapter_and_merged_reload(tiny_dir, tmp_path):
    result = finetune(_cli_config(tiny_dir, tmp_path, "--lora-r", "4", "--max-steps", "3", "--no-eval-before"))
    trained = result.model
    probe = _probe()
    expected = _logits(trained, probe)
    attached = load_finetuned(tmp_path / "final" / "adapter")
    assert hf_sparsek.model_sparsity(attached.get_base_model().config).default == PATTERN
    # Every saved adapter carries the pattern it was trained under: the final one and each Trainer checkpoint's.
    for folder in (tmp_path / "final" / "adapter", tmp_path / "checkpoint-3"):
        saved = json.loads((folder / PATTERN_FILE).read_text())
        assert hf_sparsek.ModelSparsity.from_dict(saved).default == PATTERN
    torch.testing.assert_close(_logits(attached, probe), expected, rtol=0, atol=0)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final", attn_implementation="sparsek")
    assert hf_sparsek.model_sparsity(merged.config).default == PATTERN
    torch.testing.assert_close(_logits(merged, probe), expected, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sparsek")
    assert (_logits(base, probe) - expected).abs().max() > 1e-4  # the adapter is not a no-op


def test_finetune_from_python_with_a_config(tiny_dir, tmp_path):
    """The Python API: a FinetuneConfig with a pattern object and a Path, no command line; the dense evaluation of
    the same weights leaves the model on its own attention and pattern."""
    config = FinetuneConfig(
        model=tiny_dir, output_dir=tmp_path / "run", pattern=PATTERN, train_data="synthetic", synthetic_docs=24,
        heldout_docs=3, seq_len=SEQ, batch_size=2, lr=5e-3, dtype="fp32", scheduler="constant", max_steps=4,
        save_steps=0, eval_max_windows=6, eval_also_attn="sdpa", cpu=True,
    )
    assert config.output_dir == str(tmp_path / "run")
    result = finetune(config)
    m = result.metrics
    assert m["eval_after"]["nll"] < m["eval_before"]["nll"] - 0.05
    assert m["eval_after_sdpa"]["ppl"] != m["eval_after"]["ppl"]  # a dense evaluation, not the sparse one again
    assert result.model.config._attn_implementation == "sparsek"
    assert hf_sparsek.model_sparsity(result.model.config).default == PATTERN
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["eval_after"] == m["eval_after"]
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # save_steps=0: no Trainer checkpoints
    reloaded = load_finetuned(tmp_path / "run" / "final")
    probe = _probe()
    torch.testing.assert_close(_logits(reloaded, probe), _logits(result.model, probe), rtol=0, atol=0)


@pytest.mark.parametrize(("field", "value"), [
    ("grad_accum", 0), ("seq_len", 1), ("lora_r", -1), ("batch_size", 2.0), ("eval_seq_len", 1), ("seed", -3),
    ("lr", 0.0), ("lr", float("nan")), ("weight_decay", -0.1), ("attn", "flash"), ("dtype", "int8"),
    ("eval_also_attn", "flash"), ("data_order", "shuffled"), ("cpu", "yes"), ("merge_lora", 1), ("model", ""),
    ("pattern", 42), ("eval_pattern", ["window"]), ("lora_targets", " , "), ("resume", ""),
    ("pattern", "no-such-preset"), ("pattern", '{"window": -1}'), ("pattern", '{"windw": 64}'),
    ("eval_pattern", "random10"),  # without eval_also_attn="sparsek" it would apply to nothing
])
def test_bad_config_field_is_a_value_error_naming_it(field, value):
    kwargs = {"model": "m", "output_dir": "o", field: value}
    with pytest.raises(ValueError, match=rf"^FinetuneConfig\.{field}=.*: expected "):
        FinetuneConfig(**kwargs)


def test_a_pattern_for_dense_attention_is_refused_and_eval_pattern_needs_a_sparse_evaluation():
    with pytest.raises(ValueError, match=r"^FinetuneConfig\.pattern=.*expected None with attn='sdpa'"):
        FinetuneConfig(model="m", output_dir="o", attn="sdpa", pattern="random10")
    with pytest.raises(ValueError, match=r"^FinetuneConfig\.eval_pattern=.*eval_also_attn is 'sdpa'"):
        FinetuneConfig(model="m", output_dir="o", eval_also_attn="sdpa", eval_pattern="random10")
    ok = FinetuneConfig(model="m", output_dir="o", attn="sdpa", eval_also_attn="sparsek", eval_pattern="random10")
    assert ok.eval_pattern == "random10"


def test_finetune_takes_only_a_config(tmp_path):
    with pytest.raises(TypeError, match="takes a FinetuneConfig, got Namespace"):
        finetune(argparse.Namespace(model="m", output_dir=str(tmp_path)))


def test_resume_continues_the_same_run(tiny_dir, tmp_path):
    first = finetune(_cli_config(tiny_dir, tmp_path, "--max-steps", "4", "--save-steps", "2", "--no-eval-before"))
    losses = dict(first.metrics["losses"])
    for step in (3, 4):
        del losses[step]
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-4")
    resumed = finetune(_cli_config(tiny_dir, tmp_path, "--max-steps", "4", "--save-steps", "2", "--resume", "last"))
    after = dict(resumed.metrics["losses"])
    assert sorted(after) == [1, 2, 3, 4]  # the restored state carries the first two steps' log
    assert resumed.metrics["steps_this_run"] == 2 and first.metrics["steps_this_run"] == 4
    for step in (3, 4):
        assert after[step] == pytest.approx(dict(first.metrics["losses"])[step], rel=1e-5)


# ------------------------------------------------------------------------------------------------ errors
def test_clear_errors(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        load_model(tiny_dir, seq_len=1024)
    with pytest.raises(ValueError, match="fp16 mixed-precision training needs a CUDA device"):
        load_model(tiny_dir, seq_len=128, dtype="fp16", device="cpu")
    with pytest.raises(ValueError, match="block_size"):
        load_model(tiny_dir, pattern='{"block_size": 32, "window": 64}')
    with pytest.raises(ValueError, match="no trainable parameters"):
        finetune(_cli_config(tiny_dir, tmp_path, "--train-only-pattern"))
    with pytest.raises(ValueError, match="longer than the model"):
        finetune(_cli_config(tiny_dir, tmp_path, "--seq-len", "4096"))
    with pytest.raises(ValueError, match="eval_seq_len=4096 is longer than the model's max_position_embeddings"):
        finetune(_cli_config(tiny_dir, tmp_path / "e", "--eval-seq-len", "4096"))
    assert not (tmp_path / "e" / "metrics.json").exists()
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "vit")
    with pytest.raises(ValueError, match="no causal-LM class"):
        load_model(str(tmp_path / "vit"))
    LlamaConfig(**{**_tiny_config().to_dict(), "attention_dropout": 0.1}).save_pretrained(tmp_path / "drop")
    with pytest.raises(ValueError, match="attention_dropout"):
        load_model(str(tmp_path / "drop"))


def test_lora_under_the_learned_selector(tiny_dir, tmp_path):
    """A model whose pattern uses selector "learned" (a scorer beside its weights, as ``hf-sparsek distill``
    writes): LoRA trains under it on rows cut from single documents (the selector refuses segment ids), and the
    merged model in final/ carries the scorer: from_pretrained(final) selects as the trained model did. Without a
    scorer the run stops before training, saying how to get one."""
    from hf_sparsek.learned import SCORER_FILE, LearnedSelector, load_selector, save_selector

    learned = {"block_size": 64, "sink_tokens": 4, "window": 64, "topk_blocks": 1, "selector": "learned"}
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    hf_sparsek.set_pattern(base, learned)
    base.save_pretrained(tmp_path / "base")
    selector = LearnedSelector.for_model(base, 64)
    with torch.no_grad():
        for p in selector.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_selector(selector, tmp_path / "base")

    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 48, (n,), generator=gen).tolist() for n in (450, 200, 390, 300)]
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    data = ["--train-data", str(tmp_path / "docs.json"), "--heldout-docs", "1", "--pattern", json.dumps(learned)]
    result = finetune(_cli_config(str(tmp_path / "base"), tmp_path / "run", *data, "--lora-r", "4",
                                  "--max-steps", "2"))
    assert result.metrics["rows"] == "documents"
    assert result.metrics["train_rows"] == len(document_rows(docs[:-1], SEQ)) == 5  # 2 + 1 + 2 rows of 192
    assert result.metrics["eval_after"]["windows"] == 2
    assert (tmp_path / "run" / "final" / SCORER_FILE).is_file()
    assert torch.equal(load_selector(tmp_path / "run" / "final").scorer(0).wq, selector.scorer(0).wq)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", attn_implementation="sparsek")
    probe = _probe()
    torch.testing.assert_close(_logits(merged, probe), _logits(result.model, probe), rtol=1e-5, atol=1e-5)

    # the dense reference of the same rows: --single-documents
    dense = finetune(_cli_config(tiny_dir, tmp_path / "dense", *data[:4], "--attn", "sdpa", "--single-documents",
                                 "--max-steps", "1", "--no-eval-before", pattern=False))
    assert (dense.metrics["rows"], dense.metrics["train_rows"]) == ("documents", 5)

    (tmp_path / "base" / SCORER_FILE).unlink()
    with pytest.raises(ValueError, match="no learned scorer was found"):
        finetune(_cli_config(str(tmp_path / "base"), tmp_path / "run2", *data))
    assert not (tmp_path / "run2").exists()


def test_document_rows_never_cross_a_document():
    docs = [list(range(10)), list(range(100, 103)), list(range(200, 216))]
    rows = document_rows(docs, 5)
    assert [r.input_ids for r in rows] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [200, 201, 202, 203, 204],
                                           [205, 206, 207, 208, 209], [210, 211, 212, 213, 214]]
    assert all(r.position_ids == list(range(5)) and r.labels[0] == IGNORE_INDEX for r in rows)


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    with pytest.raises(ValueError, match="no bf16 support"):
        checks.check_dtype("bf16", "cuda")
    checks.check_dtype("fp32", "cuda")


def test_kernel_that_cannot_train_is_refused(monkeypatch):
    monkeypatch.setattr(checks, "_kernel_reason", lambda head_dim, dtype: f"head dim {head_dim} is not supported")
    config = _tiny_config(hidden_size=40, num_attention_heads=4)
    with pytest.raises(ValueError, match="head dim 10 is not supported"):
        checks.check_kernel(config, "bf16", "cuda")
    assert checks.check_kernel(config, "bf16", "cuda", allow_reference=True) == "reference"
    monkeypatch.setattr(checks, "_kernel_reason", lambda head_dim, dtype: None)
    assert checks.check_kernel(config, "bf16", "cuda") == "triton"
    assert checks.check_kernel(config, "bf16", "cpu") == "reference"


def test_bf16_autocast_training_step_matches_sdpa(tiny_dir):
    """Under autocast RoPE leaves q/k in fp32 and v in bf16: the sparse path must take them like SDPA does."""
    ids = _probe()
    losses = {}
    for attn in ("sparsek", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn)
        if attn == "sparsek":
            hf_sparsek.set_pattern(model, hf_sparsek.SparsePattern(block_size=64))  # dense via the sparse path
        with hf_sparsek.settings(dense_via_sdpa=False), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses[attn] = float(loss.detach())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert losses["sparsek"] == pytest.approx(losses["sdpa"], rel=1e-2)


def test_module_entry_point_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """`python -m hf_sparsek.finetune` reports bad input like `hf-sparsek finetune`: one line, exit code 2."""
    monkeypatch.delenv("HF_SPARSEK_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        ft_cli.main(["--model", "x", "--output-dir", str(tmp_path), "--grad-accum", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m hf_sparsek.finetune: error: argument --grad-accum: expected a whole number >= 1, got 0 "
        "(see python -m hf_sparsek.finetune --help)"]
    assert ft_cli.main(["--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m hf_sparsek.finetune: error: --model ")
    assert "no such checkpoint folder" in err[0]


def test_python_dash_m_is_the_command(tmp_path):
    """`python -m hf_sparsek.finetune` (what `accelerate launch -m` runs) is the finetune command, run from anywhere."""
    env = {k: v for k, v in os.environ.items() if k != "HF_SPARSEK_DEBUG"}
    argv = ["--model", "m", "--output-dir", str(tmp_path / "o"), "--seq-len", "-1"]
    result = subprocess.run([sys.executable, "-m", "hf_sparsek.finetune", *argv], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("python -m hf_sparsek.finetune: error: argument --seq-len: expected a whole "
                                     "number >= 1, got -1 (see python -m hf_sparsek.finetune --help)")


def test_cli_registers_finetune():
    from hf_sparsek.cli import build_parser

    args = build_parser().parse_args(["finetune", "--model", "x", "--output-dir", "y", "--lora-r", "8"])
    assert args.command == "finetune" and args.lora_r == 8 and args.func is ft_cli.run
    config = ft_cli.config_from_args(args)
    assert config == FinetuneConfig(model="x", output_dir="y", lora_r=8)  # the options' defaults are the config's
    no_flags = ft_cli.config_from_args(build_parser().parse_args(
        ["finetune", "--model", "x", "--output-dir", "y", "--no-merge", "--no-eval-before",
         "--no-gradient-checkpointing"]))
    assert (no_flags.merge_lora, no_flags.eval_before, no_flags.gradient_checkpointing) == (False, False, False)


# ------------------------------------------------------------------------------------------------ adaptation driver
def _metrics(attn: str, before: tuple[float, float], after: tuple[float, float]) -> dict:
    """A finetune metrics dict: (sparse ppl, dense ppl) before and after, evaluated both ways."""
    other = "sdpa" if attn == "sparsek" else "sparsek"
    own, alt = (0, 1) if attn == "sparsek" else (1, 0)
    m = {"attn": attn, "losses": [(1, 3.0)], "train_loss": 3.0, "train_tokens_per_second": 1.0, "train_seconds": 1.0}
    for tag, ppl in (("eval_before", before), ("eval_after", after)):
        m[tag] = {"ppl": ppl[own]}
        m[f"{tag}_{other}"] = {"ppl": ppl[alt]}
    return m


def test_adaptation_summary_and_verdict():
    from scripts import gpu_finetune as gf

    sparse = _metrics("sparsek", before=(50.0, 40.0), after=(42.0, 36.5))
    dense = _metrics("sdpa", before=(50.0, 40.0), after=(45.0, 36.0))
    runs, table = gf.summarize_metrics(sparse, dense)
    assert runs["trained sparse"]["ppl"] == {"sparsek": (50.0, 42.0), "sdpa": (40.0, 36.5)}
    assert runs["trained dense (sdpa)"]["ppl"] == {"sdpa": (40.0, 36.0), "sparsek": (50.0, 45.0)}
    assert "| trained dense (sdpa) | sparsek | 50.000 | 45.000 | 1.2500 |" in table
    verdict = gf.adaptation_verdict(runs)
    assert verdict["sparse_trained_wins"] is True
    assert verdict["sparse_ppl_ratio_sparse_vs_dense_trained"] == pytest.approx(42 / 45)
    assert verdict["gap_before"] == pytest.approx(0.25)
    assert verdict["gap_after_sparse_trained"] == pytest.approx(42 / 36 - 1)
    assert "lower than the dense-trained model" in verdict["line"] and "not lower" not in verdict["line"]
    # Domain fit only: the dense-trained model reaches the same sparse ppl.
    same = gf.adaptation_verdict(gf.summarize_metrics(sparse, _metrics("sdpa", (50.0, 40.0), (41.0, 36.0)))[0])
    assert same["sparse_trained_wins"] is False and "not lower" in same["line"]
    result = {"model": "m", "lora_r": 16, "lora_alpha": 32, "lora_targets": "q_proj", "dtype": "bf16", "seq_len": 8192,
              "max_steps": 2, "epochs": 1.0, "train_rows": 2, "lr": 1e-3, "warmup_steps": 0,
              "patterns": {"B": {"describe": "sink 64 + window 256, block 128", "sparsity": {"dense_layers": []},
                                 "density": 0.1},
                           "C": {"describe": "x", "sparsity": {"dense_layers": [1]}, "density": 0.5}},
              "runs": {"sparse_B": {"metrics": sparse}, "dense_B": {"metrics": dense},
                       "sparse_C": {"skipped": "time budget"}},
              "summary": {"B": {"table": table, "verdict": verdict}}}
    text = gf.adapt_markdown(result)
    assert table in text and verdict["line"] in text and "incomplete: {'sparse_C': 'time budget'}" in text


def test_split_plays_keeps_order_and_refuses_unknown_names():
    from scripts import gpu_finetune as gf

    assert gf.split_plays(["a", "b", "c", "d"], ["c", "a"]) == (["b", "d"], ["a", "c"])
    with pytest.raises(ValueError, match="not in the corpus"):
        gf.split_plays(["a", "b"], ["hamlet"])


def test_adapt_runs_pairs_and_skips_half_pairs_for_time(tiny_dir, tmp_path, monkeypatch):
    """The driver runs each pattern's sparse- and dense-trained fine-tunes; when a pattern's sparse run does not
    fit the time budget its dense run is skipped too (half a pair answers nothing), while a failed sparse run
    still lets the dense one go."""
    import argparse
    import types

    from scripts import gpu_finetune as gf

    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(gf, "time", types.SimpleNamespace(time=lambda: clock.now))
    cost = {"sparse": 100.0, "dense": 50.0}
    launched = []

    def fake_run(cmd, stdout=None, stderr=None):
        out = Path(cmd[cmd.index("--output-dir") + 1])
        kind = "sparse" if cmd[cmd.index("--attn") + 1] == "sparsek" else "dense"
        launched.append(out.name)
        clock.now += cost[kind]
        if out.name == "sparse_P2":
            return types.SimpleNamespace(returncode=1)
        out.mkdir(parents=True)
        m = _metrics("sparsek" if kind == "sparse" else "sdpa", (50.0, 40.0), (42.0, 36.0))
        (out / "metrics.json").write_text(json.dumps(m))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(gf.subprocess, "run", fake_run)
    torch.save([list(range(1, 40)), list(range(2, 60))], tmp_path / "docs.pt")
    pat = json.dumps(PATTERN.to_dict())
    args = argparse.Namespace(
        model=tiny_dir, train_data=str(tmp_path / "docs.pt"), eval_data=str(tmp_path / "docs.pt"), seq_len=64,
        max_steps=2, lr=1e-3, warmup_steps=0, lora_r=4, lora_alpha=8, lora_targets="q_proj", dtype="fp32",
        logging_steps=1, eval_max_windows=None, cpu=True, work=str(tmp_path / "work"), budget_s=420.0,
        patterns=[f"P1={pat}", f"P2={pat}", f"P3={pat}"])
    result = gf.adapt(args)
    # P1 pair: 150 s; P2: sparse fails, its dense still runs (300 s in all); P3's sparse (expected 150 s) no longer
    # fits 420 s, and its dense run, which would fit alone, is skipped with it.
    assert launched == ["sparse_P1", "dense_P1", "sparse_P2", "dense_P2"]
    assert "skipped" in result["runs"]["sparse_P3"] and "skipped" in result["runs"]["dense_P3"]
    assert "P1" in result["summary"] and "P2" not in result["summary"]


def test_token_files_are_checked(tmp_path):
    """A token file that does not exist, float ids and ids beyond the vocabulary are refused by name before any
    training (they were an IndexError after the first evaluation, or silently truncated)."""

    from hf_sparsek.finetune.data import load_token_documents

    with pytest.raises(ValueError, match="does not exist"):
        load_token_documents(str(tmp_path / "missing.pt"))
    floats = tmp_path / "floats.json"
    floats.write_text(json.dumps([[1.5, 2, 3]]))
    with pytest.raises(ValueError, match="1.5"):
        load_token_documents(str(floats))
    big = tmp_path / "big.json"
    big.write_text(json.dumps([[5, 6, 7], [300, 2]]))
    with pytest.raises(ValueError, match=r"document 1 holds token id 300.*\[0, 256\)"):
        load_token_documents(str(big), vocab_size=256)
    assert load_token_documents(str(big)) == [[5, 6, 7], [300, 2]]
