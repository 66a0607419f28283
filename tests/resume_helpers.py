"""Callbacks and a reward function that CLI runs in the resume and guard tests import by ``class_path`` (this folder
is on the child processes' PYTHONPATH). Kept free of test imports so a child process loads only this file."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from rlhf_lightning.algorithms import SFT


class KillAtStep(Callback):
    """``SIGKILL`` this process when training reaches optimizer step ``step``: a crash with no clean-up at all."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class LogRandom(Callback):
    """Log one draw of torch's global RNG per step: equal in a resumed and an uninterrupted run only if the
    checkpoint restored the RNG state."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        pl_module.log("probe/rand", torch.rand(()).item())


class NanSFT(SFT):
    """SFT whose loss is NaN at the given optimizer steps, as a bad batch or an overflow would make it."""

    def __init__(self, *args: Any, nan_steps: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nan_steps = set(nan_steps or [])

    weight_sums: list[float] = []  # noqa: RUF012 (shared on purpose: read by the test after the run ends)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        NanSFT.weight_sums.append(float(self.model.lm_head.weight.detach().double().sum()))
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_steps else loss


def prompt_and_length(prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
    """A reward that depends on the prompt (its answer) and varies between samples (response length), so the logged
    mean reward tells both the prompts and the samples of a step apart."""
    return [float(label or 0) / 100 + len(response) / 10 for response, label in zip(responses, labels, strict=True)]

