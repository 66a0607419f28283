"""Supervised fine-tuning data: prompt/response pairs or multi-turn chats, loss on the answers only.

Truncation policy (``max_len``): samples longer than ``max_len`` tokens are cut from the right
(``truncation: right``) or dropped (``truncation: drop``); a sample left without any answer token is always
dropped. Both counts are reported; if nothing is left the run stops with an error naming the file.
"""

from __future__ import annotations

from typing import Literal

import datasets
import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torchdata.stateful_dataloader import StatefulDataLoader as DataLoader

from rlhf_lightning.data.collate import IGNORE_INDEX, SFTCollator
from rlhf_lightning.data.formatting import render_chat, render_prompt_response, tokenize_with_spans, truncate
from rlhf_lightning.data.loaders import build_dataloader
from rlhf_lightning.data.sources import load_records, require_columns
from rlhf_lightning.models import load_tokenizer


def as_text(value: object, source: str, index: int, key: str) -> str:
    """A cell as text: numbers (CSV/parquet infer them) become strings; missing or nested values are errors."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{source} row {index}: '{key}' must be text, got {type(value).__name__} ({value!r}).")


class SFTDataModule(pl.LightningDataModule):
    """Prompt/response (``input_key``/``output_key``) or chat (``messages_key``) data for SFT.

    Args:
        path: training data: a jsonl/json/parquet/csv file, a directory, or a hub dataset name.
        val_path: validation data in the same forms; if unset, ``val_split`` of ``path`` is held out.
        val_split: fraction of ``path`` held out for validation when ``val_path`` is unset (0 = none).
        tokenizer: tokenizer name or path; linked to the model's by the CLI.
        input_key: column with the prompt.
        output_key: column with the response.
        messages_key: column with a list of ``{"role", "content"}`` messages; when set, every assistant turn is
            trained on and ``input_key``/``output_key`` are ignored.
        input_template: e.g. ``"Question: {}\\nAnswer: "``; when unset the tokenizer's chat template is used if
            it has one (``use_chat_template``), else the prompt is concatenated with the response.
        use_chat_template: format prompt/response pairs with the tokenizer's chat template.
        max_len: maximum tokens per sample (see the truncation policy above).
        truncation: ``right`` cuts long samples, ``drop`` drops them.
        batch_size: micro-batch size per device.
        shuffle: shuffle the training data each epoch.
        num_workers: DataLoader workers.
        max_samples: use only the first N training records (quick experiments).
        split: split name for hub datasets.
        seed: seed of the validation hold-out and of shuffling.
        trust_remote_code: passed to the tokenizer.
    """

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        val_split: float = 0.0,
        tokenizer: str = "tiny-llama",
        input_key: str = "input",
        output_key: str = "output",
        messages_key: str | None = None,
        input_template: str | None = None,
        use_chat_template: bool = True,
        max_len: int = 2048,
        truncation: Literal["right", "drop"] = "right",
        batch_size: int = 8,
        shuffle: bool = True,
        num_workers: int = 0,
        max_samples: int | None = None,
        split: str = "train",
        seed: int = 42,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])  # the model logs its own tokenizer
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
        """Format, tokenize and truncate ``records``; report (and drop) samples without answer tokens."""
        hp = self.hparams
        if hp.messages_key:
            require_columns(records, {"data.init_args.messages_key": hp.messages_key}, source)
        else:
            require_columns(records, {"data.init_args.input_key": hp.input_key,
                                      "data.init_args.output_key": hp.output_key}, source)
        chat = bool(hp.messages_key) or (hp.input_template is None and hp.use_chat_template
                                          and bool(self.tokenizer.chat_template))

        def encode(row: dict, index: int) -> dict:
            if hp.messages_key:
                text, spans = render_chat(self.tokenizer, row[hp.messages_key])
            else:
                prompt = as_text(row[hp.input_key], source, index, hp.input_key)
                response = as_text(row[hp.output_key], source, index, hp.output_key)
                text, spans = render_prompt_response(self.tokenizer, prompt, response, hp.input_template,
                                                     hp.use_chat_template)
            sample = tokenize_with_spans(self.tokenizer, text, spans, chat_formatted=chat)
            cut = len(sample["input_ids"]) > hp.max_len
            if cut and hp.truncation == "right":
                sample, _ = truncate(sample, hp.max_len)
            keep = not (cut and hp.truncation == "drop") and any(t != IGNORE_INDEX for t in sample["labels"])
            return {**sample, "truncated": cut, "keep": keep}

        encoded = records.map(encode, with_indices=True, remove_columns=records.column_names,
                              desc=f"Tokenizing {source}")
        n_cut, n_kept = sum(encoded["truncated"]), sum(encoded["keep"])
        if n_kept == 0:
            raise ValueError(f"{source}: all {len(encoded)} samples were dropped: none has an answer token within "
                             f"max_len={hp.max_len} (option data.init_args.max_len). Raise max_len.")
        if n_cut or n_kept < len(encoded):
            rank_zero_warn(f"{source}: {n_cut}/{len(encoded)} samples exceed max_len={hp.max_len} "
                           f"(truncation={hp.truncation}); {len(encoded) - n_kept} dropped as they kept no answer "
                           f"token.")
        return encoded.filter(lambda keep: keep, input_columns="keep").remove_columns(["truncated", "keep"])

    def _loader(self, dataset: datasets.Dataset, shuffle: bool) -> DataLoader:
        return build_dataloader(dataset, self.hparams.batch_size, shuffle, SFTCollator(self.tokenizer.pad_token_id),
                                self.trainer, self.hparams.seed, self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset is not None else []

    def test_dataloader(self) -> DataLoader | list:
        """``test`` evaluates the validation data (``val_path`` or the ``val_split`` hold-out)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """``predict`` scores the training data (``path``) in order."""
        return self._loader(self.train_dataset, shuffle=False)
