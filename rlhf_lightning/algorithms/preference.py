"""``PreferenceModule``: the shared skeleton of the DPO family (DPO/IPO/cDPO/robust/hinge, KTO, SimPO, ORPO).

A batch stacks each pair's chosen rows then rejected rows (``PreferenceCollator``), so one forward pass scores
both; a packed batch (``packing: true``) holds them as segments of one row in the same order, and
:func:`~rlhf_lightning.logprobs.sequence_logps` (response positions only through the LM head) returns one value per
row or segment either way. Subclasses implement :meth:`PreferenceModule.compute_loss`, returning the loss and a
dict of per-pair metrics; the base logs them for training and averages them over the whole validation set with
torchmetrics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from rlhf_lightning.algorithms.base import RLHFModule
from rlhf_lightning.logprobs import count_tokens, sequence_logps

__all__ = ["PreferenceModule", "sequence_logps", "split_pairs"]


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) stacked chosen-then-rejected rows -> (chosen, rejected)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


class PreferenceModule(RLHFModule):
    """Base of preference-optimisation algorithms (all arguments: see :class:`RLHFModule`)."""

    metric_names: tuple[str, ...] = ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin",
                                     "chosen_logps", "rejected_logps")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in self.metric_names})

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the scalar loss and per-pair metrics named in ``metric_names`` (each (B,) or scalar)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.compute_loss(batch, "train")
        self.log("train/loss", loss, prog_bar=True)
        for name, value in metrics.items():
            self.log(f"train/{name}", value.float().mean(), prog_bar=name == "accuracy")
        self.log_throughput(count_tokens(batch), batch["index"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, metrics = self.compute_loss(batch, "val")
        pairs = batch["index"].shape[0]
        self.val_metrics["loss"].update(loss.detach(), weight=pairs)
        for name, value in metrics.items():
            self.val_metrics[name].update(value.detach().float())

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        for name, metric in self.val_metrics.items():
            if metric.update_called:
                self.log(f"{stage}/{name}", metric.compute(), prog_bar=name == "accuracy", sync_dist=True)
            metric.reset()
