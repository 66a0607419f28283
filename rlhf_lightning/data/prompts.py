"""Prompts for online RL (PPO, GRPO, RLOO, REINFORCE++): formatted, tokenized, never truncated.

A prompt longer than ``max_prompt_len`` tokens is dropped (and counted) rather than cut, since a cut prompt
asks a different question. An optional ``label_key`` column (e.g. the reference answer) is passed to rule-based
reward functions.
"""

from __future__ import annotations

from typing import Any

import datasets
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchdata.stateful_dataloader import StatefulDataLoader

from rlhf_lightning.data.formatting import render_prompt
from rlhf_lightning.data.loaders import build_dataloader
from rlhf_lightning.data.sources import load_records, require_columns
from rlhf_lightning.models import load_tokenizer


def collate_prompts(rows: list[dict]) -> dict[str, Any]:
    """Prompts stay unpadded lists: the generation workers pad them (left) themselves."""
    return {"prompt_ids": [r["prompt_ids"] for r in rows], "prompt_text": [r["prompt_text"] for r in rows],
            "label": [r["label"] for r in rows], "index": torch.tensor([r["index"] for r in rows])}


class PromptDataModule(pl.LightningDataModule):
    """Prompt data for online RL.

    Args:
        path: a jsonl/json/parquet/csv file, a directory, or a hub dataset name.
        val_path: held-out prompts; if unset, ``val_split`` of ``path`` is held out.
        val_split: fraction of ``path`` held out when ``val_path`` is unset.
        tokenizer: tokenizer name or path; linked to the model's by the CLI.
        prompt_key: prompt column (a string or a list of chat messages).
        label_key: optional column handed to reward functions (e.g. the correct answer).
        input_template: ``"...{}..."`` format instead of the chat template.
        use_chat_template: format with the tokenizer's chat template (with the generation prompt).
        max_prompt_len: prompts with more tokens are dropped and counted.
        batch_size: prompts per training step per device (each is sampled ``n_samples_per_prompt`` times).
        shuffle: shuffle prompts each epoch.
        max_samples: use only the first N records.
        split: split name for hub datasets.
        seed: seed of the hold-out and of shuffling.
        trust_remote_code: passed to the tokenizer.
    """

    def __init__(self, path: str, val_path: str | None = None, val_split: float = 0.0, tokenizer: str = "tiny-llama",
                 prompt_key: str = "prompt", label_key: str | None = None, input_template: str | None = None,
                 use_chat_template: bool = True, max_prompt_len: int = 1024, batch_size: int = 8, shuffle: bool = True,
                 max_samples: int | None = None, split: str = "train", seed: int = 42,
                 trust_remote_code: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer_path = tokenizer
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(self.tokenizer_path, trust_remote_code=hp.trust_remote_code)
        train = load_records(hp.path, hp.split, option="data.init_args.path")
        if hp.max_samples:
            train = train.select(range(min(hp.max_samples, len(train))))
        val = load_records(hp.val_path, "validation", option="data.init_args.val_path") if hp.val_path else None
        if val is None and hp.val_split > 0:
            parts = train.train_test_split(test_size=hp.val_split, seed=hp.seed)
            train, val = parts["train"], parts["test"]
        self.train_dataset = self.tokenize(train, hp.path)
        self.val_dataset = self.tokenize(val, hp.val_path or hp.path) if val is not None else None

    def tokenize(self, records: datasets.Dataset, source: str) -> datasets.Dataset:
        hp = self.hparams
        keys = {"data.init_args.prompt_key": hp.prompt_key}
        if hp.label_key:
            keys["data.init_args.label_key"] = hp.label_key
        require_columns(records, keys, source)
        chat = hp.input_template is None and hp.use_chat_template and bool(self.tokenizer.chat_template)

        def encode(row: dict, index: int) -> dict:
            prompt = row[hp.prompt_key]
            if isinstance(prompt, list):
                text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            elif isinstance(prompt, str) and prompt.strip():
                text = render_prompt(self.tokenizer, prompt, hp.input_template, hp.use_chat_template)
            else:
                raise ValueError(f"{source} row {index}: '{hp.prompt_key}' is empty or not text ({prompt!r}).")
            ids = self.tokenizer(text, add_special_tokens=not (chat or isinstance(prompt, list)))["input_ids"]
            label = row[hp.label_key] if hp.label_key else None
            return {"prompt_ids": ids, "prompt_text": prompt if isinstance(prompt, str) else text,
                    "label": None if label is None else str(label), "index": index}

        encoded = records.map(encode, with_indices=True, remove_columns=records.column_names,
                              desc=f"Tokenizing {source}")
        kept = encoded.filter(lambda ids: len(ids) <= hp.max_prompt_len, input_columns="prompt_ids")
        if len(kept) < len(encoded):
            rank_zero_warn(f"{source}: dropped {len(encoded) - len(kept)}/{len(encoded)} prompts longer than "
                           f"max_prompt_len={hp.max_prompt_len} tokens (prompts are never truncated).")
        if len(kept) == 0:
            raise ValueError(f"{source}: every prompt exceeds data.init_args.max_prompt_len={hp.max_prompt_len}.")
        return kept

    def _loader(self, dataset: datasets.Dataset, shuffle: bool) -> StatefulDataLoader:
        return build_dataloader(dataset, self.hparams.batch_size, shuffle, collate_prompts, self.trainer,
                                self.hparams.seed)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_dataset, shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> StatefulDataLoader | list:
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset is not None else []
