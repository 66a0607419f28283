"""A new DPO variant is one method: subclass :class:`rlhf_lightning.algorithms.DPO`, override ``pair_loss``.

    PYTHONPATH=examples python -m rlhf_lightning fit --config configs/tiny/dpo.yaml \
        --model custom_dpo_loss.ExponentialDPO --model.init_args.beta 0.1

Reference handling (frozen, partitioned under ZeRO-3, or cached with ``precompute_reference``), metrics and
logging all come from :class:`DPO`.
"""

import torch

from rlhf_lightning.algorithms import DPO
from rlhf_lightning.losses import preference_logits


class ExponentialDPO(DPO):
    """Exponential preference loss ``exp(-β h)`` (the "exo"-style loss of Tang et al. 2024, GPO family)."""

    def pair_loss(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor) -> torch.Tensor:
        h = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        return torch.exp(-self.hparams.beta * h)
