"""A Lightning callback for benchmarks: the wall time at which each training step ends, written at the end of fit
(``benchmarks/bench_async.py`` adds it with ``--trainer.callbacks``)."""

from __future__ import annotations

import json
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class StepEndTimes(Callback):
    """Record ``time.perf_counter()`` at the end of every training batch; dump the list to ``path`` as JSON."""

    def __init__(self, path: str) -> None:
        self.path, self.ends = path, []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with open(self.path, "w") as f:
            json.dump(self.ends, f)
