"""PPO and its critic-free relatives (GRPO, Dr. GRPO, RLOO, REINFORCE++), one LightningModule.

    python -m rlhf_lightning fit --config configs/tiny/grpo.yaml

One ``training_step`` = one rollout and its updates:

1. the rollout (:mod:`rlhf_lightning.algorithms.ppo_rollout`, inherited): push the policy's weights to the
   generation workers if they changed, sample, score with the reference and reward workers while the old log-probs
   and values are computed here, advantages with the chosen estimator → an ``Experience``;
2. ``ppo_epochs`` × mini-batches × micro-batches of clipped policy (+ value) loss, gradients accumulated over
   micro-batches (DeepSpeed is told where each accumulation window closes).

With ``rollout.asynchronous`` the step scores and trains on the batch sampled during the previous step while the
generation workers sample this step's batch (:mod:`rlhf_lightning.algorithms.ppo_async`, inherited), each token's
loss weighted by its truncated importance ratio against the sampler.

Actor and critic train under one optimizer with two parameter groups (DeepSpeed accepts one optimizer), the
critic with its own ``critic_learning_rate``. With ``kl_coef: 0`` no reference worker is started at all; with
``lora`` (and no ``reference_model``) neither: the reference log-probs come from the policy with its adapters
disabled, computed here while the reward workers score, and the generation workers receive merged weights. The
critic gets adapters (and a fully trained value head) too.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rlhf_lightning import advantages as adv
from rlhf_lightning.advantages import Estimator
from rlhf_lightning.algorithms.base import RLHFModule, model_option
from rlhf_lightning.algorithms.ppo_async import OneStepOffRollouts
from rlhf_lightning.algorithms.ppo_options import check_options, reward_sources
from rlhf_lightning.algorithms.ppo_rollout import RolloutPhase
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.losses import aggregate, policy_loss, value_loss
from rlhf_lightning.rollout.backends import make_backend
from rlhf_lightning.rollout.config import RolloutConfig
from rlhf_lightning.rollout.engine import Rollout
from rlhf_lightning.rollout.experience import Experience
from rlhf_lightning.strategies import DeepSpeedStrategy


class PPO(OneStepOffRollouts, RolloutPhase, RLHFModule):
    """PPO / GRPO / RLOO / REINFORCE++ (see the module docstring for the loop).

    Args:
        advantage_estimator: ``gae`` (PPO, trains a critic), ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``,
            ``reinforce_baseline`` (critic-free; group estimators need ``n_samples_per_prompt`` > 1).
        n_samples_per_prompt: responses sampled per prompt.
        max_new_tokens: response length limit.
        temperature: sampling temperature (0 = greedy); log-probs, ratios, KL and entropy use the same temperature.
        top_p: nucleus sampling.
        top_k: top-k sampling (0 = off).
        generation_kwargs: further ``GenerationConfig`` fields for sampling, e.g. ``{min_new_tokens: 8}``; the
            checkpoint's own generation config is never applied implicitly.
        reward_models: reward-model paths (exports of ``RewardModel``), each run by its own worker.
        reward_functions: rule rewards as ``file.py:fn`` or ``module:fn`` (prompts, responses, labels -> floats).
        remote_reward_url: an HTTP reward endpoint (see ``RemoteReward``).
        remote_reward_timeout: seconds one remote reward request may take in all (connect to last byte of the reply).
        remote_reward_retries: retries of a failed or timed-out remote request (exponential, jittered backoff).
        remote_reward_batch_size: responses per remote request (``None``: the whole rollout in one request).
        remote_reward_max_concurrency: remote requests in flight at once.
        reward_weights: one weight per reward source, in the order models, functions, remote (default all 1).
        normalize_reward: standardise reward-model scores with the mean/std stored in the model.
        reward_clip: clip the combined score to [-c, c] (``None`` = no clipping).
        reference_model: reference policy (default: ``model``); unused when ``kl_coef`` is 0.
        kl_coef: KL coefficient β (initial value when ``kl_target`` is set).
        kl_estimator: ``k1``, ``k2`` or ``k3`` (Schulman's approximations).
        kl_in_reward: subtract β·KL from the per-token reward (PPO) instead of adding it to the loss (GRPO).
        kl_target: adaptive β towards this KL (Ziegler et al. 2019); ``None`` keeps β fixed.
        kl_horizon: horizon of the adaptive controller, in samples.
        critic_model: initial weights of the critic (default: the first reward model, else the policy).
        critic_learning_rate: the critic's learning rate (default: the optimizer's).
        gamma: discount.
        lam: GAE λ.
        whiten_advantages: standardise GAE advantages over the batch.
        ppo_epochs: passes over each rollout.
        mini_batch_size: sequences per optimizer step (default: the whole rollout).
        micro_batch_size: sequences per forward/backward pass.
        packing: run each micro-batch as one padding-free packed row (position ids restarting per sequence; on a
            GPU flash-attn's varlen kernel, on CPU sdpa with a block-diagonal mask) in the update and in the
            rollout's own log-prob/value pass: no compute on padding when response lengths differ.
        clip_low: PPO ratio clip below 1.
        clip_high: PPO ratio clip above 1 (> clip_low = DAPO's clip-higher).
        dual_clip: dual-clip bound for negative advantages (``None`` = off).
        value_clip: PPO2 value clipping range (``None`` = off).
        value_loss_coef: weight of the value loss.
        entropy_coef: entropy bonus weight.
        loss_aggregation: ``token_mean``, ``seq_mean_token_mean`` or ``seq_mean_token_sum``.
        importance_sampling_cap: with ``rollout.asynchronous`` the responses come from the policy one version old:
            each token's loss is weighted by ``min(π_old / π_sampler, cap)`` (truncated importance sampling; ``None``:
            untruncated). See :mod:`rlhf_lightning.algorithms.ppo_async`.
        max_grad_norm: clip the global gradient norm (actor and critic together) before each optimizer step
            (``None`` = off). Lightning's ``trainer.gradient_clip_val`` does not apply to manual optimization.
        rollout: where generation, reference and reward workers run (``local`` or ``ray``; see ``RolloutConfig``).
        kwargs: model, optimizer and schedule options of :class:`RLHFModule`.
    """

    def __init__(
        self, *args: Any, advantage_estimator: Estimator = "gae", n_samples_per_prompt: int = 1,
        max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
        generation_kwargs: dict[str, Any] | None = None,
        reward_models: list[str] | None = None, reward_functions: list[str] | None = None,
        remote_reward_url: str | None = None, remote_reward_timeout: float = 30.0, remote_reward_retries: int = 2,
        remote_reward_batch_size: int | None = None, remote_reward_max_concurrency: int = 4,
        reward_weights: list[float] | None = None, normalize_reward: bool = True, reward_clip: float | None = 10.0,
        reference_model: str | None = None, kl_coef: float = 0.05, kl_estimator: Literal["k1", "k2", "k3"] = "k1",
        kl_in_reward: bool = True, kl_target: float | None = None, kl_horizon: int = 10_000,
        critic_model: str | None = None, critic_learning_rate: float | None = None, gamma: float = 1.0,
        lam: float = 0.95, whiten_advantages: bool = True, ppo_epochs: int = 1, mini_batch_size: int | None = None,
        micro_batch_size: int = 8, packing: bool = False, clip_low: float = 0.2, clip_high: float = 0.2,
        dual_clip: float | None = None,
        value_clip: float | None = 0.2, value_loss_coef: float = 0.5, entropy_coef: float = 0.0,
        loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean",
        importance_sampling_cap: float | None = 2.0, max_grad_norm: float | None = 1.0,
        rollout: RolloutConfig | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.rollout_config = rollout or RolloutConfig()
        self.rollout_backend = make_backend(self.rollout_config)  # cheap: the runtime starts in setup
        self.critic: torch.nn.Module | None = None
        self.rollout: Rollout | None = None
        self.policy_version, self.synced_version = 0, 0
        self.rollout_retries = 0  # steps retried after a rollout worker restarted (rollout.max_restarts)
        self.kl_controller = (adv.AdaptiveKLController(kl_coef, kl_target, kl_horizon) if kl_target
                              else adv.FixedKLController(kl_coef))
        check_options(self.hparams)
        self.reward_fns, self.reward_source_names = reward_sources(self.hparams)
        self.last_samples: list[dict[str, Any]] = []  # read by rlhf_lightning.callbacks.SampleTable

    @property
    def uses_critic(self) -> bool:
        return self.hparams.advantage_estimator in adv.CRITIC_ESTIMATORS

    @property
    def uses_reference(self) -> bool:
        return self.hparams.kl_coef > 0 or bool(self.hparams.kl_target)

    @property
    def reference_is_policy_base(self) -> bool:
        """With ``lora`` and no ``reference_model`` the reference is the policy with its adapters disabled: its
        log-probs are computed here, and no reference worker (no second copy of the model) is started."""
        return self.uses_reference and self.lora is not None and self.hparams.reference_model is None

    @property
    def logp_temperature(self) -> float:
        """Temperature of the distribution the responses were sampled from (greedy decoding scores at 1)."""
        return self.hparams.temperature if self.hparams.temperature > 0 else 1.0

    @property
    def reuses_update_log_probs(self) -> bool:
        """One PPO epoch over one mini-batch and no reference: the policy that sampled is the one being updated, so
        the old log-probs equal the update's own (detached) and their separate forward pass is skipped (as TRL
        does). Otherwise, e.g. for KL in the reward, they are computed before training."""
        hp = self.hparams
        single_update = hp.ppo_epochs == 1 and (hp.mini_batch_size or self.rollout_size()) >= self.rollout_size()
        return single_update and not self.uses_reference

    # ------------------------------------------------------------------------------------------- set-up
    def check_config(self, datamodule: LightningDataModule | None) -> None:
        """Batch sizes against the rollout (``data.init_args.batch_size`` × ``n_samples_per_prompt`` sequences per
        device): a micro- or mini-batch larger than the rollout cannot be filled, which is a typo, not a setting."""
        super().check_config(datamodule)
        batch_size = datamodule.hparams.get("batch_size") if datamodule is not None else None
        if not batch_size:
            return
        hp = self.hparams
        rollout = batch_size * hp.n_samples_per_prompt
        for name in ("micro_batch_size", "mini_batch_size"):
            if (hp[name] or 0) > rollout:
                raise ConfigError(
                    f"{model_option(name)}={hp[name]} is larger than the rollout: data.init_args.batch_size "
                    f"({batch_size}) × model.init_args.n_samples_per_prompt ({hp.n_samples_per_prompt}) = {rollout} "
                    f"sequences per device. Set {model_option(name)} <= {rollout}.")

    def configure_model(self) -> None:
        super().configure_model()
        hp = self.hparams
        if self.uses_critic and self.critic is None:
            self.critic = self.load_model(hp.critic_model or (hp.reward_models or [hp.model])[0], score_head=True,
                                          trainable=True)  # with ``lora``: adapters and a trained value head
            self.critic.train()

    def trainable_parameters(self) -> list[dict]:
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        if self.critic is not None:
            critic = {"params": [p for p in self.critic.parameters() if p.requires_grad]}
            if self.hparams.critic_learning_rate is not None:
                critic["lr"] = self.hparams.critic_learning_rate
            groups.append(critic)
        return groups

    def rollout_size(self) -> int:
        return self.trainer.datamodule.hparams.batch_size * self.hparams.n_samples_per_prompt

    def total_optimizer_steps(self) -> int:
        per_rollout = math.ceil(self.rollout_size() / (self.hparams.mini_batch_size or self.rollout_size()))
        return int(self.trainer.estimated_stepping_batches) * self.hparams.ppo_epochs * per_rollout

    # ------------------------------------------------------------------------------------------- training
    def micro_slices(self, size: int) -> list[slice]:
        step = self.hparams.micro_batch_size
        return [slice(i, min(i + step, size)) for i in range(0, size, step)]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        started = time.perf_counter()
        exp = self.make_experience_or_recover(batch)
        if exp is None:  # asynchronous rollouts, first step: sampling has only started
            self.end_async_step()
            return
        trained = time.perf_counter()
        stats = self.train_on_experience(exp)
        lag = self.policy_version - exp.sampler_version
        self.policy_version += 1
        if self.rollout_config.asynchronous:
            self.end_async_step()
        mean_kl, samples = self.global_kl(exp.kl)
        self.kl_controller.update(mean_kl, n_steps=samples)
        done = time.perf_counter()
        lengths = exp.mask.sum(-1).float()
        per_source = dict(zip(self.reward_source_names, exp.source_scores.mean(-1), strict=True))
        self.log_dict({
            "train/reward": exp.scores.mean(), "train/reward_std": exp.scores.std(),
            "train/rollout_retries": float(self.rollout_retries),
            **{f"train/reward/{name}": value for name, value in per_source.items()},
            "train/kl": mean_kl, "train/kl_coef": self.kl_controller.value, "train/policy_version": self.policy_version,
            "train/policy_lag": float(lag),
            "train/response_length": lengths.mean(), **{f"train/{k}": v for k, v in stats.items()},
            "time/generate_s": exp.times.generate_s, "time/score_s": exp.times.score_s, "time/train_s": done - trained,
            "train/samples_per_sec": len(exp) / (done - started),
        }, prog_bar=False)
        self.log("train/reward_mean", exp.scores.mean(), prog_bar=True)

    def global_kl(self, kl: torch.Tensor) -> tuple[float, int]:
        """Mean per-sequence KL to the reference and the number of sequences, over all ranks.

        The adaptive controller must see the same numbers on every rank: updated from each rank's own KL, β would
        drift apart across ranks (and a checkpoint would keep rank 0's)."""
        totals = torch.tensor([float(kl.sum()), float(kl.shape[0])], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        return float(totals[0] / totals[1].clamp(min=1)), int(totals[1])

    def train_on_experience(self, exp: Experience) -> dict[str, float]:
        hp = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        size = len(exp)
        mini = hp.mini_batch_size or size
        totals: dict[str, float] = {}
        micro_batches = 0
        for _ in range(hp.ppo_epochs):
            for start in range(0, size, mini):
                stop = min(start + mini, size)
                slices = [slice(start + s.start, start + s.stop) for s in self.micro_slices(stop - start)]
                for i, sl in enumerate(slices):
                    if isinstance(self.trainer.strategy, DeepSpeedStrategy):
                        self.trainer.strategy.micro_batch_boundary(last=i == len(slices) - 1)
                    loss, stats = self.micro_batch_loss(exp, sl)
                    self.manual_backward(loss * self.micro_batch_weight(exp.mask, sl, slice(start, stop)))
                    micro_batches += 1
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + float(value)
                if hp.max_grad_norm and not isinstance(self.trainer.strategy, DeepSpeedStrategy):
                    self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad()
                scheduler.step()
        return {key: value / micro_batches for key, value in totals.items()}  # means over all micro-batches

    def micro_batch_weight(self, mask: torch.Tensor, micro: slice, mini: slice) -> float:
        """Share of the mini-batch's loss that the micro-batch ``micro`` carries, so that the gradients summed over
        micro-batches equal the gradient of the mini-batch's loss: its share of response tokens for ``token_mean``,
        of (non-empty) sequences for the per-sequence aggregations."""
        if self.hparams.loss_aggregation == "token_mean":
            return float(mask[micro].sum() / mask[mini].sum().clamp(min=1))
        rows = mask.bool().any(-1)
        return float(rows[micro].sum() / rows[mini].sum().clamp(min=1))

    def micro_batch_loss(self, exp: Experience, sl: slice) -> tuple[torch.Tensor, dict[str, Any]]:
        hp = self.hparams
        mask = exp.mask[sl]
        logps, token_entropy = self.policy_log_probs(exp.sequences(sl), with_entropy=True)
        old_logps = logps.detach() if exp.old_logps is None else exp.old_logps[sl]
        sampler_logps = exp.sampler_logps[sl] if exp.sampler_logps is not None else None
        loss, stats = policy_loss(logps, old_logps, exp.advantages[sl], mask, hp.clip_low, hp.clip_high,
                                  hp.dual_clip, hp.loss_aggregation, sampler_logps, hp.importance_sampling_cap)
        stats = {k: v.detach() for k, v in stats.items()}
        if not hp.kl_in_reward and self.uses_reference:
            kl = aggregate(adv.kl_penalty(logps, exp.ref_logps[sl], hp.kl_estimator), mask, hp.loss_aggregation)
            loss = loss + self.kl_controller.value * kl
            stats["kl_loss"] = kl.detach()
        entropy = aggregate(token_entropy if hp.entropy_coef else token_entropy.detach(), mask, hp.loss_aggregation)
        if hp.entropy_coef:
            loss = loss - hp.entropy_coef * entropy
        stats["entropy"] = entropy.detach()
        stats["policy_loss"] = loss.detach()
        if self.critic is not None:
            values = self.values_of(exp.input_ids[sl], exp.attention_mask[sl])
            vloss, vstats = value_loss(values, exp.values[sl], exp.returns[sl], mask, hp.value_clip,
                                       hp.loss_aggregation)
            loss = loss + hp.value_loss_coef * vloss
            explained = 1 - (exp.returns[sl] - values.detach())[mask].var() / exp.returns[sl][mask].var()
            stats.update(value_loss=vloss.detach(), explained_variance=explained, **vstats)
        return loss, stats

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ppo"] = {"policy_version": self.policy_version, "kl": self.kl_controller.state_dict()}
        if self.rollout_config.asynchronous:  # the responses sampled for the next step (waited for here)
            checkpoint["ppo"].update(rollouts_started=self.rollouts_started,
                                     pending_rollouts=self.pending_rollout_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ppo", {})
        self.policy_version = state.get("policy_version", 0)  # != 0 makes sync_weights push the restored weights
        self.kl_controller.load_state_dict(state.get("kl", {"value": self.kl_controller.value}))
        if self.rollout_config.asynchronous:
            self.rollouts_started = state.get("rollouts_started", self.policy_version)
            self.restore_pending_rollout(state.get("pending_rollouts"))
        elif any(state.get("pending_rollouts") or []):
            rank_zero_warn("The checkpoint was saved with model.init_args.rollout.asynchronous: true and holds the "
                           "batch sampled for the next step; this run is synchronous, so that batch is not trained "
                           "on. Resume with rollout.asynchronous: true to keep it.")
        rank_zero_info(f"Restored PPO state: policy version {self.policy_version}, KL coef {self.kl_controller.value}")
