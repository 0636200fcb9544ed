"""Training and held-out documents as token-id lists: from token files, a text source through the model's
tokenizer, or synthetic motifs (tests and throughput)."""

from __future__ import annotations

import json
import numbers
from pathlib import Path

from .config import FinetuneConfig

SYNTHETIC = "synthetic"


def load_token_documents(source: str, tokenizer_path: str | None = None, vocab_size: int | None = None
                         ) -> list[list[int]]:
    """Token-id documents from a ``.pt``/``.json`` file (a list of lists of ints) or a text source name.

    A text source (``shakespeare``) goes through ``hf_sparsek.eval.offline.load_documents`` and the model's
    tokenizer (no BOS/EOS added: each play is one document). Token ids must be whole numbers in
    [0, ``vocab_size``) (ValueError naming the first bad one; ``vocab_size`` None: only >= 0 is checked).
    """
    import torch

    path = Path(source)
    if path.suffix in (".pt", ".json") and not path.is_file():
        raise ValueError(f"token file {source!r} does not exist")
    if path.suffix == ".pt" and path.is_file():
        docs = torch.load(path)
    elif path.suffix == ".json" and path.is_file():
        docs = json.loads(path.read_text())
    else:
        try:
            from hf_sparsek.eval.offline import load_documents
        except ImportError as exc:
            raise ValueError(
                f"data {source!r}: not a .pt/.json token file, and hf_sparsek.eval.offline is missing"
            ) from exc
        if tokenizer_path is None:
            raise ValueError("a text data source needs the model's tokenizer (--model dir with tokenizer files)")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_path)
        docs = [tok(text, add_special_tokens=False)["input_ids"] for text in load_documents(source)]
    if isinstance(docs, torch.Tensor) and docs.dim() == 2:
        docs = docs.tolist()
    if not isinstance(docs, list) or not docs or not all(isinstance(d, (list, tuple, torch.Tensor)) for d in docs):
        raise ValueError(f"data {source!r} must hold a non-empty list of token-id lists")
    out = []
    for i, doc in enumerate(docs):
        ids = doc.tolist() if isinstance(doc, torch.Tensor) else list(doc)
        for t in ids:
            if (isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0
                    or (vocab_size is not None and t >= vocab_size)):
                allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
                raise ValueError(f"data {source!r}: document {i} holds token id {t!r}; token ids must be whole "
                                 f"numbers {allowed} (the model's vocabulary)")
        out.append([int(t) for t in ids])
    return out


def synthetic_documents(n_docs: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """Learnable synthetic documents (for tests and throughput): each repeats a short random motif."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        motif = torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen)
        docs.append(motif.repeat(length // len(motif) + 1)[:length].tolist())
    return docs


def training_documents(
    config: FinetuneConfig, vocab_size: int, model_path: str
) -> tuple[list[list[int]], list[list[int]] | None]:
    """(training documents, held-out documents or None) as token ids, from ``train_data`` / ``eval_data`` /
    ``heldout_docs`` (the last N training documents, e.g. plays the model is not trained on)."""
    if config.train_data == SYNTHETIC:
        docs = synthetic_documents(config.synthetic_docs, vocab_size, config.seq_len // 4, config.seq_len,
                                   seed=config.seed)
    else:
        docs = load_token_documents(config.train_data, model_path, vocab_size)
    eval_docs = load_token_documents(config.eval_data, model_path, vocab_size) if config.eval_data else None
    if config.eval_data is None and config.heldout_docs:
        if config.heldout_docs >= len(docs):
            raise ValueError(f"--heldout-docs {config.heldout_docs} leaves no training documents (have {len(docs)})")
        docs, eval_docs = docs[: -config.heldout_docs], docs[-config.heldout_docs :]
    return docs, eval_docs
