"""A LoRA adapter trained under a sparse pattern, loaded back through peft's own loaders.

peft reads two things from an adapter folder: ``adapter_config.json`` (into a LoraConfig: its known fields only, other
keys are dropped with a warning) and the adapter weights (into the LoRA layers). Nothing from the folder reaches the
base model's config, where the pattern lives (``config.sparsek``), so the pattern travels as ``sparsek_pattern.json``
beside the adapter. These tests check that the file is there and restores the trained logits through
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM.from_pretrained``, and that a sparsek model that runs
a LoRA adapter loaded for inference with no pattern chosen refuses to run instead of silently using its model
type's default.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_sparsek
from hf_sparsek.finetune import PATTERN_FILE, write_adapter_pattern

peft = pytest.importorskip("peft")

PATTERN = hf_sparsek.SparsePattern(block_size=64, sink_tokens=4, window=64)
SEQ = 192  # three 64-token blocks: the pattern is sparse here, the llama default (min_sparse_len 512) is dense
VOCAB = 48


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """(adapter folder, probe ids, logits of the model as trained): LoRA on a base set to PATTERN, with random
    (non-zero) LoRA weights standing in for training, saved the way ``hf-sparsek finetune`` saves it."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="sparsek")
    hf_sparsek.set_pattern(base, PATTERN)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    write_adapter_pattern(model, folder)
    probe = torch.randint(0, VOCAB, (1, SEQ), generator=gen)
    return folder, probe, _logits(model, probe)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_folder_carries_the_pattern_and_says_how_to_restore_it(trained):
    folder, _, _ = trained
    saved = hf_sparsek.ModelSparsity.from_dict(json.loads((folder / PATTERN_FILE).read_text()))
    assert saved.default == PATTERN
    readme = (folder / "README.md").read_text()
    assert PATTERN_FILE in readme and "hf_sparsek.set_pattern(base" in readme


def test_peft_from_pretrained_with_the_pattern_file_gives_the_trained_logits(base_dir, trained):
    folder, probe, expected = trained
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="sparsek")
    hf_sparsek.set_pattern(base, str(folder / PATTERN_FILE))
    model = peft.PeftModel.from_pretrained(base, folder)
    torch.testing.assert_close(_logits(model, probe), expected, rtol=0, atol=0)
    # The check can fail: the same adapter under the model type's default pattern gives other logits.
    hf_sparsek.set_pattern(base, hf_sparsek.default_sparsity("llama"))
    assert (_logits(model, probe) - expected).abs().max() > 1e-3


def test_auto_peft_model_with_the_pattern_file_gives_the_trained_logits(trained, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # AutoPeftModel looks for a tokenizer on the hub otherwise
    folder, probe, expected = trained
    model = peft.AutoPeftModelForCausalLM.from_pretrained(folder, attn_implementation="sparsek")
    hf_sparsek.set_pattern(model.get_base_model(), str(folder / PATTERN_FILE))
    torch.testing.assert_close(_logits(model, probe), expected, rtol=0, atol=0)


def test_peft_from_pretrained_without_a_chosen_pattern_refuses_to_run(base_dir, trained):
    """peft cannot bring the pattern back: running the adapter on a base with no pattern chosen would silently use
    the llama default (dense at this length), so the first forward must fail and say how to set the pattern."""
    folder, probe, _ = trained
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="sparsek")
    model = peft.PeftModel.from_pretrained(base, folder)
    with pytest.raises(ValueError, match=r"set_pattern.*sparsek_pattern\.json"):
        _logits(model, probe)


def test_auto_peft_model_without_a_chosen_pattern_refuses_to_run(trained, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, probe, _ = trained
    model = peft.AutoPeftModelForCausalLM.from_pretrained(folder, attn_implementation="sparsek")
    with pytest.raises(ValueError, match=r"set_pattern.*sparsek_pattern\.json"):
        _logits(model, probe)


def test_choosing_the_default_explicitly_runs(base_dir, trained):
    """The refusal asks for a choice, not for this pattern: a base with any pattern set runs the adapter."""
    folder, probe, expected = trained
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="sparsek")
    hf_sparsek.set_pattern(base, hf_sparsek.default_sparsity("llama"))
    model = peft.PeftModel.from_pretrained(base, folder)
    assert _logits(model, probe).shape == expected.shape


def test_a_new_adapter_being_trained_runs_under_the_default(base_dir):
    """get_peft_model on a base with no pattern chosen: trainable adapter weights, the model type's default runs (the
    refusal is for adapters loaded for inference, whose training pattern peft cannot bring back)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="sparsek")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                                      target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, VOCAB, (1, 70))
    model(input_ids=ids, labels=ids).loss.backward()
    assert hf_sparsek.model_sparsity(base.config) == hf_sparsek.default_sparsity("llama")
