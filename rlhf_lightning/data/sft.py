"""Supervised fine-tuning data: prompt/response pairs or multi-turn chats, loss on the answers only.

Truncation policy (``max_len``): samples longer than ``max_len`` tokens are cut from the right
(``truncation: right``) or dropped (``truncation: drop``); a sample left without any answer token is always
dropped. Both counts are reported; if nothing is left the run stops with an error naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import datasets
from lightning.pytorch.utilities import rank_zero_warn

from rlhf_lightning.data.base import BaseDataModule
from rlhf_lightning.data.collate import IGNORE_INDEX, SFTCollator
from rlhf_lightning.data.formatting import render_chat, render_prompt_response, tokenize_with_spans, truncate
from rlhf_lightning.data.packing import check_packing_options
from rlhf_lightning.data.sources import require_columns
from rlhf_lightning.data.transcripts import BadRow
from rlhf_lightning.errors import DataError


def as_text(value: object, key: str) -> str:
    """A cell as text: numbers (CSV/parquet infer them) become strings; missing or nested values are bad rows."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise BadRow(f"'{key}' must be text, got {type(value).__name__} ({value!r})")


class SFTDataModule(BaseDataModule):
    """Prompt/response (``input_key``/``output_key``) or chat (``messages_key``) data for SFT.

    Args:
        input_key: column with the prompt.
        output_key: column with the response.
        messages_key: column with a list of ``{"role", "content"}`` messages; when set, every assistant turn is
            trained on and ``input_key``/``output_key`` are ignored.
        input_template: e.g. ``"Question: {}\\nAnswer: "``; when unset the tokenizer's chat template is used if
            it has one (``use_chat_template``), else the prompt is concatenated with the response.
        use_chat_template: format prompt/response pairs with the tokenizer's chat template.
        max_len: maximum tokens per sample (see the truncation policy above).
        truncation: ``right`` cuts long samples, ``drop`` drops them.
        packing: concatenate each micro-batch's samples into one row without padding (position ids restart per
            sample, attention stays within each sample; :mod:`rlhf_lightning.data.packing`).
        max_tokens_per_batch: with ``packing``, fill each micro-batch with samples up to this many tokens instead
            of ``batch_size`` samples (token-budget micro-batches); every sample must fit it.
        kwargs: the common arguments of :class:`~rlhf_lightning.data.base.BaseDataModule` (``path``, ``path_probs``,
            ``val_path``, ``val_split``, ``batch_size``, ``max_samples``...).
    """

    empty_sample = {"input_ids": [], "labels": [], "truncated": False, "keep": False}
    length_columns = {"input_ids": 1}

    def __init__(self, *args: Any, input_key: str = "input", output_key: str = "output",
                 messages_key: str | None = None, input_template: str | None = None, use_chat_template: bool = True,
                 max_len: int = 2048, truncation: Literal["right", "drop"] = "right", packing: bool = False,
                 max_tokens_per_batch: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_packing_options(packing, max_tokens_per_batch)

    def check_columns(self, records: datasets.Dataset, source: str) -> None:
        hp = self.hparams
        if hp.messages_key:
            require_columns(records, {"data.init_args.messages_key": hp.messages_key}, source)
        else:
            require_columns(records, {"data.init_args.input_key": hp.input_key,
                                      "data.init_args.output_key": hp.output_key}, source)

    def encode_row(self, row: dict) -> dict:
        """Format, tokenize and truncate one record; flag it ``keep=False`` when no answer token is left."""
        hp = self.hparams
        if hp.messages_key:
            text, spans = render_chat(self.tokenizer, row[hp.messages_key])
        else:
            prompt, response = as_text(row[hp.input_key], hp.input_key), as_text(row[hp.output_key], hp.output_key)
            text, spans = render_prompt_response(self.tokenizer, prompt, response, hp.input_template,
                                                 hp.use_chat_template)
        chat = bool(hp.messages_key) or (hp.input_template is None and hp.use_chat_template
                                          and bool(self.tokenizer.chat_template))
        sample = tokenize_with_spans(self.tokenizer, text, spans, chat_formatted=chat)
        cut = len(sample["input_ids"]) > hp.max_len
        if cut and hp.truncation == "right":
            sample, _ = truncate(sample, hp.max_len)
        keep = not (cut and hp.truncation == "drop") and any(t != IGNORE_INDEX for t in sample["labels"])
        return {**sample, "truncated": cut, "keep": keep}

    def finish(self, encoded: datasets.Dataset, source: str) -> datasets.Dataset:
        hp = self.hparams
        n_cut, n_kept = sum(encoded["truncated"]), sum(encoded["keep"])
        if n_kept == 0:
            raise DataError(f"{source}: all {len(encoded)} samples were dropped: none has an answer token within "
                            f"max_len={hp.max_len} (option data.init_args.max_len). Raise max_len.")
        if n_cut or n_kept < len(encoded):
            rank_zero_warn(f"{source}: {n_cut}/{len(encoded)} samples exceed max_len={hp.max_len} "
                           f"(truncation={hp.truncation}); {len(encoded) - n_kept} dropped as they kept no answer "
                           f"token.")
        return encoded.filter(lambda keep: keep, input_columns="keep").remove_columns(["truncated", "keep"])

    def layout(self, records: datasets.Dataset) -> str:
        if self.hparams.messages_key:
            return f"chats from column '{self.hparams.messages_key}', loss on every assistant turn"
        return f"prompt/response from columns '{self.hparams.input_key}'/'{self.hparams.output_key}'"

    def example(self, sample: dict) -> tuple[str, str]:
        ids, labels = sample["input_ids"], sample["labels"]
        prompt = [t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
        return self.tokenizer.decode(prompt), self.tokenizer.decode([t for t in labels if t != IGNORE_INDEX])

    def collate_fn(self, packing: bool = False) -> Callable[[list[dict]], dict]:
        return SFTCollator(self.tokenizer.pad_token_id, packing=packing)
