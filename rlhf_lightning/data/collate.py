"""Collators shared by the DataModules: right-padded rows, or one packed padding-free row."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int, pad_to_multiple_of: int = 1) -> torch.Tensor:
    """Right-pad a list of int sequences into one ``(batch, max_len)`` long tensor."""
    length = max(len(s) for s in sequences)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


def pack_segments(segments: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, torch.Tensor]:
    """``(input_ids, labels)`` of each sample -> one packed row (layout: :mod:`rlhf_lightning.data.packing`)."""
    ids, labels, positions, segment_ids = [], [], [], []
    for s, (seq, seq_labels) in enumerate(segments):
        ids.extend(seq)
        labels.extend([IGNORE_INDEX, *seq_labels[1:]])
        positions.extend(range(len(seq)))
        segment_ids.extend([s] * len(seq))
    row = {"input_ids": ids, "position_ids": positions, "labels": labels, "segment_ids": segment_ids}
    return {key: torch.tensor([values], dtype=torch.long) for key, values in row.items()}


class SFTCollator:
    """Pads ``input_ids`` with the pad token and ``labels`` with ``-100``; builds the attention mask. With
    ``packing`` the rows are concatenated into one padding-free row instead (:mod:`rlhf_lightning.data.packing`)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1, packing: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packing = packing

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.packing:
            return pack_segments([(r["input_ids"], r["labels"]) for r in rows])
        ids = [r["input_ids"] for r in rows]
        input_ids = pad_sequences(ids, self.pad_token_id, self.pad_to_multiple_of)
        attention_mask = pad_sequences([[1] * len(s) for s in ids], 0, self.pad_to_multiple_of)
        labels = pad_sequences([r["labels"] for r in rows], IGNORE_INDEX, self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
