"""attn_implementation="sparsek" works without `import hf_sparsek` through the site-packages startup hook."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    {hook}
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    assert "hf_sparsek" not in sys.modules or {expect_loaded}
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sparsek")
    print(model(torch.randint(0, 50, (1, 9))).logits.shape, "hf_sparsek" in sys.modules)
    """
)


def run(hook: str, env_off: bool = False) -> subprocess.CompletedProcess:
    env = {"HF_SPARSEK_NO_AUTOLOAD": "1"} if env_off else {}
    import os

    return subprocess.run([sys.executable, "-c", SCRIPT.format(hook=hook, expect_loaded=True)], capture_output=True,
                          text=True, timeout=180, env={**os.environ, **env})


def test_pth_line_installs_the_hook():
    line = (ROOT / "hf_sparsek_autoload.pth").read_text().strip()
    result = run(line)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 9, 50]) True" in result.stdout


def test_without_hook_transformers_refuses_sparsek():
    line = (ROOT / "hf_sparsek_autoload.pth").read_text().strip()
    result = run(line, env_off=True)
    assert result.returncode != 0
    assert "sparsek" in result.stderr


def test_setup_ships_the_pth_file():
    assert "hf_sparsek_autoload.pth" in (ROOT / "setup.py").read_text()


def test_source_checkout_maps_folders_to_subpackages(tmp_path, monkeypatch):
    """Without an install, <repo>/kernels etc. import as <package>.kernels, like pyproject's package-dir."""
    from hf_sparsek._source_tree import map_source_subpackages

    (tmp_path / "srcpkg").mkdir()
    (tmp_path / "srcpkg" / "__init__.py").write_text("")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("MARKER = 7\n")
    (tmp_path / "kernels" / "extra.py").write_text("VALUE = 11\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    package = importlib.import_module("srcpkg")
    try:
        map_source_subpackages(package)
        assert importlib.import_module("srcpkg.kernels").MARKER == 7
        assert importlib.import_module("srcpkg.kernels.extra").VALUE == 11
        assert "srcpkg.eval" not in sys.modules  # no such folder: nothing registered
    finally:
        for name in [n for n in sys.modules if n == "srcpkg" or n.startswith("srcpkg.")]:
            del sys.modules[name]
