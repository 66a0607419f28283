"""KTO: Kahneman-Tversky Optimization on unpaired good/bad completions (Ethayarajh et al. 2024).

    python -m rlhf_lightning fit --config configs/tiny/kto.yaml

Each batch row is scored twice: with its own completion (the loss) and with the next row's completion
(``UnpairedCollator``); the mismatched pairs estimate KL(π‖π_ref). The reference point is
``z0 = max(0, mean over all ranks' mismatched pairs)``: averaged across ranks first, then clamped, as in the paper
and TRL (:func:`kto_reference_point_across_ranks`). Clamping on each rank before averaging would bias ``z0`` upward
whenever the ranks' estimates straddle 0.

Data: :class:`~rlhf_lightning.data.UnpairedPreferenceDataModule`, which also reads paired prompt/chosen/rejected
files (one desirable and one undesirable row per pair).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch import LightningDataModule

from rlhf_lightning.algorithms.preference import PreferenceModule, sequence_logps, split_pairs
from rlhf_lightning.data import PreferenceDataModule, UnpairedPreferenceDataModule
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.lora import adapters_disabled
from rlhf_lightning.losses import kto_loss


def kto_reference_point_across_ranks(kl_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """KTO's ``z0`` from every rank's sum of mismatched log-ratios ``log π(y'|x) - log π_ref(y'|x)`` and their
    counts, each ``(world_size,)``: the mean over all mismatched pairs, clamped at 0 after averaging, detached."""
    return (kl_sums.sum() / counts.sum().clamp(min=1)).clamp(min=0).detach()


class KTO(PreferenceModule):
    """KTO with a frozen reference model (partitioned like the policy under ZeRO-3).

    Args:
        beta: β of the KTO value function.
        desirable_weight: λ_D, weight of desirable examples.
        undesirable_weight: λ_U, weight of undesirable examples (raise it when they are fewer).
        reference_model: path or hub id of the reference; default: the same weights as ``model`` (with ``lora``:
            the policy with its adapters disabled, no second model).
        kwargs: model, optimizer and schedule options of :class:`RLHFModule`.
    """

    metric_names = ("loss", "kl", "desirable_reward", "undesirable_reward", "desirable_logps", "undesirable_logps")

    def __init__(self, *args: Any, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reference_model: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference: torch.nn.Module | None = None

    def check_config(self, datamodule: LightningDataModule | None) -> None:
        """KTO needs unpaired batches of at least 2 rows (z0 pairs each prompt with another row's completion)."""
        super().check_config(datamodule)
        if isinstance(datamodule, PreferenceDataModule) and not isinstance(datamodule, UnpairedPreferenceDataModule):
            raise ConfigError("KTO needs data.class_path: rlhf_lightning.data.UnpairedPreferenceDataModule (it reads "
                              "prompt/chosen/rejected files too, unpairing each pair), not PreferenceDataModule.")
        batch_size = datamodule.hparams.get("batch_size") if datamodule is not None else None
        if batch_size is not None and batch_size < 2:
            raise ConfigError(f"data.init_args.batch_size={batch_size}: KTO's KL reference point scores each prompt "
                              f"with another row's completion, so a batch of 1 would use its own; use >= 2.")

    def configure_model(self) -> None:
        super().configure_model()
        hp = self.hparams
        if self.reference is None and (hp.reference_model is not None or self.lora is None):
            self.reference = self.load_model(hp.reference_model or hp.model)
            self.reference.eval().requires_grad_(False)

    def reference_point(self, policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
        """``z0`` over the mismatched pairs of every rank (one all-gather of a sum and a count)."""
        ratios = (policy_mismatched - ref_mismatched).detach()
        local = torch.stack([ratios.sum(), torch.tensor(float(ratios.numel()), device=ratios.device)])
        gathered = self.all_gather(local) if self.trainer.world_size > 1 else local.unsqueeze(0)
        return kto_reference_point_across_ranks(gathered[..., 0].reshape(-1), gathered[..., 1].reshape(-1))

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_matched, policy_mismatched = split_pairs(sequence_logps(self.model, batch)["sum"])
        with torch.no_grad(), (nullcontext(self.reference) if self.reference is not None  # LoRA: adapters off
                               else adapters_disabled(self.model)) as reference:
            ref_matched, ref_mismatched = split_pairs(sequence_logps(reference, batch)["sum"])
            z0 = self.reference_point(policy_mismatched, ref_mismatched)
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
