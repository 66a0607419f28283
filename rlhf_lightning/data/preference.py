"""Preference data: (prompt, chosen, rejected[, margin]) pairs for reward models and the DPO family, and
unpaired (prompt, completion, label) data for KTO.

Truncation policy (``max_len``): the prompt is cut from the left until ``prompt + response`` fits, for both
responses of a pair alike; responses are never cut. A pair whose response alone leaves no room is dropped.
Both counts are reported.

Bad rows (missing or empty prompt/response, chosen identical to rejected, non-boolean KTO label) are reported
by row number; ``on_bad_rows: error`` stops the run, ``skip`` drops them and says how many.
"""

from __future__ import annotations

from typing import Any, Literal

import datasets
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchdata.stateful_dataloader import StatefulDataLoader as DataLoader

from rlhf_lightning.data.collate import IGNORE_INDEX, pad_sequences
from rlhf_lightning.data.formatting import encode_prompt_response, fit_prompt
from rlhf_lightning.data.loaders import build_dataloader
from rlhf_lightning.data.sources import load_records, require_columns
from rlhf_lightning.models import load_tokenizer

Conversation = str | list[dict[str, Any]]


class BadRow(ValueError):
    """A record that cannot be used; the message says why."""


def split_conversation(prompt: Conversation | None, response: Conversation) -> tuple[Conversation, str]:
    """(prompt, response text) from a string response, or from a full chat whose last message is the answer."""
    if isinstance(response, list):
        if not response or response[-1].get("role") != "assistant":
            raise BadRow("a chat response must end with an assistant message")
        return (prompt if prompt is not None else response[:-1]), response[-1]["content"]
    if prompt is None:
        raise BadRow("no prompt")
    return prompt, response


def text_of(value: Any) -> Conversation:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise BadRow(f"empty or missing value ({value!r})")


class PreferenceCollator:
    """Stacks every pair's chosen then rejected sequences into one right-padded batch of ``2B`` rows, so the
    policy (and reference) score both in a single forward pass."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for side in ("chosen", "rejected"):
            for r in rows:
                seqs.append(r["prompt_ids"] + r[f"{side}_ids"])
                labels.append([IGNORE_INDEX] * len(r["prompt_ids"]) + r[f"{side}_ids"])
        return {
            "input_ids": pad_sequences(seqs, self.pad_token_id),
            "attention_mask": pad_sequences([[1] * len(s) for s in seqs], 0),
            "labels": pad_sequences(labels, IGNORE_INDEX),
            "margin": torch.tensor([float(r["margin"]) for r in rows]),
            "index": torch.tensor([r["index"] for r in rows]),
        }


class UnpairedCollator:
    """KTO batches: each (prompt, completion) plus a mismatched pair (prompt i, completion i+1) per row, used to
    estimate KL(π‖π_ref) for KTO's reference point; rows ``[0, B)`` are matched, ``[B, 2B)`` mismatched."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n = len(rows)
        pairs = [(r, r) for r in rows] + [(rows[i], rows[(i + 1) % n]) for i in range(n)]
        seqs = [p["prompt_ids"] + c["completion_ids"] for p, c in pairs]
        labels = [[IGNORE_INDEX] * len(p["prompt_ids"]) + c["completion_ids"] for p, c in pairs]
        return {
            "input_ids": pad_sequences(seqs, self.pad_token_id),
            "attention_mask": pad_sequences([[1] * len(s) for s in seqs], 0),
            "labels": pad_sequences(labels, IGNORE_INDEX),
            "desirable": torch.tensor([bool(r["label"]) for r in rows]),
            "index": torch.tensor([r["index"] for r in rows]),
        }


class PreferenceDataModule(pl.LightningDataModule):
    """Pairwise preference data (reward model, DPO, IPO, SimPO, ORPO...).

    Args:
        path: a jsonl/json/parquet/csv file, a directory, or a hub dataset name.
        val_path: validation data; if unset, ``val_split`` of ``path`` is held out.
        val_split: fraction of ``path`` held out for validation when ``val_path`` is unset.
        tokenizer: tokenizer name or path; linked to the model's by the CLI.
        prompt_key: prompt column (a string or a list of chat messages). If the column is absent, chosen and
            rejected must be full chats whose last message is the answer.
        chosen_key: preferred response (a string, or a full chat).
        rejected_key: dispreferred response (a string, or a full chat).
        margin_key: optional column with a per-pair margin (reward-model loss only).
        input_template: ``"...{}..."`` prompt format instead of the chat template.
        use_chat_template: format with the tokenizer's chat template when it has one.
        max_len: maximum tokens of prompt + response (see the truncation policy above).
        on_bad_rows: ``error`` stops at bad rows (listing them), ``skip`` drops them and reports the count.
        batch_size: pairs per micro-batch per device (the model sees twice as many sequences).
        shuffle: shuffle training pairs each epoch.
        num_workers: DataLoader workers.
        max_samples: use only the first N training records.
        split: split name for hub datasets.
        seed: seed of the validation hold-out and of shuffling.
        trust_remote_code: passed to the tokenizer.
    """

    collator_class: type = PreferenceCollator
    empty_sample: dict = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "margin": 0.0}  # bad-row filler

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        val_split: float = 0.0,
        tokenizer: str = "tiny-llama",
        prompt_key: str = "prompt",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        margin_key: str | None = None,
        input_template: str | None = None,
        use_chat_template: bool = True,
        max_len: int = 1024,
        on_bad_rows: Literal["error", "skip"] = "error",
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

    # ------------------------------------------------------------------------------------------ encoding
    def required_columns(self, records: datasets.Dataset) -> dict[str, str]:
        hp = self.hparams
        keys = {"data.init_args.chosen_key": hp.chosen_key, "data.init_args.rejected_key": hp.rejected_key}
        if hp.margin_key:
            keys["data.init_args.margin_key"] = hp.margin_key
        return keys

    def encode_row(self, row: dict) -> dict:
        """One record -> ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``margin``; raises :class:`BadRow`."""
        hp = self.hparams
        prompt = text_of(row[hp.prompt_key]) if hp.prompt_key in row else None
        prompt_c, chosen = split_conversation(prompt, text_of(row[hp.chosen_key]))
        prompt_r, rejected = split_conversation(prompt, text_of(row[hp.rejected_key]))
        if prompt_c != prompt_r:
            raise BadRow("chosen and rejected chats have different prompts")
        if chosen.strip() == rejected.strip():
            raise BadRow("chosen is identical to rejected")
        prompt_ids, chosen_ids = self.encode(prompt_c, chosen)
        _, rejected_ids = self.encode(prompt_c, rejected)
        margin = float(row[hp.margin_key]) if hp.margin_key else 0.0
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "margin": margin}

    def encode(self, prompt: Conversation, response: str) -> tuple[list[int], list[int]]:
        return encode_prompt_response(self.tokenizer, prompt, response, self.hparams.input_template,
                                      self.hparams.use_chat_template)

    def responses(self, sample: dict) -> list[list[int]]:
        return [sample["chosen_ids"], sample["rejected_ids"]]

    # -------------------------------------------------------------------------------------------- setup
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
        """Encode every row, apply the truncation policy, report bad and dropped rows; adds an ``index`` column."""
        require_columns(records, self.required_columns(records), source)
        max_len = self.hparams.max_len

        def encode(row: dict, index: int) -> dict:
            try:
                sample = self.encode_row(row)
            except BadRow as err:  # datasets.map needs the same columns on every row
                return {**self.empty_sample, "bad": str(err), "index": index, "truncated": False, "dropped": False}
            prompt_ids = fit_prompt(sample["prompt_ids"], self.responses(sample), max_len)
            cut = prompt_ids is None or len(prompt_ids) < len(sample["prompt_ids"])
            return {**sample, "prompt_ids": prompt_ids or [], "bad": "", "index": index, "truncated": cut,
                    "dropped": prompt_ids is None}

        encoded = records.map(encode, with_indices=True, remove_columns=records.column_names,
                              desc=f"Tokenizing {source}")
        bad = [(i, why) for i, why in zip(encoded["index"], encoded["bad"], strict=True) if why]
        if bad:
            listing = "; ".join(f"row {i}: {why}" for i, why in bad[:10]) + (" ..." if len(bad) > 10 else "")
            message = f"{source}: {len(bad)} bad row(s) of {len(encoded)}: {listing}"
            if self.hparams.on_bad_rows == "error":
                raise ValueError(f"{message}. Fix them or set data.init_args.on_bad_rows=skip.")
            rank_zero_warn(f"{message}. Skipped (on_bad_rows=skip).")
        kept = encoded.filter(lambda why: not why, input_columns="bad")
        n_cut, n_dropped = sum(kept["truncated"]), sum(kept["dropped"])
        if n_cut:
            rank_zero_warn(f"{source}: {n_cut}/{len(kept)} samples exceed max_len={max_len}: prompts were "
                           f"left-truncated; {n_dropped} dropped because a response alone does not fit.")
        kept = kept.filter(lambda dropped: not dropped, input_columns="dropped")
        if len(kept) == 0:
            raise ValueError(f"{source}: no usable samples left (bad rows: {len(bad)}, too long: {n_dropped}); "
                             f"check the keys and data.init_args.max_len={max_len}.")
        return kept.remove_columns(["bad", "truncated", "dropped"])

    # ------------------------------------------------------------------------------------------ loaders
    def _loader(self, dataset: datasets.Dataset, shuffle: bool) -> DataLoader:
        return build_dataloader(dataset, self.hparams.batch_size, shuffle,
                                self.collator_class(self.tokenizer.pad_token_id), self.trainer, self.hparams.seed,
                                self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset is not None else []

    def test_dataloader(self) -> DataLoader | list:
        """``test`` evaluates the validation data (``val_path`` or the ``val_split`` hold-out)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """``predict`` scores the training data (``path``) in order."""
        return self.ordered_train_dataloader()

    def ordered_train_dataloader(self) -> DataLoader:
        """This rank's shard of the training set in a fixed order (for precomputing reference log-probs)."""
        return self._loader(self.train_dataset, shuffle=False)


class UnpairedPreferenceDataModule(PreferenceDataModule):
    """KTO data: (prompt, completion, label) rows; ``label`` true for desirable completions.

    Args:
        completion_key: the completion column (a string, or a full chat whose last message is the answer).
        label_key: boolean column: is the completion desirable?
        kwargs: every :class:`PreferenceDataModule` argument except the chosen/rejected/margin keys.
    """

    collator_class = UnpairedCollator
    empty_sample = {"prompt_ids": [], "completion_ids": [], "label": False}

    def __init__(self, *args: Any, completion_key: str = "completion", label_key: str = "label",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

    def required_columns(self, records: datasets.Dataset) -> dict[str, str]:
        return {"data.init_args.completion_key": self.hparams.completion_key,
                "data.init_args.label_key": self.hparams.label_key}

    def encode_row(self, row: dict) -> dict:
        hp = self.hparams
        label = row[hp.label_key]
        if not isinstance(label, bool | int) or label not in (0, 1, True, False):
            raise BadRow(f"label must be a boolean, got {label!r}")
        prompt = text_of(row[hp.prompt_key]) if hp.prompt_key in row else None
        prompt, completion = split_conversation(prompt, text_of(row[hp.completion_key]))
        prompt_ids, completion_ids = self.encode(prompt, completion)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": bool(label)}

    def responses(self, sample: dict) -> list[list[int]]:
        return [sample["completion_ids"]]
