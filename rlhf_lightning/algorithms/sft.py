"""Supervised fine-tuning: next-token NLL on the response tokens only.

    python -m rlhf_lightning fit --config configs/tiny/sft.yaml

To try another loss, subclass :class:`SFT` and override :meth:`SFT.compute_loss` (see
``examples/custom_sft_loss.py``).

The default loss never builds the full (tokens × vocabulary) logits: the LM head runs on the response positions
only, in chunks (:func:`rlhf_lightning.logprobs.label_log_probs`), which gives the same value and gradient as
:func:`~rlhf_lightning.losses.sft_nll` on full logits. A subclass that overrides ``compute_loss`` gets the full
logits it asks for. Packed batches (``data.init_args.packing``) work on both paths.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from rlhf_lightning.algorithms.base import RLHFModule
from rlhf_lightning.logprobs import count_tokens, forward_inputs, label_log_probs, num_sequences, sequence_logps
from rlhf_lightning.losses import IGNORE_INDEX, sft_nll, shift_labels


class SFT(RLHFModule):
    """Supervised fine-tuning of a causal LM (all arguments: see :class:`RLHFModule`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_loss = MeanMetric()

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss from next-token ``logits`` (B, T, V) and aligned ``labels`` (B, T, -100 = ignore)."""
        return sft_nll(logits, labels)

    def _common_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = shift_labels(batch["labels"])
        n_targets = (labels != IGNORE_INDEX).sum()
        if type(self).compute_loss is SFT.compute_loss:  # the default NLL: response positions only, chunked
            return -label_log_probs(self.model, batch).sum() / n_targets.clamp(min=1), n_targets
        logits = self.model(**forward_inputs(batch)).logits
        return self.compute_loss(logits, labels), n_targets

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n_targets = self._common_step(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        self.log("train/response_tokens", n_targets.float(), reduce_fx="sum")
        self.log_throughput(count_tokens(batch), num_sequences(batch))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_targets = self._common_step(batch)
        self.val_loss.update(loss, weight=n_targets)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        loss = self.val_loss.compute()  # token-weighted mean, synced across ranks
        self.val_loss.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)  # already equal on all ranks
        self.log(f"{stage}/ppl", torch.exp(loss), sync_dist=True)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Per-sample mean NLL of the response tokens (scores a dataset with ``predict``)."""
        return -sequence_logps(self.model, batch)["mean"]
