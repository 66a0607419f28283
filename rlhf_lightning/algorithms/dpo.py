"""Direct Preference Optimization and its variants (IPO, cDPO, robust DPO, hinge/SLiC) against a frozen reference.

    python -m rlhf_lightning fit --config configs/tiny/dpo.yaml

The reference is the starting policy by default (``reference_model: null``) or another checkpoint. Under
ZeRO-3 it is built inside ``deepspeed.zero.Init`` like the policy, so it is partitioned too.
``precompute_reference: true`` scores the whole training (and validation) set with the reference once before
training and caches the log-probs, so each step does one forward pass less; when the reference is the starting
policy no reference model is loaded at all. The cache is stored in checkpoints, so resuming never recomputes it
with an already-trained policy. With ``lora`` (and no ``reference_model``) the reference is the policy with its
adapters disabled, so no reference model is loaded either.

A new variant is one method: subclass :class:`DPO` and override :meth:`DPO.pair_loss`
(``examples/custom_dpo_loss.py``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from rlhf_lightning.algorithms.preference import PreferenceModule, sequence_logps, split_pairs
from rlhf_lightning.lora import adapters_disabled
from rlhf_lightning.losses import dpo_loss


class DPO(PreferenceModule):
    """DPO family.

    Args:
        beta: strength of the implicit KL constraint (β).
        loss_type: ``sigmoid`` (DPO), ``cdpo`` (= sigmoid with ``label_smoothing``), ``robust``, ``ipo``,
            ``hinge``; see :func:`rlhf_lightning.losses.dpo_loss`.
        label_smoothing: assumed preference-label noise ε (cDPO / robust DPO).
        nll_weight: weight of an extra NLL term on the chosen responses (RPO, Pang et al. 2024); 0 = off.
        reference_model: path or hub id of the reference; default: the same weights as ``model``.
        precompute_reference: cache reference log-probs once before training (see module docstring).
        kwargs: model, optimizer and schedule options of :class:`RLHFModule`.
    """

    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "cdpo", "robust", "ipo", "hinge"] = "sigmoid",
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        reference_model: str | None = None,
        precompute_reference: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.reference: torch.nn.Module | None = None
        self.reference_cache: dict[str, torch.Tensor] = {}

    def configure_model(self) -> None:
        super().configure_model()
        hp = self.hparams
        # No reference model when the starting policy's log-probs are cached, or with LoRA (adapters disabled).
        needs_reference = hp.reference_model is not None or not (hp.precompute_reference or self.lora is not None)
        if needs_reference and self.reference is None:
            self.reference = self.load_model(hp.reference_model or hp.model).eval().requires_grad_(False)

    def reference_policy(self) -> AbstractContextManager[torch.nn.Module]:
        """The reference as a context: the reference model, else the policy with its LoRA adapters disabled (without
        adapters, the starting policy itself: only used before training, to fill the cache)."""
        return nullcontext(self.reference) if self.reference is not None else adapters_disabled(self.model)

    # ------------------------------------------------------------------------------------------ reference
    def reference_logps(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """Summed reference log-probs of the batch rows (2B,), from the cache or a no-grad forward pass."""
        if stage in self.reference_cache:
            cached = self.reference_cache[stage].to(batch["index"].device)[batch["index"]]  # (B, 2)
            return torch.cat([cached[:, 0], cached[:, 1]])
        with torch.no_grad(), self.reference_policy() as reference:
            return sequence_logps(reference, batch)["sum"]

    def on_fit_start(self) -> None:
        if not self.hparams.precompute_reference or self.reference_cache:
            return
        if self.trainer.ckpt_path:
            raise RuntimeError("Resuming with precompute_reference=true needs the reference cache, but the "
                               "checkpoint has none; resume with precompute_reference=false.")
        datamodule = self.trainer.datamodule
        self.reference_cache["train"] = self.score_dataset(datamodule.ordered_train_dataloader(),
                                                           len(datamodule.train_dataset), "train")
        if datamodule.val_dataset is not None:
            self.reference_cache["val"] = self.score_dataset(datamodule.val_dataloader(),
                                                             len(datamodule.val_dataset), "val")

    @torch.no_grad()
    def score_dataset(self, loader: torch.utils.data.DataLoader, size: int, name: str) -> torch.Tensor:
        """Reference log-probs (size, 2) [chosen, rejected] for a dataset; every rank scores its shard, then the
        shards are summed across ranks (each index is scored by exactly the ranks whose shard holds it)."""
        total = torch.zeros(size, 2, dtype=torch.float64, device=self.device)
        seen = torch.zeros(size, dtype=torch.float64, device=self.device)
        with self.reference_policy() as model:
            was_training = model.training
            model.eval()
            for batch in tqdm(loader, desc=f"Reference log-probs ({name})", disable=self.global_rank != 0):
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                if int(batch["index"].max()) >= size:  # the DataModule numbers rows densely after filtering
                    raise RuntimeError(f"Row index {int(batch['index'].max())} outside the {size} {name} rows: the "
                                       f"DataModule's 'index' column must number the rows 0..N-1 after filtering.")
                chosen, rejected = split_pairs(sequence_logps(model, batch)["sum"].double())
                total[batch["index"]] = torch.stack([chosen, rejected], dim=1)
                seen[batch["index"]] = 1.0
            model.train(was_training)
        if self.trainer.world_size > 1:
            total, seen = self.trainer.strategy.reduce(total, reduce_op="sum"), self.trainer.strategy.reduce(
                seen, reduce_op="sum")
        cache = (total / seen.clamp(min=1).unsqueeze(1)).float().cpu()
        rank_zero_info(f"Cached reference log-probs for {size} {name} pairs.")
        return cache

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reference_cache"] = self.reference_cache

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.reference_cache = checkpoint.get("reference_cache", {})

    # ------------------------------------------------------------------------------------------------ loss
    def pair_loss(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor) -> torch.Tensor:
        """Per-pair loss (B,) from summed sequence log-probs; override for a new variant."""
        hp = self.hparams
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=hp.beta,
                        loss_type=hp.loss_type, label_smoothing=hp.label_smoothing)

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = sequence_logps(self.model, batch)
        policy_chosen, policy_rejected = split_pairs(policy["sum"])
        ref_chosen, ref_rejected = split_pairs(self.reference_logps(batch, stage))
        loss = self.pair_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected).mean()
        if self.hparams.nll_weight:
            chosen_tokens = split_pairs(policy["count"])[0].sum().clamp(min=1)
            loss = loss + self.hparams.nll_weight * (-policy_chosen.sum() / chosen_tokens)
        chosen_reward = self.hparams.beta * (policy_chosen - ref_chosen).detach()
        rejected_reward = self.hparams.beta * (policy_rejected - ref_rejected).detach()
        return loss, {
            "accuracy": (chosen_reward > rejected_reward).float(),
            "chosen_reward": chosen_reward,
            "rejected_reward": rejected_reward,
            "margin": chosen_reward - rejected_reward,
            "chosen_logps": policy_chosen.detach(),
            "rejected_logps": policy_rejected.detach(),
        }
