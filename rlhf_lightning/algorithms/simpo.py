"""SimPO: reference-free preference optimisation with length-normalised rewards (Meng et al. 2024).

    python -m rlhf_lightning fit --config configs/tiny/simpo.yaml
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_lightning.algorithms.base import require
from rlhf_lightning.algorithms.preference import PreferenceModule, sequence_logps, split_pairs
from rlhf_lightning.losses import simpo_loss


class SimPO(PreferenceModule):
    """SimPO.

    Args:
        beta: reward scale β (the paper uses 2.0-2.5).
        gamma: target reward margin γ (the paper uses γ/β around 0.5).
        nll_weight: weight of an extra NLL term on the chosen responses (0 = off, as in the paper).
        kwargs: model, optimizer and schedule options of :class:`RLHFModule`.
    """

    def __init__(self, *args: Any, beta: float = 2.0, gamma: float = 1.0, nll_weight: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        require(beta > 0, "beta", beta, "> 0")
        require(gamma >= 0, "gamma", gamma, ">= 0")
        require(nll_weight >= 0, "nll_weight", nll_weight, ">= 0")

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = sequence_logps(self.model, batch)
        chosen_avg, rejected_avg = split_pairs(policy["mean"])
        loss = simpo_loss(chosen_avg, rejected_avg, beta=self.hparams.beta, gamma=self.hparams.gamma).mean()
        if self.hparams.nll_weight:
            loss = loss - self.hparams.nll_weight * chosen_avg.mean()
        beta = self.hparams.beta
        chosen_reward, rejected_reward = beta * chosen_avg.detach(), beta * rejected_avg.detach()
        chosen_logps, rejected_logps = split_pairs(policy["sum"].detach())
        return loss, {"accuracy": (chosen_reward > rejected_reward).float(), "chosen_reward": chosen_reward,
                      "rejected_reward": rejected_reward, "margin": chosen_reward - rejected_reward,
                      "chosen_logps": chosen_logps, "rejected_logps": rejected_logps}
