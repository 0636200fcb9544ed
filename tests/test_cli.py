"""`hf-sparsek describe` prints the resolved per-layer pattern and density of a model config."""

from __future__ import annotations

from transformers import Gemma3TextConfig

from hf_sparsek.cli import main


def test_describe_prints_layers_and_density(tmp_path, capsys):
    config = Gemma3TextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=512,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    config.save_pretrained(tmp_path)
    assert main(["describe", str(tmp_path), "--seq-len", "8192", "--pattern", "sink128-window1024"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 3
    assert "sliding (model)" in lines[0] and "window 512" in lines[0]
    assert "sink 128 + window 1024" in lines[2]
    full_density = float(lines[2].split()[2])
    # sink 128 + window 1024 at 8192: about (1024 * 8192 - 1024**2 / 2 + 128 * 7168) / (8192**2 / 2)
    expected = (1024 * 8192 - 1024 * 1023 / 2 + 128 * (8192 - 1024 - 64)) / (8192 * 8193 / 2)
    assert abs(full_density - expected) < 0.01
