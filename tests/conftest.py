"""Shared test setup: deterministic seeds per test, fresh random inputs (never zeros)."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    # A different seed per test id, so tests do not all see the same draws, and the same seed in every process
    # (``hash()`` of a string changes with PYTHONHASHSEED, which made failures unrepeatable).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def dense_masked_attention(q, k, v, mask, scale, softcap=None):
    """fp64 masked-softmax attention on a dense (B|1, Hkv|1, Lq, Lk) boolean mask: the math the op must equal."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    mask = mask.expand(q.shape[0], k.shape[1] // group, -1, -1).repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ v


@contextlib.contextmanager
def triton_interpreter(*kernel_modules: str) -> Iterator[None]:
    """TRITON_INTERPRET=1, with Triton's standard library and the named ``hf_sparsek.kernels`` modules re-imported in
    interpreter mode where an earlier import compiled them (``@triton.jit`` picks its mode at import). Skips where
    Triton is missing or its interpreter cannot run here (Triton < 3.7 needs numpy < 2)."""
    triton = pytest.importorskip("triton")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7) and int(
            __import__("numpy").__version__[0]) >= 2:
        pytest.skip(f"Triton {triton.__version__}'s interpreter needs numpy<2")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language.standard as tl_standard
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        if not isinstance(tl_standard.cdiv, InterpretedFunction):
            importlib.reload(tl_standard)
            importlib.reload(sys.modules["triton.language"])
        # The shared @triton.jit helpers first: a kernel module reloaded over a compiled ``common`` would call
        # compiled helpers from interpreted code.
        for name in ["common", *(n for n in kernel_modules if n != "common")]:
            module = importlib.import_module(f"hf_sparsek.kernels.{name}")
            if any(isinstance(value, JITFunction) for value in vars(module).values()):  # compiled by an earlier import
                importlib.reload(module)
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def tiny_llama_with_docs(root: Path, documents: int = 2, words_per_document: int = 1500,
                         layers: int = 3) -> tuple[Path, Path]:
    """(model folder, documents folder) under ``root``: a random 4 / 2-head Llama with a byte-level BPE tokenizer
    trained on ``documents`` random-word texts, which the folder holds (what the ``eval`` commands read)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the king queen sword crown night day love death honour blood fair foul rose thorn".split()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (words_per_document,), generator=g))
             for _ in range(documents)]
    (root / "docs").mkdir()
    for i, text in enumerate(texts):
        (root / "docs" / f"{i}.txt").write_text(text)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(model_dir)
    return model_dir, root / "docs"
