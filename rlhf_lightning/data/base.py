"""``BaseDataModule``: what the SFT, preference, unpaired (KTO) and prompt DataModules share.

One ``setup`` for all of them, per training source (``path`` is one source or a list of them):

1. load the records (:func:`~rlhf_lightning.data.sources.load_records`), each tagged with its file and line;
2. keep the first ``max_samples`` records and hold out ``val_split`` of them for validation (unless ``val_path``);
3. encode each part (``encode_row``, a subclass method) with ``datasets.map``, cached under a fingerprint of
   everything that produced the tokens (:meth:`BaseDataModule.encoding_fingerprint`);
4. report bad rows by file and line (``on_bad_rows``), apply the subclass's length policy (``finish``) and log one
   summary line (row count, how the prompt was found, one decoded example).

The training sources are then mixed: concatenated, or sampled with ``path_probs`` by
``datasets.interleave_datasets`` (OpenRLHF's ``--dataset_probs``), and every split gets a dense ``index`` column
``0..N-1`` (rows keyed by identity after all filtering and shuffling, e.g. DPO's cached reference log-probs).
Holding out per source, before mixing, keeps oversampled rows of one file out of the other split.

Subclasses declare their own keys as keyword arguments and implement ``check_columns``, ``encode_row``,
``finish``, ``layout`` and ``example``; the loaders are shared.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Literal

import datasets
import lightning.pytorch as pl
from datasets.fingerprint import Hasher, generate_random_fingerprint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchdata.stateful_dataloader import StatefulDataLoader

import rlhf_lightning
from rlhf_lightning.data import formatting, transcripts
from rlhf_lightning.data.loaders import build_dataloader
from rlhf_lightning.data.packing import build_packed_dataloader, check_token_budget, sample_lengths
from rlhf_lightning.data.sources import load_records, where
from rlhf_lightning.data.transcripts import BadRow
from rlhf_lightning.errors import ConfigError, DataError
from rlhf_lightning.models import load_tokenizer

ENCODING_MODULES = (formatting, transcripts)  # helper code every encoder calls: part of the cache key


def as_list(paths: str | list[str] | None) -> list[str]:
    """``None`` -> ``[]``, one path -> ``[path]``, a list stays a list."""
    if paths is None:
        return []
    return [paths] if isinstance(paths, str) else list(paths)


def mixture_weights(paths: str | list[str], probs: list[float] | None) -> list[float] | None:
    """Normalised sampling probabilities of the training sources, or ``None`` (concatenate); raises
    :class:`ConfigError` naming ``data.init_args.path_probs`` for a wrong length or non-positive weights."""
    if probs is None:
        return None
    n = len(as_list(paths))
    if len(probs) != n:
        raise ConfigError(f"data.init_args.path_probs has {len(probs)} value(s) but data.init_args.path names {n} "
                          f"source(s); give one probability per path.")
    if any(p < 0 for p in probs) or sum(probs) <= 0:
        raise ConfigError(f"data.init_args.path_probs={list(probs)} must be non-negative with a positive sum.")
    return [p / sum(probs) for p in probs]


def mix(parts: list[datasets.Dataset], probs: list[float] | None, seed: int,
        stopping: Literal["first_exhausted", "all_exhausted"]) -> datasets.Dataset:
    """One dataset from several sources: sampled with ``probs`` (``interleave_datasets``), else concatenated."""
    if len(parts) == 1:
        return parts[0]
    if probs is None:
        return datasets.concatenate_datasets(parts)
    return datasets.interleave_datasets(parts, probabilities=probs, seed=seed, stopping_strategy=stopping)


def with_dense_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """(Re)number rows ``0..N-1`` in an ``index`` column: the identity of a row after filtering, mixing and the
    hold-out, so per-row caches sized ``N`` can be indexed by it."""
    if "index" in dataset.column_names:
        dataset = dataset.remove_columns("index")
    return dataset.add_column("index", list(range(len(dataset))))


def shorten(text: str, limit: int = 60) -> str:
    """``repr`` of ``text``, with the middle elided past ``limit`` characters."""
    if len(text) > limit:
        text = text[: limit // 2] + " ... " + text[-limit // 2:]
    return repr(text)


def source_code_of(obj: Any) -> str:
    """Source text of a class's or module's defining module (raises ``OSError``/``TypeError`` when unavailable)."""
    module = inspect.getmodule(obj) if inspect.isclass(obj) else obj
    return inspect.getsource(module if module is not None else obj)


class BaseDataModule(pl.LightningDataModule):
    """Arguments every DataModule of this package takes.

    Args:
        path: training data: a jsonl/json/parquet/csv file, a directory, or a hub dataset name; or a list of them
            (a mixture, see ``path_probs``).
        val_path: validation data in the same forms (a list is concatenated); if unset, ``val_split`` of every
            training source is held out.
        val_split: fraction of each training source held out for validation when ``val_path`` is unset (0 = none).
        tokenizer: tokenizer name or path; linked to the model's by the CLI.
        path_probs: sampling probability of each ``path`` (normalised); unset = every row of every source once.
        mixture_stopping: with ``path_probs``, ``all_exhausted`` samples until every source was seen whole
            (smaller ones repeat), ``first_exhausted`` stops when the first source runs out.
        on_bad_rows: ``error`` stops at unusable rows (listing file and line), ``skip`` drops them and says how many.
        batch_size: samples per micro-batch per device.
        shuffle: shuffle the training data each epoch.
        num_workers: DataLoader workers.
        max_samples: use only the first N records of each training source (quick experiments).
        split: split name for hub datasets.
        seed: seed of the validation hold-out, the mixture and shuffling.
        trust_remote_code: passed to the tokenizer.
    """

    unit: str = "samples"
    empty_sample: dict[str, Any] = {}  # the columns ``encode_row`` returns, as filler for a bad row
    # Tokens of one sample in a packed row, Σ weight · len(column): the token budget of ``max_tokens_per_batch``
    length_columns: dict[str, int] = {}

    def __init__(
        self,
        path: str | list[str],
        val_path: str | list[str] | None = None,
        val_split: float = 0.0,
        tokenizer: str = "tiny-llama",
        path_probs: list[float] | None = None,
        mixture_stopping: Literal["first_exhausted", "all_exhausted"] = "all_exhausted",
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
        mixture_weights(path, path_probs)
        if not 0 <= val_split < 1:
            raise ConfigError(f"data.init_args.val_split={val_split} must be in [0, 1).")
        self.tokenizer_path = tokenizer
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None

    # ------------------------------------------------------------------------------------------ subclass API
    def check_columns(self, records: datasets.Dataset, source: str) -> None:
        """Raise :class:`DataError` naming the option of every missing column."""

    def encode_row(self, row: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        """One record -> one sample (or several); raise :class:`BadRow` for an unusable record."""
        raise NotImplementedError

    def finish(self, encoded: datasets.Dataset, source: str) -> datasets.Dataset:
        """Apply the length policy to the encoded rows of one source (report, drop, remove helper columns)."""
        return encoded

    def layout(self, records: datasets.Dataset) -> str:
        """How the records were read (e.g. where the prompt came from), for the summary line."""
        return "records"

    def example(self, sample: dict[str, Any]) -> tuple[str, str]:
        """(prompt, response) text of one encoded sample as the model sees it, for the summary line."""
        return "", ""

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(self.tokenizer_path, trust_remote_code=hp.trust_remote_code)
        train_parts, val_parts = [], []
        for option, source in self._sources(hp.path, "data.init_args.path"):
            records = load_records(source, hp.split, option=option)
            if hp.max_samples:
                records = records.select(range(min(hp.max_samples, len(records))))
            if not hp.val_path and hp.val_split > 0:
                parts = records.train_test_split(test_size=hp.val_split, seed=hp.seed)
                records = parts["train"]
                val_parts.append(self.encode_source(parts["test"], source, "validation hold-out"))
            train_parts.append(self.encode_source(records, source))
        for option, source in self._sources(hp.val_path, "data.init_args.val_path"):
            val_parts.append(self.encode_source(load_records(source, "validation", option=option), source))
        train = mix(train_parts, mixture_weights(hp.path, hp.path_probs), hp.seed, hp.mixture_stopping)
        self.train_dataset = with_dense_index(train)
        self.val_dataset = with_dense_index(datasets.concatenate_datasets(val_parts)) if val_parts else None

    @staticmethod
    def _sources(paths: str | list[str] | None, option: str) -> Iterator[tuple[str, str]]:
        """``(option as the user writes it, source)`` for each path of a path option."""
        for i, source in enumerate(as_list(paths)):
            yield (option if isinstance(paths, str) else f"{option}[{i}]"), source

    def encode_source(self, records: datasets.Dataset, source: str, part: str = "training") -> datasets.Dataset:
        """Encode one source, report bad rows by file line, apply the length policy and log a summary."""
        self.check_columns(records, source)
        fingerprint = self.encoding_fingerprint(records)
        encoded = records.map(partial(self._encode_batch, source=source), batched=True, with_indices=True,
                              remove_columns=records.column_names, desc=f"Tokenizing {source}",
                              new_fingerprint=fingerprint or generate_random_fingerprint(),
                              load_from_cache_file=None if fingerprint else False)
        n_records, encoded = len(records), self._drop_bad_rows(encoded, len(records), source)
        encoded = self.finish(encoded.remove_columns("bad"), source)
        prompt, response = self.example(encoded[0])
        example = f"example prompt {shorten(prompt)}" + (f" / response {shorten(response)}" if response else "")
        rank_zero_info(f"{source} ({part}): {len(encoded)} {self.unit} from {n_records} records; "
                       f"{self.layout(records)}; {example}")
        return encoded

    def _encode_batch(self, batch: dict[str, list], indices: list[int], source: str) -> dict[str, list]:
        """``datasets.map`` (batched) body: every record -> its samples, or one filler row saying why it is bad.

        A record giving several samples (a pair unpaired for KTO) has them placed in separate blocks (all first
        samples of the batch, then all second ones, as TRL's ``unpair_preference_dataset``), so neighbouring rows
        have different prompts even before shuffling (KTO's KL estimate pairs each row with the next one)."""
        blocks: list[list[dict]] = []  # the k-th sample of every record, then the (k+1)-th...
        for position, index in enumerate(indices):
            row = {key: values[position] for key, values in batch.items()}
            try:
                samples = self.encode_row(row)
                samples = [{**s, "bad": ""} for s in (samples if isinstance(samples, list) else [samples])]
            except BadRow as err:
                samples = [{**self.empty_sample, "bad": str(err) or "unusable row"}]
            origin = {"source_file": row.get("source_file", source), "source_line": row.get("source_line", index + 1)}
            for k, sample in enumerate(samples):
                if k == len(blocks):
                    blocks.append([])
                blocks[k].append({**sample, **origin})
        rows = [sample for block in blocks for sample in block]
        return {key: [sample[key] for sample in rows] for key in rows[0]} if rows else {}

    def _drop_bad_rows(self, encoded: datasets.Dataset, n_records: int, source: str) -> datasets.Dataset:
        bad = encoded.filter(lambda why: bool(why), input_columns="bad")
        if len(bad) == 0:
            return encoded
        first = bad.select(range(min(10, len(bad))))
        rows = [f"{where(f, line).removeprefix(f'{source} ')}: {why}"
                for f, line, why in zip(first["source_file"], first["source_line"], first["bad"], strict=True)]
        message = f"{source}: {len(bad)} bad row(s) of {n_records}: " + "; ".join(rows) + (
            " ..." if len(bad) > 10 else "")
        if self.hparams.on_bad_rows == "error":
            raise DataError(f"{message}. Fix them or set data.init_args.on_bad_rows=skip.")
        rank_zero_warn(f"{message}. Skipped (on_bad_rows=skip).")
        kept = encoded.filter(lambda why: not why, input_columns="bad")
        if len(kept) == 0:
            raise DataError(f"{source}: no usable {self.unit} left: all {n_records} records are bad rows; check the "
                            f"data.init_args.*_key options against the file's columns.")
        return kept

    # ------------------------------------------------------------------------------------------ cache key
    def encoding_fingerprint(self, records: datasets.Dataset) -> str | None:
        """The ``datasets`` cache key of the encoded data: the records, this package's version, the source code
        of every module defining this class or one of its bases (so editing or overriding an encoding method
        re-tokenizes), the shared formatting helpers, the tokenizer and the hyperparameters. ``None`` (do not
        cache) when some source code cannot be read, e.g. a class typed into an interactive session."""
        classes = [cls for cls in type(self).__mro__ if issubclass(cls, BaseDataModule)]
        try:
            code = sorted({source_code_of(obj) for obj in [*classes, *ENCODING_MODULES]})
            tokenizer = Hasher.hash(self.tokenizer)
        except (OSError, TypeError) as err:
            rank_zero_warn(f"Tokenized data is not cached: the encoding code's source is unavailable ({err}).")
            return None
        return Hasher.hash([records._fingerprint, rlhf_lightning.__version__, code, tokenizer,
                            sorted((k, repr(v)) for k, v in self.hparams.items())])

    # -------------------------------------------------------------------------------------------- loaders
    def collate_fn(self) -> Callable[[list[dict]], dict]:
        """The batch collator of this kind of data (subclasses that pack take ``packing: bool``)."""
        raise NotImplementedError

    def _loader(self, dataset: datasets.Dataset, shuffle: bool, packed: bool = True) -> StatefulDataLoader:
        """Padded micro-batches of ``batch_size`` samples, or (subclasses with ``packing: true``, unless ``packed``
        is off) packed rows of ``batch_size`` samples or ``max_tokens_per_batch`` tokens."""
        hp = self.hparams
        if not (packed and hp.get("packing")):
            return build_dataloader(dataset, hp.batch_size, shuffle, self.collate_fn(), self.trainer, hp.seed,
                                    hp.num_workers)
        budget = hp.get("max_tokens_per_batch")
        lengths = sample_lengths(dataset, self.length_columns) if budget else [0] * len(dataset)
        if budget:
            check_token_budget(dataset, lengths, budget, "" if len(self.length_columns) == 1 else
                               ": prompt counted once per response, each response is its own segment")
        return build_packed_dataloader(dataset, lengths, hp.batch_size, budget, shuffle,
                                       self.collate_fn(packing=True), self.trainer, hp.seed, hp.num_workers)

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_dataset, shuffle=self.hparams.shuffle)

    def val_dataloader(self) -> StatefulDataLoader | list:
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset is not None else []

    def test_dataloader(self) -> StatefulDataLoader | list:
        """``test`` evaluates the validation data (``val_path`` or the ``val_split`` hold-out)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> StatefulDataLoader:
        """``predict`` scores the training data (``path``) in order."""
        return self.ordered_train_dataloader()

    def ordered_train_dataloader(self) -> StatefulDataLoader:
        """This rank's shard of the training set in a fixed order (e.g. for precomputing reference log-probs);
        always padded rows of ``batch_size`` (one output per sample for ``predict``)."""
        return self._loader(self.train_dataset, shuffle=False, packed=False)
