"""ORPO: monolithic preference optimisation without a reference model (Hong et al. 2024).

    python -m rlhf_lightning fit --config configs/tiny/orpo.yaml

Loss = NLL of the chosen response + λ · odds-ratio loss; trains from a base model (no separate SFT stage).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_lightning.algorithms.base import require
from rlhf_lightning.algorithms.preference import PreferenceModule, sequence_logps, split_pairs
from rlhf_lightning.losses import orpo_odds_ratio_loss


class ORPO(PreferenceModule):
    """ORPO.

    Args:
        lambda_or: weight λ of the odds-ratio term (the paper uses 0.1; TRL calls it ``beta``).
        kwargs: model, optimizer and schedule options of :class:`RLHFModule`.
    """

    metric_names = (*PreferenceModule.metric_names, "nll", "odds_ratio_loss")

    def __init__(self, *args: Any, lambda_or: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        require(lambda_or >= 0, "lambda_or", lambda_or, ">= 0")

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = sequence_logps(self.model, batch)
        chosen_avg, rejected_avg = split_pairs(policy["mean"])
        chosen_sum, rejected_sum = split_pairs(policy["sum"])
        nll = -chosen_sum.sum() / split_pairs(policy["count"])[0].sum().clamp(min=1)
        odds_ratio = orpo_odds_ratio_loss(chosen_avg, rejected_avg)
        loss = nll + self.hparams.lambda_or * odds_ratio.mean()
        chosen_reward, rejected_reward = chosen_avg.detach(), rejected_avg.detach()
        return loss, {"accuracy": (chosen_reward > rejected_reward).float(), "chosen_reward": chosen_reward,
                      "rejected_reward": rejected_reward, "margin": chosen_reward - rejected_reward,
                      "chosen_logps": chosen_sum.detach(), "rejected_logps": rejected_sum.detach(),
                      "nll": nll.detach(), "odds_ratio_loss": odds_ratio.detach()}
