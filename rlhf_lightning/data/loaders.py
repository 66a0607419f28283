"""DataLoader construction shared by the DataModules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader


class TrainerEpochSampler(DistributedSampler):
    """A ``DistributedSampler`` that shuffles for the trainer's current epoch whenever an iteration starts.

    Lightning calls ``set_epoch`` at the start of each epoch, but a run resumed mid-epoch restarts its dataloader
    iterator (to apply the restored position) before that call: a plain ``DistributedSampler`` then draws epoch 0's
    order, and a run resumed in epoch 1 or later silently trains on epoch 0's batches.
    """

    def __init__(self, dataset: Dataset, trainer: pl.Trainer, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.trainer = trainer

    def __iter__(self) -> Iterator[int]:
        self.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
        return super().__iter__()


def build_dataloader(dataset: Dataset, batch_size: int, shuffle: bool, collate_fn: Callable,
                     trainer: pl.Trainer | None = None, seed: int = 42, num_workers: int = 0) -> StatefulDataLoader:
    """A resumable DataLoader that shards ``dataset`` over the trainer's ranks and honours ``shuffle``.

    ``StatefulDataLoader`` (torchdata) records how far into the epoch it got; Lightning stores that in checkpoints,
    so ``fit --ckpt_path`` resumes mid-epoch with the next unseen batch instead of restarting the epoch.

    The sampler is built here because Lightning's automatic distributed sampler always shuffles training data,
    which would silently ignore ``shuffle: false`` under DeepSpeed (a distributed strategy even on one device).
    Lightning keeps a ``DistributedSampler`` it finds and calls ``set_epoch`` on it each epoch (see
    :class:`TrainerEpochSampler` for why that is not enough on resume).
    """
    sampler = None
    if trainer is not None:
        sampler = TrainerEpochSampler(dataset, trainer, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                      shuffle=shuffle, seed=seed)
    return StatefulDataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate_fn)
