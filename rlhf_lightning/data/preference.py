"""Preference data: (prompt, chosen, rejected[, margin]) pairs for reward models and the DPO family, and
unpaired (prompt, completion, label) data for KTO.

Where the prompt comes from: the ``prompt_key`` column when the file has one; otherwise the part chosen and
rejected share (Anthropic HH transcripts or full chats, :mod:`rlhf_lightning.data.transcripts`). HH string
transcripts are tokenized as the text they are (no chat template; see that module for why). The summary line
logged for each source says which layout was found and shows one decoded example.

KTO from paired data: :class:`UnpairedPreferenceDataModule` given a file with chosen/rejected columns (and no
completion column) unpairs it: one desirable and one undesirable row per pair, with the same prompt.

Truncation policy (``max_len``): the prompt is cut from the left until ``prompt + response`` fits, for both
responses of a pair alike; responses are never cut. A pair whose response alone leaves no room is dropped.
Both counts are reported.

Bad rows (missing or empty prompt/response, chosen identical to rejected, non-boolean KTO label) are reported
by file and line; ``on_bad_rows: error`` stops the run, ``skip`` drops them and says how many.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_warn

from rlhf_lightning.data.base import BaseDataModule
from rlhf_lightning.data.collate import IGNORE_INDEX, pack_segments, pad_sequences
from rlhf_lightning.data.formatting import encode_prompt_response, fit_prompt
from rlhf_lightning.data.packing import check_packing_options
from rlhf_lightning.data.sources import require_columns
from rlhf_lightning.data.transcripts import (
    ASSISTANT_MARKER,
    BadRow,
    shared_leading_messages,
    shared_prefix_prompt,
    split_chat,
    split_transcript,
)
from rlhf_lightning.errors import ConfigError, DataError

Conversation = str | list[dict[str, Any]]
__all__ = ["BadRow", "PreferenceCollator", "PreferenceDataModule", "UnpairedCollator", "UnpairedPreferenceDataModule"]


def text_of(value: Any) -> Conversation:
    """A cell as a non-empty string or message list (numbers become strings); raises :class:`BadRow`."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise BadRow(f"empty or missing value ({value!r})")


def answer_of(response: Conversation) -> str:
    """The answer text of a response given as a string or as a full chat ending with the assistant's message."""
    return split_chat(response)[1] if isinstance(response, list) else response

def collate_rows(seqs: list[list[int]], labels: list[list[int]], pad_token_id: int,
                 packing: bool) -> dict[str, torch.Tensor]:
    """Sequences and their labels as one padded batch, or as one packed row (segment ``i`` = sequence ``i``)."""
    if packing:
        return pack_segments(list(zip(seqs, labels, strict=True)))
    return {"input_ids": pad_sequences(seqs, pad_token_id),
            "attention_mask": pad_sequences([[1] * len(s) for s in seqs], 0),
            "labels": pad_sequences(labels, IGNORE_INDEX)}


class PreferenceCollator:
    """Stacks every pair's chosen then rejected sequences into one right-padded batch of ``2B`` rows, so the
    policy (and reference) score both in a single forward pass; with ``packing``, into one packed row of ``2B``
    segments in the same order (:mod:`rlhf_lightning.data.packing`)."""

    def __init__(self, pad_token_id: int, packing: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.packing = packing

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for side in ("chosen", "rejected"):
            for r in rows:
                seqs.append(r["prompt_ids"] + r[f"{side}_ids"])
                labels.append([IGNORE_INDEX] * len(r["prompt_ids"]) + r[f"{side}_ids"])
        return {
            **collate_rows(seqs, labels, self.pad_token_id, self.packing),
            "margin": torch.tensor([float(r["margin"]) for r in rows]),
            "index": torch.tensor([r["index"] for r in rows]),
        }


class UnpairedCollator:
    """KTO batches: each (prompt, completion) plus a mismatched pair (prompt i, completion i+1) per row, used to
    estimate KL(π‖π_ref) for KTO's reference point; rows (or packed segments) ``[0, B)`` are matched, ``[B, 2B)``
    mismatched."""

    def __init__(self, pad_token_id: int, packing: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.packing = packing

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n = len(rows)
        pairs = [(r, r) for r in rows] + [(rows[i], rows[(i + 1) % n]) for i in range(n)]
        seqs = [p["prompt_ids"] + c["completion_ids"] for p, c in pairs]
        labels = [[IGNORE_INDEX] * len(p["prompt_ids"]) + c["completion_ids"] for p, c in pairs]
        return {
            **collate_rows(seqs, labels, self.pad_token_id, self.packing),
            "desirable": torch.tensor([bool(r["label"]) for r in rows]),
            "index": torch.tensor([r["index"] for r in rows]),
        }


class PreferenceDataModule(BaseDataModule):
    """Pairwise preference data (reward model, DPO, IPO, SimPO, ORPO...).

    Args:
        prompt_key: prompt column (a string or a list of chat messages). If the file has no such column, the
            prompt is what chosen and rejected share: HH transcripts or full chats (module docstring).
        chosen_key: preferred response (a string, or a full chat).
        rejected_key: dispreferred response (a string, or a full chat).
        margin_key: optional column with a per-pair margin (reward-model loss only).
        input_template: ``"...{}..."`` prompt format instead of the chat template (not applied to HH transcripts).
        use_chat_template: format with the tokenizer's chat template when it has one.
        max_len: maximum tokens of prompt + response (see the truncation policy above).
        packing: concatenate each micro-batch's sequences (every pair's chosen and rejected, each its own segment)
            into one row without padding (:mod:`rlhf_lightning.data.packing`).
        max_tokens_per_batch: with ``packing``, fill each micro-batch with pairs up to this many tokens (a pair
            counts its prompt twice) instead of ``batch_size`` pairs; every pair must fit it.
        kwargs: the common arguments of :class:`~rlhf_lightning.data.base.BaseDataModule` (``path``, ``path_probs``,
            ``val_path``, ``val_split``, ``batch_size`` (pairs per micro-batch per device), ``on_bad_rows``...).
    """

    unit = "pairs"
    collator_class: type = PreferenceCollator
    empty_sample: dict = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "margin": 0.0, "truncated": False,
                          "dropped": False}
    length_columns = {"prompt_ids": 2, "chosen_ids": 1, "rejected_ids": 1}

    def __init__(self, *args: Any, prompt_key: str = "prompt", chosen_key: str = "chosen",
                 rejected_key: str = "rejected", margin_key: str | None = None, input_template: str | None = None,
                 use_chat_template: bool = True, max_len: int = 1024, packing: bool = False,
                 max_tokens_per_batch: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_packing_options(packing, max_tokens_per_batch)

    # ------------------------------------------------------------------------------------------ encoding
    def check_columns(self, records: datasets.Dataset, source: str) -> None:
        hp = self.hparams
        keys = {"data.init_args.chosen_key": hp.chosen_key, "data.init_args.rejected_key": hp.rejected_key}
        if hp.margin_key:
            keys["data.init_args.margin_key"] = hp.margin_key
        require_columns(records, keys, source)

    def split_pair(self, row: dict) -> tuple[Conversation, str, str, bool]:
        """``(prompt, chosen answer, rejected answer, is raw text)`` of one record, from the prompt column or, when
        the file has none, from what chosen and rejected share; raises :class:`BadRow`."""
        hp = self.hparams
        chosen, rejected = text_of(row[hp.chosen_key]), text_of(row[hp.rejected_key])
        if hp.prompt_key in row:
            prompt, chosen, rejected, raw = text_of(row[hp.prompt_key]), answer_of(chosen), answer_of(rejected), False
        elif isinstance(chosen, str) and isinstance(rejected, str):
            (prompt, chosen, rejected), raw = shared_prefix_prompt(chosen, rejected), True
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen_message, rejected_message = shared_leading_messages(chosen, rejected)
            chosen, rejected, raw = chosen_message["content"], rejected_message["content"], False
        else:
            raise BadRow("chosen and rejected must both be text or both be chats")
        if chosen.strip() == rejected.strip():
            raise BadRow("chosen is identical to rejected")
        return prompt, chosen, rejected, raw

    def encode_row(self, row: dict) -> dict:
        """One record -> ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``margin`` and the length-policy flags;
        raises :class:`BadRow`."""
        prompt, chosen, rejected, raw = self.split_pair(row)
        prompt_ids, chosen_ids = self.encode(prompt, chosen, raw)
        _, rejected_ids = self.encode(prompt, rejected, raw)
        margin = float(row[self.hparams.margin_key]) if self.hparams.margin_key else 0.0
        sample = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "margin": margin}
        return self.fit(sample)

    def encode(self, prompt: Conversation, response: str, raw: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of ``prompt`` and ``response``; ``raw`` text (HH transcripts) skips templates."""
        hp = self.hparams
        if raw:
            return encode_prompt_response(self.tokenizer, prompt, response, None, use_chat_template=False)
        return encode_prompt_response(self.tokenizer, prompt, response, hp.input_template, hp.use_chat_template)

    def responses(self, sample: dict) -> list[list[int]]:
        return [sample["chosen_ids"], sample["rejected_ids"]]

    def fit(self, sample: dict) -> dict:
        """Apply the truncation policy: left-truncate the prompt, or flag the sample ``dropped``."""
        prompt_ids = fit_prompt(sample["prompt_ids"], self.responses(sample), self.hparams.max_len)
        cut = prompt_ids is None or len(prompt_ids) < len(sample["prompt_ids"])
        return {**sample, "prompt_ids": prompt_ids or [], "truncated": cut, "dropped": prompt_ids is None}

    def finish(self, encoded: datasets.Dataset, source: str) -> datasets.Dataset:
        max_len = self.hparams.max_len
        n_cut, n_dropped = sum(encoded["truncated"]), sum(encoded["dropped"])
        if n_cut:
            rank_zero_warn(f"{source}: {n_cut}/{len(encoded)} samples exceed max_len={max_len}: prompts were "
                           f"left-truncated; {n_dropped} dropped because a response alone does not fit.")
        kept = encoded.filter(lambda dropped: not dropped, input_columns="dropped")
        if len(kept) == 0:
            raise DataError(f"{source}: no usable samples left: every response alone exceeds "
                            f"data.init_args.max_len={max_len}; raise it.")
        return kept.remove_columns(["truncated", "dropped"])

    # ----------------------------------------------------------------------------------------- reporting
    def layout(self, records: datasets.Dataset) -> str:
        hp = self.hparams
        if hp.prompt_key in records.column_names:
            return f"prompt from column '{hp.prompt_key}'"
        if isinstance(records[0][hp.chosen_key], list):
            return "prompt taken as the shared leading messages of the chosen/rejected chats"
        return "prompt taken as the shared prefix of chosen/rejected (HH layout, raw text, no chat template)"

    def example(self, sample: dict) -> tuple[str, str]:
        response = sample["chosen_ids"] if "chosen_ids" in sample else sample["completion_ids"]
        return self.tokenizer.decode(sample["prompt_ids"]), self.tokenizer.decode(response)

    def collate_fn(self, packing: bool = False) -> Callable[[list[dict]], dict]:
        return self.collator_class(self.tokenizer.pad_token_id, packing=packing)


class UnpairedPreferenceDataModule(PreferenceDataModule):
    """KTO data: (prompt, completion, label) rows; ``label`` true for desirable completions.

    A file with ``chosen_key``/``rejected_key`` columns and no ``completion_key`` column is unpaired: each pair
    gives a desirable (chosen) and an undesirable (rejected) row with the same prompt. Without a prompt column, a
    string completion is an HH transcript split after its last ``"\n\nAssistant:"``, and a chat completion's
    last (assistant) message is the completion.

    Args:
        completion_key: the completion column (a string, or a full chat whose last message is the answer).
        label_key: boolean column: is the completion desirable?
        kwargs: every :class:`PreferenceDataModule` argument (its chosen/rejected keys are used to unpair pairs;
            ``margin_key`` is ignored). ``packing`` packs the matched and mismatched sequences; token-budget
            micro-batches (``max_tokens_per_batch``) are not supported.
    """

    unit = "rows"
    collator_class = UnpairedCollator
    empty_sample = {"prompt_ids": [], "completion_ids": [], "label": False, "truncated": False, "dropped": False}

    def __init__(self, *args: Any, completion_key: str = "completion", label_key: str = "label",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.hparams.get("max_tokens_per_batch") is not None:
            raise ConfigError("data.init_args.max_tokens_per_batch is not supported by UnpairedPreferenceDataModule: "
                              "each row is also scored with its neighbour's completion (KTO's KL estimate), so its "
                              "size depends on the batch; use packing with data.init_args.batch_size instead.")

    def is_paired(self, columns: list[str] | dict) -> bool:
        """Whether records with these columns are pairs to unpair (chosen/rejected present, no completion)."""
        hp = self.hparams
        return hp.completion_key not in columns and hp.chosen_key in columns and hp.rejected_key in columns

    def check_columns(self, records: datasets.Dataset, source: str) -> None:
        if self.is_paired(records.column_names):
            return
        require_columns(records, {"data.init_args.completion_key": self.hparams.completion_key,
                                  "data.init_args.label_key": self.hparams.label_key}, source)

    def encode_row(self, row: dict) -> dict | list[dict]:
        hp = self.hparams
        if self.is_paired(row):
            prompt, chosen, rejected, raw = self.split_pair(row)
            return [self.encode_completion(prompt, chosen, True, raw), self.encode_completion(prompt, rejected, False,
                                                                                              raw)]
        label = row[hp.label_key]
        if not isinstance(label, bool | int) or label not in (0, 1, True, False):
            raise BadRow(f"label must be a boolean, got {label!r}")
        completion = text_of(row[hp.completion_key])
        if hp.prompt_key in row:
            prompt, completion, raw = text_of(row[hp.prompt_key]), answer_of(completion), False
        elif isinstance(completion, str):
            (prompt, completion), raw = split_transcript(completion), True
        else:
            (prompt, completion), raw = split_chat(completion), False
        return self.encode_completion(prompt, completion, bool(label), raw)

    def encode_completion(self, prompt: Conversation, completion: str, desirable: bool, raw: bool) -> dict:
        prompt_ids, completion_ids = self.encode(prompt, completion, raw)
        return self.fit({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": desirable})

    def responses(self, sample: dict) -> list[list[int]]:
        return [sample["completion_ids"]]

    def layout(self, records: datasets.Dataset) -> str:
        hp = self.hparams
        if self.is_paired(records.column_names):
            return f"unpaired: one desirable and one undesirable row per pair; {super().layout(records)}"
        if hp.prompt_key in records.column_names:
            return f"prompt from column '{hp.prompt_key}'"
        if isinstance(records[0][hp.completion_key], list):
            return "prompt taken as the chat before its last (assistant) message"
        return f"prompt taken as the transcript up to its last {ASSISTANT_MARKER!r} (HH layout, raw text)"
