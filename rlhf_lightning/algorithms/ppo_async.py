"""One-step-off (asynchronous) rollouts for the PPO family (``rollout.asynchronous: true``; inherited by
:class:`~rlhf_lightning.algorithms.ppo.PPO`).

Training step ``k`` receives batch ``k`` of prompts and:

1. waits for the responses to batch ``k - 1``, sampled during step ``k - 1``;
2. pushes the current weights (version ``v``) to the generation workers and starts sampling batch ``k`` with them,
   which runs while the trainer
3. scores batch ``k - 1`` and updates on it (version ``v`` → ``v + 1``).

So each update trains on responses of the policy one version older than the one it updates (never more: sampling
waits for the weights of the step that starts it), and generation overlaps scoring and the update. The first step
only starts sampling; the last batch's responses are sampled but not trained on. The update weights each token by
the truncated importance ratio ``min(π_old / π_sampler, cap)`` (``importance_sampling_cap``, see
:func:`~rlhf_lightning.losses.policy_loss`), with the sampler's log-probs recorded while it sampled.

A checkpoint keeps the responses sampled for the next step (it waits for them), so a resumed run trains on what
the uninterrupted run trained on: nothing is lost or sampled twice.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from rlhf_lightning.rollout.config import RolloutWorkerError
from rlhf_lightning.rollout.engine import Generated, PendingGeneration
from rlhf_lightning.rollout.experience import Experience


@dataclass
class PendingRollout:
    """A batch of prompts sampled (or being sampled) for a later step.

    Attributes:
        batch: the prompts (``prompt_ids``, ``prompt_text``, ``label``).
        seed: its sampling seed.
        version: the policy version sampling with.
        sampling: the generation in flight (``None`` once collected, or when it was lost to a worker failure).
        generated: the responses, once collected.
    """

    batch: dict[str, Any]
    seed: int
    version: int
    sampling: PendingGeneration | None = None
    generated: Generated | None = None


class OneStepOffRollouts:
    """Mixin: the asynchronous rollout schedule (module docstring). Uses :class:`RolloutPhase`'s sampling and
    scoring and the module's ``policy_version``."""

    sampled: PendingRollout | None = None  # started in an earlier step, not yet trained on
    sampling_now: PendingRollout | None = None  # started in this step
    rollouts_started: int = 0  # numbers the rollouts' sampling seeds

    def next_experience_async(self, batch: dict[str, Any]) -> Experience | None:
        """One step of the schedule: collect the previous batch's responses, start sampling ``batch``, score the
        previous batch. ``None`` on the first step (nothing sampled yet). Safe to call again after a worker failure
        (``rollout.max_restarts``): what was already collected or started is not redone."""
        started = time.perf_counter()
        ready = self.sampled
        if ready is not None and ready.generated is None:
            self.on_all_ranks(lambda: self.collect_rollout(ready))
        if self.sampling_now is None:
            self.sync_weights()
            self.sampling_now = self.start_rollout(batch)
        if ready is None:
            return None
        return self.score_rollout(ready.batch, ready.generated, started)

    def end_async_step(self) -> None:
        """After the step's update: the batch it started sampling is the next step's to train on."""
        self.sampled, self.sampling_now = self.sampling_now, None

    def start_rollout(self, batch: dict[str, Any]) -> PendingRollout:
        """Start sampling ``batch`` with the weights just pushed."""
        rollout = PendingRollout(batch, self.sampling_seed(self.rollouts_started), self.policy_version)
        self.rollouts_started += 1
        rollout.sampling = self.start_sampling(batch["prompt_ids"], rollout.seed)
        return rollout

    def collect_rollout(self, rollout: PendingRollout) -> None:
        """Wait for ``rollout``'s responses; one whose sampling was lost (a worker failed) is sampled again now, with
        the current weights."""
        if rollout.sampling is None:
            self.sync_weights()
            rollout.version = self.policy_version
            rollout.sampling = self.start_sampling(rollout.batch["prompt_ids"], rollout.seed)
        rollout.generated = self.finish_sampling(rollout.sampling, rollout.version)
        rollout.sampling = None

    def forget_lost_sampling(self) -> None:
        """After a worker failure, on every rank: sampling in flight may have died with it, so the batches not yet
        trained on are sampled again with the current weights, also those whose responses arrived (on some ranks
        they may have, on others not: every rank must then take the same steps, weight push included)."""
        for rollout in (self.sampled, self.sampling_now):
            if rollout is not None:
                rollout.sampling, rollout.generated = None, None

    # ------------------------------------------------------------------------------------------ checkpoints
    def pending_rollout_state(self) -> list[dict[str, Any] | None]:
        """What a checkpoint keeps of the schedule, one entry per rank (gathered on every rank): the batch sampled
        for the next step with its responses, waited for here. Inside a step (a failure checkpoint) that is the
        batch the step was to train on (the batch the step started is replayed on resume); if its sampling died
        with a worker, it is kept without responses and sampled again on resume."""
        rollout, state = self.sampled, None
        if rollout is not None:
            if rollout.generated is None and rollout.sampling is not None:
                try:
                    self.collect_rollout(rollout)
                except RolloutWorkerError:
                    rollout.sampling = None
            state = {"batch": rollout.batch, "seed": rollout.seed, "version": rollout.version,
                     "generated": asdict(rollout.generated) if rollout.generated is not None else None}
        if self.trainer.world_size == 1:
            return [state]
        gathered: list[dict[str, Any] | None] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def restore_pending_rollout(self, states: list[dict[str, Any] | None] | None) -> None:
        """Take this rank's entry of :meth:`pending_rollout_state` back (a run resumed on another number of ranks
        drops them, with a warning: those batches are then not trained on)."""
        if not states:
            return
        if len(states) != self.trainer.world_size:
            rank_zero_warn(f"The checkpoint holds rollouts sampled on {len(states)} ranks, this run has "
                           f"{self.trainer.world_size}: they are dropped (one batch per rank is not trained on).")
            return
        state = states[self.global_rank]
        if state is not None:
            generated = Generated(**state["generated"]) if state["generated"] is not None else None
            self.sampled = PendingRollout(state["batch"], state["seed"], state["version"], generated=generated)
