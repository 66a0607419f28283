"""The rollout half of the PPO family (:class:`~rlhf_lightning.algorithms.ppo.PPO` inherits it): starting and
stopping the rollout workers, pushing the policy's weights to them, sampling, scoring, and turning one batch of
prompts into an :class:`~rlhf_lightning.rollout.experience.Experience`; and surviving (or reporting) a worker that
dies. The update half (losses, optimizer steps) is in ``ppo.py``.

Step by step (:meth:`RolloutPhase.make_experience`):

1. push the policy's weights to the generation workers if they changed (version-checked);
2. sample ``n_samples_per_prompt`` responses per prompt on the generation workers;
3. launch reference log-probs and reward-model scores together, compute rule rewards and (locally, no grad) the old
   log-probs and values while they run, then wait for both;
4. score − KL → advantages with the chosen estimator (:func:`rlhf_lightning.advantages.estimate_advantages`).

Sampling (:meth:`RolloutPhase.start_sampling` / :meth:`RolloutPhase.finish_sampling`) and scoring
(:meth:`RolloutPhase.score_rollout`) are separate calls, so the asynchronous schedule
(:mod:`rlhf_lightning.algorithms.ppo_async`) can score one batch while the next is sampled.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from rlhf_lightning import advantages as adv
from rlhf_lightning.checkpointing import save_named_checkpoint
from rlhf_lightning.data.collate import IGNORE_INDEX, pad_sequences
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.logprobs import forward_inputs, label_log_probs, label_log_probs_and_entropy, pack_rows, unpack_rows
from rlhf_lightning.lora import adapters_disabled, merged_state_dict
from rlhf_lightning.losses import shift_labels
from rlhf_lightning.models import TINY_PRESET, scalar_head
from rlhf_lightning.rollout.config import RolloutWorkerError
from rlhf_lightning.rollout.engine import Generated, PendingGeneration, Rollout
from rlhf_lightning.rollout.experience import Experience, RolloutTimes
from rlhf_lightning.rollout.rewards import checked_scores, combine_rewards
from rlhf_lightning.strategies import DeepSpeedStrategy, state_buckets


class RolloutPhase:
    """Mixin of :class:`~rlhf_lightning.algorithms.ppo.PPO`: everything between a batch of prompts and the
    :class:`Experience` the update trains on. Uses the module's ``hparams``, ``model``, ``critic``, ``tokenizer``,
    ``rollout_config`` / ``rollout_backend``, ``reward_fns`` and version counters."""

    # ------------------------------------------------------------------------------------- workers' lifetime
    def setup(self, stage: str) -> None:
        """Start the rollout workers for ``fit``: in-process ones on every rank; shared ones (Ray) created by global
        rank 0 and looked up by name on the others, after a barrier."""
        if stage != "fit" or self.rollout is not None:
            return
        hp, config = self.hparams, self.rollout_config
        random_init = bool(hp.get("random_init")) or hp.model == TINY_PRESET
        kwargs = {"dtype": hp.dtype, "attn_implementation": hp.attn_implementation,
                  "trust_remote_code": hp.trust_remote_code, "random_init": random_init}
        if random_init:  # the workers' random weights are not the policy's: push the policy before the first rollout
            self.synced_version = -1
        if self.rollout_backend.in_process:
            kwargs["device"] = str(self.trainer.strategy.root_device.type)
        reference = (hp.reference_model or hp.model) if self.uses_reference and not self.reference_is_policy_base \
            else None
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):  # the engine (built after setup) clips in step()
            self.trainer.strategy.config["gradient_clipping"] = hp.max_grad_norm or 0.0
        policy = (lambda: self.model) if self.generates_with_policy() else None
        make = lambda create: Rollout(config, hp.model, reference, hp.reward_models or [], kwargs, create,  # noqa: E731
                                      policy_module=policy, backend=self.rollout_backend)
        if self.rollout_backend.in_process or self.global_rank == 0:
            self.rollout = make(True)
        self.trainer.strategy.barrier("rollout workers started")
        if self.rollout is None:
            self.rollout = make(False)

    def teardown(self, stage: str) -> None:
        """Stop the workers (the rank that created them) and leave the backend's runtime (every rank)."""
        if self.rollout is None:
            return
        if not self.rollout_backend.in_process:  # shared workers: every rank is done with them before removal
            self.trainer.strategy.barrier("rollout done")
        self.rollout.close(creator=self.rollout_backend.in_process or self.global_rank == 0)
        self.rollout = None

    # ----------------------------------------------------------------------------------------------- rollout
    def sync_weights(self) -> None:
        """Stream the policy to the generation workers if it changed since the last push, in buckets of
        ``rollout.weight_sync_bucket_mb`` (with LoRA: merged weights ``W + ΔW`` under the plain model's names, merged
        per bucket). Every rank walks the buckets (gathering ZeRO-3 partitions is collective); rank 0 sends them to
        shared (Ray) workers, each rank to its own in-process ones."""
        if self.synced_version == self.policy_version:
            return
        if self.rollout.shares_policy:  # generating with the module itself: nothing to copy, only the version
            self.rollout.push_weights(None, self.policy_version)
            self.synced_version = self.policy_version
            return
        local = self.rollout_backend.in_process
        bucket_bytes = int(self.rollout_config.weight_sync_bucket_mb * 2**20)
        buckets = (merged_state_dict(self.model, bucket)
                   for bucket in state_buckets(self.model, bucket_bytes, self.global_rank, all_ranks=local))
        sends = local or self.global_rank == 0
        self.on_all_ranks(lambda: self.rollout.push_weights(buckets, self.policy_version) if sends
                          else all(True for _ in buckets))  # also the barrier after the push
        self.synced_version = self.policy_version

    def on_all_ranks(self, call: Any) -> Any:
        """Run a rollout ``call`` on this rank; if a rollout worker failed on any rank, raise on every rank.

        A Ray actor that dies may be seen by one rank only (e.g. rank 0 alone pushes weights). The failure flag is
        all-reduced (which also synchronises the ranks, like a barrier), so all of them stop at the same point
        instead of some waiting forever in the next collective (a ZeRO-3 forward, a checkpoint save)."""
        try:
            result, failure = call(), None
        except RolloutWorkerError as err:
            result, failure = None, err
        if self.trainer.world_size > 1:
            if self.trainer.strategy.reduce_boolean_decision(failure is not None, all=False) and failure is None:
                failure = RolloutWorkerError("A rollout worker failed on another trainer rank (its log names it).")
        if failure is not None:
            raise failure
        return result

    def sampling_seed(self, index: int) -> int:
        """Seed of the ``index``-th rollout's sampling (the policy version; asynchronous: the rollout's number): a
        function of the run's seed (``seed_everything``), the index and the rank, so a resumed run draws the samples
        the uninterrupted run would have drawn."""
        base = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return ((base * 1_000_003 + index) * 1_009 + self.global_rank * 101) % 2**31

    def generates_with_policy(self) -> bool:
        """Whether the rollout generates with this module's policy itself (``rollout.share_policy``; by default
        wherever that is safe: the ``local`` backend without ZeRO-3 partitioning)."""
        config, strategy = self.rollout_config, self.trainer.strategy
        zero3 = isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3
        safe = self.rollout_backend.in_process and not zero3 and not config.asynchronous
        if config.share_policy and not safe:
            raise ConfigError("model.init_args.rollout.share_policy: true needs model.init_args.rollout.backend: "
                              "local and no ZeRO-3 (its partitioned module would gather every layer for every "
                              "generated token): set it to null (automatic) or false.")
        return safe if config.share_policy is None else config.share_policy

    def start_sampling(self, prompt_ids: list[list[int]], seed: int) -> PendingGeneration:
        """Start sampling ``n_samples_per_prompt`` responses per prompt with the weights last pushed (and, for
        asynchronous rollouts, the sampler's log-probs); :meth:`finish_sampling` waits for them."""
        hp, tok = self.hparams, self.tokenizer
        return self.rollout.generate_async(
            prompt_ids, n=hp.n_samples_per_prompt, max_new_tokens=hp.max_new_tokens, temperature=hp.temperature,
            top_p=hp.top_p, top_k=hp.top_k, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
            generation_kwargs=hp.generation_kwargs, seed=seed, with_log_probs=self.rollout_config.asynchronous)

    def finish_sampling(self, pending: PendingGeneration, version: int) -> Generated:
        """Wait for :meth:`start_sampling`; a worker that sampled with other weights than ``version`` (e.g. restarted
        by Ray since the last push) is a :class:`RolloutWorkerError`."""
        generated = self.rollout.collect(pending)
        if any(v != version for v in generated.versions):
            raise RolloutWorkerError(f"Rollout used weight versions {generated.versions}, expected {version} "
                                     f"(a generation worker restarted since the last weight push?).")
        return generated

    def policy_log_probs(self, micro: dict[str, torch.Tensor],
                         with_entropy: bool = False) -> tuple[torch.Tensor, ...]:
        """Log-probs of the response tokens of padded rows (N, L) at the sampling temperature (and, ``with_entropy``,
        the entropy there), with the LM head on the response positions only, in chunks; packed into one row first
        under ``packing``."""
        batch = pack_rows(micro) if self.hparams.packing else micro
        if with_entropy:
            out = label_log_probs_and_entropy(self.model, batch, self.logp_temperature)
        else:
            out = (label_log_probs(self.model, batch, self.logp_temperature),)
        return tuple(unpack_rows(v, micro["attention_mask"]) for v in out) if self.hparams.packing else out

    def values_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Critic values (N, L); position t is the value of the state that predicts token t + 1 (0 at padding
        under ``packing``)."""
        if self.hparams.packing:
            packed = pack_rows({"input_ids": input_ids, "attention_mask": attention_mask})
            hidden = self.critic.base_model(**forward_inputs(packed)).last_hidden_state
            return unpack_rows(scalar_head(self.critic)(hidden).squeeze(-1).float(), attention_mask)
        hidden = self.critic.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state
        return scalar_head(self.critic)(hidden).squeeze(-1).float()

    @torch.no_grad()
    def base_policy_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              labels: torch.Tensor) -> torch.Tensor:
        """Reference log-probs (N, L) from the policy with its LoRA adapters disabled, by micro-batch, while the
        reward workers score (see :attr:`reference_is_policy_base`), computed as the reference worker does."""
        with adapters_disabled(self.model) as base:
            return torch.cat([label_log_probs(base, {"input_ids": input_ids[sl], "attention_mask": attention_mask[sl],
                                                     "labels": labels[sl]}, self.logp_temperature)
                              for sl in self.micro_slices(len(input_ids))])

    @torch.no_grad()
    def make_experience(self, batch: dict[str, Any]) -> Experience:
        """Sample ``batch`` with the current weights and score it (the synchronous rollout)."""
        started = time.perf_counter()
        self.sync_weights()
        generated = self.on_all_ranks(lambda: self.finish_sampling(
            self.start_sampling(batch["prompt_ids"], self.sampling_seed(self.policy_version)), self.policy_version))
        return self.score_rollout(batch, generated, started)

    @torch.no_grad()
    def score_rollout(self, batch: dict[str, Any], generated: Generated, started: float) -> Experience:
        """Score sampled responses (reward sources, reference, old log-probs, values) into an :class:`Experience`;
        ``started``: when this step's rollout began (its generation time is measured until now)."""
        hp, tok = self.hparams, self.tokenizer
        generated_at = time.perf_counter()
        responses = generated.responses
        n = hp.n_samples_per_prompt
        prompts = [p for p in batch["prompt_ids"] for _ in range(n)]
        input_ids = pad_sequences([p + r for p, r in zip(prompts, responses, strict=True)], tok.pad_token_id)
        attention_mask = pad_sequences([[1] * (len(p) + len(r)) for p, r in zip(prompts, responses, strict=True)], 0)
        labels = pad_sequences([[IGNORE_INDEX] * len(p) + r for p, r in zip(prompts, responses, strict=True)],
                               IGNORE_INDEX)
        handles = self.rollout.score_async(input_ids, attention_mask, labels, hp.normalize_reward,
                                           self.logp_temperature)

        # While reference and reward workers run: rule rewards, old log-probs and values, here.
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        prompt_texts = [t for t in batch["prompt_text"] for _ in range(n)]
        labels_text = [lab for lab in batch["label"] for _ in range(n)]
        rule_scores = [torch.tensor(checked_scores(fn, name, prompt_texts, texts, labels_text))
                       for name, fn in self.reward_fns]
        input_ids, attention_mask, labels = (t.to(self.device) for t in (input_ids, attention_mask, labels))
        mask = shift_labels(labels) != IGNORE_INDEX
        old_logps, values = [], []
        need_old_logps = not self.reuses_update_log_probs
        for sl in self.micro_slices(len(responses)):
            if need_old_logps:
                micro = {"input_ids": input_ids[sl], "attention_mask": attention_mask[sl], "labels": labels[sl]}
                old_logps.append(self.policy_log_probs(micro)[0])
            if self.critic is not None:
                values.append(self.values_of(input_ids[sl], attention_mask[sl]) * mask[sl])
        old_logps = torch.cat(old_logps) if old_logps else None
        values = torch.cat(values) if values else None
        local_reference = self.base_policy_log_probs(input_ids, attention_mask, labels) \
            if self.reference_is_policy_base else None
        results = dict(zip(handles, self.on_all_ranks(lambda: self.rollout.wait(list(handles.values()))), strict=True))
        if local_reference is not None:
            results["reference"] = local_reference
        scored = time.perf_counter()

        model_scores = [results[g] for g in self.rollout.reward_groups]
        sources = torch.stack([s.float() for s in model_scores + rule_scores]).to(self.device)  # (sources, N)
        scores = combine_rewards(sources, hp.reward_weights, hp.reward_clip)
        if "reference" in results:
            ref_logps = results["reference"].to(self.device)
            kl = adv.kl_penalty(old_logps, ref_logps, hp.kl_estimator) * mask
        else:
            ref_logps, kl = None, torch.zeros(mask.shape, device=self.device)
        beta = self.kl_controller.value if hp.kl_in_reward else 0.0
        advantages, returns = adv.estimate_advantages(hp.advantage_estimator, adv.AdvantageInputs(
            scores, kl, mask, values, beta, hp.n_samples_per_prompt, hp.gamma, hp.lam,
            hp.whiten_advantages))
        self.last_samples = [{"prompt": p, "response": r, "reward": float(s)}
                             for p, r, s in zip(prompt_texts, texts, scores.tolist(), strict=True)]
        sampler_logps = None
        if generated.log_probs is not None:  # aligned like ``mask``: response token i of a row is at len(prompt)-1+i
            sampler_logps = torch.zeros(mask.shape, dtype=torch.float32)
            for row, (prompt, logps) in enumerate(zip(prompts, generated.log_probs, strict=True)):
                sampler_logps[row, len(prompt) - 1:len(prompt) - 1 + len(logps)] = torch.tensor(logps)
            sampler_logps = sampler_logps.to(self.device)
        return Experience(input_ids=input_ids, attention_mask=attention_mask, labels=labels, mask=mask, scores=scores,
                          source_scores=sources, kl=kl, advantages=advantages, old_logps=old_logps,
                          ref_logps=ref_logps, values=values, returns=returns, sampler_logps=sampler_logps,
                          sampler_version=min(generated.versions),
                          times=RolloutTimes(generate_s=generated_at - started, score_s=scored - generated_at))

    def make_experience_or_recover(self, batch: dict[str, Any]) -> Experience | None:
        """This step's rollout (:meth:`make_experience`, or with ``rollout.asynchronous``
        :meth:`~rlhf_lightning.algorithms.ppo_async.OneStepOffRollouts.next_experience_async`), surviving up to
        ``rollout.max_restarts`` worker failures in this step: once Ray has restarted the dead worker, the current
        weights are pushed again and the step's rollout is retried (sampling lost with the worker is redone).
        Otherwise (or if the worker stays dead) every rank saves a checkpoint and the run stops, naming the worker.
        """
        make = self.next_experience_async if self.rollout_config.asynchronous else self.make_experience
        for attempt in range(self.rollout_config.max_restarts + 1):
            try:
                return make(batch)
            except RolloutWorkerError as err:
                failure = err
            if attempt == self.rollout_config.max_restarts:
                break
            try:
                self.on_all_ranks(self.rollout.recover)
            except RolloutWorkerError as err:
                failure = err
                break
            rank_zero_warn(f"{failure} The worker is back: pushing the weights again and retrying the step.")
            self.synced_version = -1  # a restarted generation worker holds its initial weights
            self.forget_lost_sampling()
            self.rollout_retries += 1
        raise RolloutWorkerError(f"{failure} Stopping the run; {self.save_failure_checkpoint()}") from failure

    def save_failure_checkpoint(self) -> str:
        """Save a checkpoint of the state before this step (called on every rank when a rollout worker fails) and
        say where it is; the optimizer has not stepped in this step, so resuming from it loses no update."""
        try:
            path = save_named_checkpoint(self.trainer, f"rollout-failure-step{self.trainer.global_step}.ckpt")
        except Exception as err:  # noqa: BLE001 -- the rollout failure is the error to report
            return f"saving a checkpoint failed too ({type(err).__name__}: {err})."
        return f"checkpoint saved to {path} (resume with --ckpt_path {path})."
