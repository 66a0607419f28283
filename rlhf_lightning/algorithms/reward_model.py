"""Reward model: a scalar score head on a causal LM, trained on pairwise preferences.

    python -m rlhf_lightning fit --config configs/tiny/rm.yaml

The model is ``AutoModelForSequenceClassification`` with one label (a new ``score`` head when starting from a
causal-LM checkpoint), so the export loads with plain ``transformers``. The reward is read at each sequence's
last non-padding token, located from the attention mask (not from ``pad_token_id``, which is wrong when the
pad token doubles as EOS), or, in packed batches (``data.init_args.packing``), at each segment's last token.
Before every export the mean and std of rewards over (up to ``reward_stats_samples``) training pairs are written
to the model config (``reward_mean``, ``reward_std``) so PPO can normalise rewards.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from rlhf_lightning.algorithms.base import require
from rlhf_lightning.algorithms.preference import PreferenceModule, split_pairs
from rlhf_lightning.logprobs import forward_inputs, is_packed, segment_last_positions
from rlhf_lightning.losses import pairwise_logexp_loss, pairwise_sigmoid_loss
from rlhf_lightning.models import last_token_rewards, scalar_head

PAIRWISE_LOSSES = {"sigmoid": pairwise_sigmoid_loss, "logexp": pairwise_logexp_loss}


def batch_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar reward of each sequence of a padded batch (per row) or packed batch (read at each segment's last
    token; the head sees only those positions): -> (rows or segments,)."""
    if not is_packed(batch):
        return last_token_rewards(model, batch["input_ids"], batch["attention_mask"])
    hidden = model.base_model(**forward_inputs(batch)).last_hidden_state[0]  # (N, H): the one packed row
    return scalar_head(model)(hidden[segment_last_positions(batch["segment_ids"])]).squeeze(-1).float()


class RewardModel(PreferenceModule):
    """Pairwise (Bradley–Terry) reward model.

    Args:
        loss: ``sigmoid`` = ``-log σ(r_c - r_r - m)``, ``logexp`` = ``log(1 + exp(r_r - r_c + m))``.
        use_margin: subtract the data's per-pair margin ``m`` (needs ``data.init_args.margin_key``).
        reward_stats_samples: training pairs used to estimate the reward mean/std stored at export.
        kwargs: model, optimizer and schedule options of :class:`RLHFModule`.
    """

    def __init__(self, *args: Any, loss: Literal["sigmoid", "logexp"] = "sigmoid", use_margin: bool = True,
                 reward_stats_samples: int = 10_000, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        require(reward_stats_samples >= 1, "reward_stats_samples", reward_stats_samples, ">= 1")

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.load_model(self.hparams.model, score_head=True, trainable=True).train()
        super().configure_model()  # tokenizer
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = split_pairs(batch_rewards(self.model, batch))
        margin = batch["margin"] if self.hparams.use_margin else 0.0
        loss = PAIRWISE_LOSSES[self.hparams.loss](chosen, rejected, margin)
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {"accuracy": (chosen > rejected).float(), "chosen_reward": chosen, "rejected_reward": rejected,
                      "margin": chosen - rejected}

    @torch.no_grad()
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Rewards (B, 2) [chosen, rejected] of a preference batch (scores a dataset with ``predict``)."""
        rewards = batch_rewards(self.model, batch)
        return torch.stack(split_pairs(rewards), dim=1)

    @torch.no_grad()
    def prepare_export(self) -> None:
        """Store the reward mean/std over training pairs in the model config (called by ``HFExport``)."""
        datamodule = self.trainer.datamodule
        budget = self.hparams.reward_stats_samples
        was_training = self.model.training
        self.model.eval()
        rewards = []
        for batch in datamodule.ordered_train_dataloader():
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            rewards.append(batch_rewards(self.model, batch))
            if sum(len(r) for r in rewards) >= 2 * budget // max(self.trainer.world_size, 1):
                break
        self.model.train(was_training)
        local = torch.cat(rewards).double()
        stats = torch.stack([local.sum(), (local**2).sum(), torch.tensor(float(len(local)), device=local.device,
                                                                         dtype=torch.float64)])
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        total, squares, count = stats.tolist()
        mean = total / count
        std = max(squares / count - mean**2, 0.0) ** 0.5
        self.model.config.reward_mean, self.model.config.reward_std = mean, std
        rank_zero_info(f"Reward statistics over {int(count)} training responses: mean {mean:.4f}, std {std:.4f}")
