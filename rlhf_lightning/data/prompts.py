"""Prompts for online RL (PPO, GRPO, RLOO, REINFORCE++): formatted, tokenized, never truncated.

A prompt longer than ``max_prompt_len`` tokens is dropped (and counted) rather than cut, since a cut prompt
asks a different question. An optional ``label_key`` column (e.g. the reference answer) is passed to rule-based
reward functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_warn

from rlhf_lightning.data.base import BaseDataModule
from rlhf_lightning.data.formatting import render_prompt
from rlhf_lightning.data.sources import require_columns
from rlhf_lightning.data.transcripts import BadRow
from rlhf_lightning.errors import DataError


def collate_prompts(rows: list[dict]) -> dict[str, Any]:
    """Prompts stay unpadded lists: the generation workers pad them (left) themselves."""
    return {"prompt_ids": [r["prompt_ids"] for r in rows], "prompt_text": [r["prompt_text"] for r in rows],
            "label": [r["label"] for r in rows], "index": torch.tensor([r["index"] for r in rows])}


class PromptDataModule(BaseDataModule):
    """Prompt data for online RL.

    Args:
        prompt_key: prompt column (a string or a list of chat messages).
        label_key: optional column handed to reward functions (e.g. the correct answer).
        input_template: ``"...{}..."`` format instead of the chat template.
        use_chat_template: format with the tokenizer's chat template (with the generation prompt).
        max_prompt_len: prompts with more tokens are dropped and counted.
        kwargs: the common arguments of :class:`~rlhf_lightning.data.base.BaseDataModule` (``path``, ``path_probs``,
            ``val_path``, ``val_split``, ``batch_size`` (prompts per training step per device, each sampled
            ``n_samples_per_prompt`` times), ``max_samples``...).
    """

    unit = "prompts"
    empty_sample = {"prompt_ids": [], "prompt_text": "", "label": None}

    def __init__(self, *args: Any, prompt_key: str = "prompt", label_key: str | None = None,
                 input_template: str | None = None, use_chat_template: bool = True, max_prompt_len: int = 1024,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

    def check_columns(self, records: datasets.Dataset, source: str) -> None:
        keys = {"data.init_args.prompt_key": self.hparams.prompt_key}
        if self.hparams.label_key:
            keys["data.init_args.label_key"] = self.hparams.label_key
        require_columns(records, keys, source)

    def encode_row(self, row: dict) -> dict:
        hp = self.hparams
        prompt = row[hp.prompt_key]
        if isinstance(prompt, list) and prompt:
            text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        elif isinstance(prompt, str) and prompt.strip():
            text = render_prompt(self.tokenizer, prompt, hp.input_template, hp.use_chat_template)
        else:
            raise BadRow(f"'{hp.prompt_key}' is empty or not text ({prompt!r})")
        chat = isinstance(prompt, list) or (hp.input_template is None and hp.use_chat_template
                                            and bool(self.tokenizer.chat_template))
        ids = self.tokenizer(text, add_special_tokens=not chat)["input_ids"]
        label = row[hp.label_key] if hp.label_key else None
        return {"prompt_ids": ids, "prompt_text": prompt if isinstance(prompt, str) else text,
                "label": None if label is None else str(label)}

    def finish(self, encoded: datasets.Dataset, source: str) -> datasets.Dataset:
        hp = self.hparams
        kept = encoded.filter(lambda ids: len(ids) <= hp.max_prompt_len, input_columns="prompt_ids")
        if len(kept) < len(encoded):
            rank_zero_warn(f"{source}: dropped {len(encoded) - len(kept)}/{len(encoded)} prompts longer than "
                           f"max_prompt_len={hp.max_prompt_len} tokens (prompts are never truncated).")
        if len(kept) == 0:
            raise DataError(f"{source}: every prompt exceeds data.init_args.max_prompt_len={hp.max_prompt_len}.")
        return kept

    def layout(self, records: datasets.Dataset) -> str:
        return f"prompts from column '{self.hparams.prompt_key}'"

    def example(self, sample: dict) -> tuple[str, str]:
        return self.tokenizer.decode(sample["prompt_ids"]), ""

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        return collate_prompts
