"""Rollout configuration: where the generation, reference and reward workers run (``model.init_args.rollout``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf_lightning.errors import ConfigError


@dataclass
class WorkerGroup:
    """Size, resources and placement of one worker group (Ray backend).

    Attributes:
        count: workers in the group.
        num_gpus: GPUs per worker; fractions colocate workers on one GPU (e.g. reference 0.5 + reward 0.5).
        num_cpus: CPUs per worker; fractions (e.g. 0.5) let CPU-only workers share a small machine.
        resources: custom Ray resources per worker, e.g. ``{"rollout_node": 0.01}`` to run only on the nodes
            started with ``ray start --resources '{"rollout_node": 8}'``.
        placement: place the group as one Ray placement group (one bundle per worker: its CPUs, GPUs and
            ``resources``) with this strategy: ``PACK`` (as few nodes as possible), ``SPREAD`` (as many as
            possible), ``STRICT_PACK`` (one node), ``STRICT_SPREAD`` (one worker per node). The bundles are
            reserved before any worker starts, so a placement the cluster cannot satisfy fails at start-up, by name.
            ``None``: Ray's default scheduling, worker by worker.
    """

    count: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    resources: dict[str, float] | None = None
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None


@dataclass
class RolloutConfig:
    """Where rollout work runs.

    Attributes:
        backend: ``local`` (in the trainer process) or ``ray`` (named actors).
        ray_address: an existing Ray cluster (``auto`` or ``host:port``); ``None`` starts a local one, reachable
            from this machine only (127.0.0.1).
        namespace: Ray namespace of the actors; use distinct ones for concurrent jobs on one cluster.
        startup_timeout: seconds to wait for the Ray actors to start (and load their models) before failing with
            what they asked for and what the cluster has free.
        max_restarts: times Ray may restart each dead actor (it reloads its model); the trainer then pushes the
            current weights again and retries the step. 0: a dead actor stops the run, after saving a checkpoint.
        share_policy: ``local`` backend only: generate with the trained module itself instead of a generation worker
            holding its own copy of the policy (no second copy in memory, no weight push each step). ``None``
            (default): on wherever it is safe, i.e. on the ``local`` backend unless ZeRO-3 partitions the module
            (every generated token would then gather each layer from all ranks); ``true`` where unsafe is an error.
        asynchronous: one-step-off rollouts: the next batch of prompts is sampled (with the weights of the current
            step) while the trainer updates on the previous one, so each update trains on responses of the policy
            one version old, weighted by truncated importance sampling against the sampler's own log-probs (PPO's
            ``importance_sampling_cap``). On ``ray`` the generation actors overlap the update; on ``local`` each
            worker runs on a thread of its own (and, on a GPU, a CUDA stream); the trained module never generates
            itself then (``share_policy`` must not be true).
        weight_sync_bucket_mb: the policy's weights go to the generation workers in buckets of about this size,
            gathered (from ZeRO-3 partitions) one bucket at a time, so the trainer never holds a second full copy.
        generation: generation workers (the prompts of a step are split among them).
        reference: reference workers (one is used; more are reserved for sharding large batches).
        reward: reward-model workers, one group per reward model.
    """

    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    namespace: str = "rlhf_lightning"
    startup_timeout: float = 600.0
    max_restarts: int = 0
    share_policy: bool | None = None
    asynchronous: bool = False
    weight_sync_bucket_mb: float = 256.0
    generation: WorkerGroup = field(default_factory=WorkerGroup)
    reference: WorkerGroup = field(default_factory=WorkerGroup)
    reward: WorkerGroup = field(default_factory=WorkerGroup)

    def __post_init__(self) -> None:
        if self.weight_sync_bucket_mb <= 0:
            raise ConfigError(f"model.init_args.rollout.weight_sync_bucket_mb must be > 0 (got "
                              f"{self.weight_sync_bucket_mb}).")
        if self.share_policy and self.asynchronous:
            raise ConfigError("model.init_args.rollout.share_policy: true cannot be combined with "
                              "model.init_args.rollout.asynchronous: true (the module would sample while it is being "
                              "updated): set share_policy to null (automatic) or false.")
        if self.share_policy and self.backend != "local":
            raise ConfigError("model.init_args.rollout.share_policy: true needs model.init_args.rollout.backend: "
                              "local (Ray generation actors hold their own copy of the policy): set it to null "
                              "(automatic) or false.")


class RolloutWorkerError(RuntimeError):
    """A rollout worker (Ray actor) died or failed to start; the message names the actor."""
