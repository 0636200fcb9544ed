"""Pack tokenized documents into fixed-length training rows with no attention across document boundaries.

Each row holds ``seq_len`` tokens made of whole documents (or pieces of long ones) laid end to end. Positions
restart at 0 for every document and ``attention_mask`` is left out: transformers detects the restarts (without a
cache, as in training) and folds them into the mask function it hands ``attn_implementation="sparsek"``, which then
attends only inside each document, like flash-attention's packed path in transformers. The first token of every
document gets label -100, so no token is trained to predict the start of the next document.

Row picture (two documents of 3 and 5 tokens, seq_len 8)::

    input_ids     a0 a1 a2 b0 b1 b2 b3 b4
    position_ids   0  1  2  0  1  2  3  4
    labels      -100 a1 a2 -100 b1 b2 b3 b4   (the model shifts labels by one inside its loss)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PackedRow:
    """One training row: ``input_ids``, ``position_ids`` and ``labels``, each of length ``seq_len``."""

    input_ids: list[int]
    position_ids: list[int]
    labels: list[int]


def pack_documents(
    docs: Sequence[Sequence[int]],
    seq_len: int,
    pad_token_id: int = 0,
    drop_last: bool = True,
    min_doc_len: int = 2,
) -> list[PackedRow]:
    """Greedy in-order packing of token-id documents into rows of exactly ``seq_len`` tokens.

    A document that does not fit in the space left in the current row continues in the next row, with positions
    from 0 again (a new segment), so no position exceeds ``seq_len - 1`` and a document is cut only at row ends.
    ``drop_last`` drops a final row that would need padding; otherwise it is padded with ``pad_token_id`` as one
    more segment whose labels are all -100. Documents shorter than ``min_doc_len`` are skipped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    rows: list[PackedRow] = []
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []

    def flush() -> None:
        rows.append(PackedRow(list(ids), list(pos), list(labels)))
        ids.clear(), pos.clear(), labels.clear()

    for doc in docs:
        doc = list(doc)
        if len(doc) < min_doc_len:
            continue
        while doc:
            room = seq_len - len(ids)
            piece, doc = doc[:room], doc[room:]
            if len(piece) < min_doc_len and len(ids) > 0:
                # A 1-token fragment trains nothing; start a fresh row for it instead.
                doc = piece + doc
                _pad_row(ids, pos, labels, seq_len, pad_token_id)
                flush()
                continue
            ids.extend(piece)
            pos.extend(range(len(piece)))
            labels.extend([IGNORE_INDEX] + piece[1:])
            if len(ids) == seq_len:
                flush()
    if ids and not drop_last:
        _pad_row(ids, pos, labels, seq_len, pad_token_id)
        flush()
    return rows


def document_rows(docs: Sequence[Sequence[int]], seq_len: int) -> list[PackedRow]:
    """Rows of ``seq_len`` tokens, each cut from one document (positions 0..seq_len-1, no boundary inside a row);
    a document's last piece shorter than ``seq_len`` is dropped. For patterns whose selector scores a row as one
    sequence and refuses segment ids (selector "learned"): what :func:`pack_documents` would pack across
    documents is left out instead."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    rows = []
    for doc in docs:
        doc = list(doc)
        for start in range(0, len(doc) - seq_len + 1, seq_len):
            piece = doc[start : start + seq_len]
            rows.append(PackedRow(piece, list(range(seq_len)), [IGNORE_INDEX] + piece[1:]))
    return rows


def _pad_row(ids: list[int], pos: list[int], labels: list[int], seq_len: int, pad_token_id: int) -> None:
    """Fill a row with a padding segment (positions from 0, labels -100): it attends only to itself."""
    n = seq_len - len(ids)
    ids.extend([pad_token_id] * n)
    pos.extend(range(n))
    labels.extend([IGNORE_INDEX] * n)


class PackedDataset(torch.utils.data.Dataset):
    """A list of :class:`PackedRow` as a map-style dataset of dicts of 1-D long tensors (for the HF Trainer)."""

    def __init__(self, rows: Sequence[PackedRow]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        return {
            "input_ids": torch.tensor(row.input_ids, dtype=torch.long),
            "position_ids": torch.tensor(row.position_ids, dtype=torch.long),
            "labels": torch.tensor(row.labels, dtype=torch.long),
        }


def collate_packed(features: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack packed rows into a batch; no attention_mask, so the positions carry the document boundaries."""
    return {key: torch.stack([f[key] for f in features]) for key in ("input_ids", "position_ids", "labels")}


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Segment index of every token from positions that restart at 0 (for tests and inspection)."""
    starts = position_ids == 0
    return torch.cumsum(starts.long(), dim=-1) - 1
