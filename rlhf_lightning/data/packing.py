"""Padding-free packing: the samples of a micro-batch concatenated into one row, and token-budget micro-batches.

A packed batch is one row of ``N`` real tokens (no padding, so no compute is spent on it)::

    input_ids    (1, N)  the samples' tokens one after another
    position_ids (1, N)  0, 1, ... restarting at every sample
    labels       (1, N)  as in a padded batch, with each sample's first token set to -100 (nothing predicts it,
                         and the shift of next-token labels must not make the previous sample predict it)
    segment_ids  (1, N)  which sample (0..S-1) each token belongs to, for per-sample sums and last-token reads

There is no ``attention_mask``: transformers (``masking_utils``) then builds the block-diagonal causal mask from
the restarting ``position_ids`` on the sdpa/eager paths, and flash-attention 2 derives varlen ``cu_seqlens`` from
them, so attention never crosses samples. That detection is skipped when a KV cache exists, so the forward pass
must get ``use_cache=False`` (:func:`rlhf_lightning.logprobs.forward_inputs` does it; ``tests/test_packing.py``
checks that changing one sample leaves the others' log-probs unchanged).

Micro-batches (:class:`PackedBatchSampler`) hold ``batch_size`` samples, or, with ``max_tokens_per_batch``, as
many consecutive samples (in the epoch's shuffled order) as fit the token budget. The plan is made over the whole
dataset with the same seed on every rank and dealt round-robin, padded with repeated micro-batches to a multiple
of the world size, so every rank runs the same number of steps (DDP/DeepSpeed would hang otherwise). With a token
budget the number of micro-batches can differ by a few between epochs (each epoch packs its own shuffled order);
Lightning sizes every epoch (progress bar, LR schedule) from the first, so a longer epoch ends at that count and
its last micro-batch or two wait for the next epoch's shuffle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import datasets
import lightning.pytorch as pl
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from rlhf_lightning.data.collate import pack_segments
from rlhf_lightning.data.sources import where
from rlhf_lightning.errors import ConfigError

__all__ = ["PackedBatchSampler", "build_packed_dataloader", "check_packing_options", "pack_segments",
           "plan_micro_batches", "sample_lengths"]


def check_packing_options(packing: bool, max_tokens_per_batch: int | None) -> None:
    """Raise :class:`ConfigError` for a token budget without packing or below 1."""
    if max_tokens_per_batch is None:
        return
    if not packing:
        raise ConfigError(f"data.init_args.max_tokens_per_batch={max_tokens_per_batch} needs "
                          f"data.init_args.packing=true (token-budget micro-batches are packed rows).")
    if max_tokens_per_batch < 1:
        raise ConfigError(f"data.init_args.max_tokens_per_batch={max_tokens_per_batch} must be >= 1 (or null: "
                          f"data.init_args.batch_size samples per packed row).")


def sample_lengths(dataset: datasets.Dataset, weights: dict[str, int]) -> list[int]:
    """Tokens of each row: ``Σ weight · len(row[column])`` over ``weights`` (list columns), read with arrow."""
    lengths: list[int] = []
    for batch in dataset.with_format("arrow").iter(batch_size=10_000):
        total = None
        for column, weight in weights.items():
            part = pc.multiply(pc.list_value_length(batch[column]), weight)
            total = part if total is None else pc.add(total, part)
        lengths.extend(total.to_pylist())
    return lengths


def plan_micro_batches(order: Sequence[int], lengths: Sequence[int], batch_size: int,
                       max_tokens: int | None) -> list[list[int]]:
    """Consecutive runs of ``order``: ``batch_size`` rows each, or (with ``max_tokens``) as many rows as fit the
    token budget, greedily (a row that does not fit starts the next micro-batch)."""
    if max_tokens is None:
        return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index in order:
        if current and used + lengths[index] > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    return batches + [current] if current else batches


def check_token_budget(dataset: datasets.Dataset, lengths: Sequence[int], max_tokens: int, max_len_hint: str) -> None:
    """Raise :class:`ConfigError` naming ``data.init_args.max_tokens_per_batch`` and the longest sample's file and
    line when a sample alone exceeds the budget."""
    longest = max(range(len(lengths)), key=lengths.__getitem__, default=None)
    if longest is None or lengths[longest] <= max_tokens:
        return
    row = dataset[longest]
    origin = where(row["source_file"], row["source_line"]) if "source_file" in row else f"row {longest}"
    raise ConfigError(f"data.init_args.max_tokens_per_batch={max_tokens} is smaller than the sample at {origin} "
                      f"({lengths[longest]} tokens{max_len_hint}): raise it to at least {lengths[longest]}, or lower "
                      f"data.init_args.max_len.")


class PackedBatchSampler(DistributedSampler):
    """Yields one list of row indices per micro-batch (this rank's share of the epoch's plan).

    A ``DistributedSampler`` subclass so Lightning keeps it (it replaces other samplers under distributed
    strategies); like :class:`~rlhf_lightning.data.loaders.TrainerEpochSampler` it reads the epoch from the trainer
    when iteration starts, and the plan is a pure function of (seed, epoch, lengths), so ``StatefulDataLoader``
    resumes mid-epoch by replaying it.
    """

    def __init__(self, dataset: Dataset, lengths: Sequence[int], batch_size: int, max_tokens: int | None,
                 trainer: pl.Trainer | None = None, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 42) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.lengths, self.batch_size, self.max_tokens, self.trainer = list(lengths), batch_size, max_tokens, trainer
        self._plans: dict[int, list[list[int]]] = {}

    def current_epoch(self) -> int:
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else self.epoch

    def plan(self) -> list[list[int]]:
        """This rank's micro-batches for the current epoch."""
        epoch = self.current_epoch()
        if epoch not in self._plans:
            n = len(self.lengths)
            if self.shuffle:
                generator = torch.Generator()
                generator.manual_seed(self.seed + epoch)
                order = torch.randperm(n, generator=generator).tolist()
            else:
                order = list(range(n))
            batches = plan_micro_batches(order, self.lengths, self.batch_size, self.max_tokens)
            batches += batches[: -len(batches) % self.num_replicas] if batches else []
            self._plans = {epoch: batches[self.rank::self.num_replicas]}
        return self._plans[epoch]

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        self.set_epoch(self.current_epoch())
        return iter(self.plan())

    def __len__(self) -> int:
        return len(self.plan())


class RowLists(Dataset):
    """``dataset[list of indices]`` -> the list of those rows (as dicts), for a loader whose sampler yields
    micro-batches."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> list[dict[str, Any]]:
        columns = self.dataset[indices]
        return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


class CollateMicroBatch:
    """The loader's collate function: the loader batches one sampler item (a micro-batch's row list) at a time,
    so ``items`` is ``[rows]``; ``collate`` gets the rows."""

    def __init__(self, collate: Callable[[list[dict]], dict]) -> None:
        self.collate = collate

    def __call__(self, items: list[list[dict[str, Any]]]) -> dict:
        (rows,) = items
        return self.collate(rows)


def build_packed_dataloader(dataset: datasets.Dataset, lengths: Sequence[int], batch_size: int,
                            max_tokens: int | None, shuffle: bool, collate_fn: Callable[[list[dict]], dict],
                            trainer: pl.Trainer | None = None, seed: int = 42,
                            num_workers: int = 0) -> StatefulDataLoader:
    """A resumable loader of packed micro-batches (see :class:`PackedBatchSampler`).

    Each sampler item is a whole micro-batch, fetched as one item (``batch_size=1`` of row lists): with
    ``batch_size=None`` the loader would have no ``batch_sampler``, which Lightning's DeepSpeed strategy reads."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = PackedBatchSampler(dataset, lengths, batch_size, max_tokens, trainer, world, rank, shuffle, seed)
    return StatefulDataLoader(RowLists(dataset), batch_size=1, sampler=sampler, num_workers=num_workers,
                              collate_fn=CollateMicroBatch(collate_fn))
