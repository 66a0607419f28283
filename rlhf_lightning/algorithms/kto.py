"""KTO: Kahneman-Tversky Optimization on unpaired good/bad completions (Ethayarajh et al. 2024).

    python -m rlhf_lightning fit --config configs/tiny/kto.yaml

Each batch row is scored twice: with its own completion (the loss) and with the next row's completion
(``UnpairedCollator``); the mismatched pairs estimate KL(π‖π_ref), averaged over all ranks, as the
reference point z0.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_lightning.algorithms.preference import PreferenceModule, sequence_logps, split_pairs
from rlhf_lightning.losses import kto_loss, kto_reference_point


class KTO(PreferenceModule):
    """KTO with a frozen reference model (partitioned like the policy under ZeRO-3).

    Args:
        beta: β of the KTO value function.
        desirable_weight: λ_D, weight of desirable examples.
        undesirable_weight: λ_U, weight of undesirable examples (raise it when they are fewer).
        reference_model: path or hub id of the reference; default: the same weights as ``model``.
        kwargs: model, optimizer and schedule options of :class:`RLHFModule`.
    """

    metric_names = ("loss", "kl", "desirable_reward", "undesirable_reward", "desirable_logps", "undesirable_logps")

    def __init__(self, *args: Any, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reference_model: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference: torch.nn.Module | None = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference is None:
            self.reference = self.load_model(self.hparams.reference_model or self.hparams.model)
            self.reference.eval().requires_grad_(False)

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_matched, policy_mismatched = split_pairs(sequence_logps(self.model, batch)["sum"])
        with torch.no_grad():
            ref_matched, ref_mismatched = split_pairs(sequence_logps(self.reference, batch)["sum"])
            z0 = kto_reference_point(policy_mismatched, ref_mismatched)
            if self.trainer.world_size > 1:
                z0 = self.trainer.strategy.reduce(z0, reduce_op="mean")
        desirable = batch["desirable"]
        hp = self.hparams
        loss = kto_loss(policy_matched, ref_matched, desirable, z0, beta=hp.beta,
                        desirable_weight=hp.desirable_weight, undesirable_weight=hp.undesirable_weight).mean()
        reward = hp.beta * (policy_matched - ref_matched).detach()
        metrics = {"kl": z0}
        for name, mask in (("desirable", desirable), ("undesirable", ~desirable)):
            if mask.any():
                metrics[f"{name}_reward"] = reward[mask]
                metrics[f"{name}_logps"] = policy_matched.detach()[mask]
        return loss, metrics
