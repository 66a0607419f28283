"""Right-padding collators shared by the DataModules."""

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


class SFTCollator:
    """Pads ``input_ids`` with the pad token and ``labels`` with ``-100``; builds the attention mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        input_ids = pad_sequences(ids, self.pad_token_id, self.pad_to_multiple_of)
        attention_mask = pad_sequences([[1] * len(s) for s in ids], 0, self.pad_to_multiple_of)
        labels = pad_sequences([r["labels"] for r in rows], IGNORE_INDEX, self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
