"""``Rollout``: one interface over the generation, reference and reward workers, on any backend.

The backend (:mod:`rlhf_lightning.rollout.backends`) decides where workers run: ``local`` in the trainer process
(single device, tests), ``ray`` as named Ray actors on their own devices (global rank 0 creates them, the other
trainer ranks look them up by name). Calls return handles; :meth:`Rollout.wait` resolves several at once, so
reference and reward scoring run concurrently.

Failures are loud and early: worker groups asking for more CPUs/GPUs than a local cluster has are a
:class:`~rlhf_lightning.errors.ConfigError` before any actor starts, actors not running within
``startup_timeout`` are one too, and an actor that dies mid-run raises :class:`RolloutWorkerError` naming it
(instead of the run waiting forever on a worker that will never answer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.rollout.backends import Backend, make_backend
from rlhf_lightning.rollout.config import RolloutConfig, RolloutWorkerError, WorkerGroup
from rlhf_lightning.rollout.workers import (
    GenerationWorker,
    PolicyGenerationWorker,
    ReferenceWorker,
    RewardModelWorker,
)

__all__ = ["Generated", "PendingGeneration", "Rollout", "RolloutConfig", "RolloutWorkerError", "WorkerGroup"]


@dataclass
class PendingGeneration:
    """Sampling in progress on the generation workers: ``(worker index, handle)`` per worker given prompts."""

    handles: list[tuple[int, Any]]
    prompts: int
    workers: int
    n: int


@dataclass
class Generated:
    """Sampled responses (``n`` per prompt, grouped by prompt), the weight version each worker sampled with, and
    (when asked for) the sampler's log-prob of every response token."""

    responses: list[list[int]]
    versions: list[int]
    log_probs: list[list[float]] | None = None


class Rollout:
    """Creates (or finds) the workers on the configured backend and dispatches calls to them."""

    def __init__(self, config: RolloutConfig, policy: str, reference: str | None, reward_models: list[str],
                 worker_kwargs: dict[str, Any], create: bool,
                 policy_module: Callable[[], torch.nn.Module] | None = None, backend: Backend | None = None) -> None:
        """``policy_module`` (in-process backends): return the trained module, which then generates itself
        (:class:`PolicyGenerationWorker`) instead of ``generation.count`` workers loading ``policy``."""
        self.config = config
        self.backend = backend or make_backend(config)
        self.shares_policy = policy_module is not None
        if self.shares_policy and not self.backend.in_process:
            raise ConfigError("model.init_args.rollout.share_policy needs model.init_args.rollout.backend: local.")
        specs = [] if self.shares_policy else [("generation", i, GenerationWorker, policy, config.generation)
                                               for i in range(config.generation.count)]
        if reference is not None:
            specs.append(("reference", 0, ReferenceWorker, reference, config.reference))
        specs += [(f"reward{j}", 0, RewardModelWorker, path, config.reward) for j, path in enumerate(reward_models)]
        self.backend.connect(create, {group: (sum(s[0] == group for s in specs), res)
                                      for group, _, _, _, res in specs})
        self.workers: dict[str, list[Any]] = {"generation": [PolicyGenerationWorker(policy_module)]} \
            if self.shares_policy else {}
        for group, index, cls, path, resources in specs:
            worker = self.backend.make(group, index, cls, path, resources, worker_kwargs, create)
            self.workers.setdefault(group, []).append(worker)
        self.backend.wait_started(self.all_workers(), create)
        self.reward_groups = [g for g in self.workers if g.startswith("reward")]

    def all_workers(self) -> list[Any]:
        return [w for group in self.workers.values() for w in group]

    def recover(self) -> None:
        """After a worker failure: wait until every worker answers again (Ray restarted the dead ones); raises
        :class:`RolloutWorkerError` if one is dead for good."""
        self.backend.recover(self.all_workers())

    def _call(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.backend.call(worker, method, *args, **kwargs)

    def wait(self, handles: list[Any]) -> list[Any]:
        """Resolve several handles together; a dead actor raises :class:`RolloutWorkerError` naming it."""
        return self.backend.wait(handles)

    # ------------------------------------------------------------------------------------------------ API
    def push_weights(self, buckets: Iterable[dict[str, torch.Tensor]] | dict[str, torch.Tensor] | None,
                     version: int) -> None:
        """Stream new policy weights into every generation worker, bucket by bucket (a single state dict is one
        bucket), and check they all report ``version``. One bucket is in transit while the next is gathered: the
        sender never holds more than two. ``None`` (a generation worker that is the trained module itself) only
        advances the version."""
        workers = self.workers["generation"]
        if isinstance(buckets, Mapping):
            buckets = [buckets]
        if buckets is not None:
            self.wait([self._call(w, "begin_weights") for w in workers])
            in_flight: list[Any] = []
            for bucket in buckets:
                shared = self.backend.share(bucket)
                handles = [self._call(w, "load_weight_bucket", shared) for w in workers]
                self.wait(in_flight)
                in_flight = handles
            self.wait(in_flight)
        versions = self.wait([self._call(w, "commit_weights", version) for w in workers])
        if any(v != version for v in versions):
            raise RuntimeError(f"Generation workers report weight versions {versions}, expected {version}.")

    def generate(self, prompt_ids: list[list[int]], **sampling: Any) -> tuple[list[list[int]], list[int]]:
        """Split the prompts over the generation workers and wait: responses grouped by prompt, and each worker's
        version (:meth:`generate_async`, then :meth:`collect`)."""
        generated = self.collect(self.generate_async(prompt_ids, **sampling))
        return generated.responses, generated.versions

    def generate_async(self, prompt_ids: list[list[int]], **sampling: Any) -> PendingGeneration:
        """Start sampling: the prompts are split over the generation workers, a ``seed`` offset by the worker's
        index (workers draw different samples). Resolve with :meth:`collect`."""
        workers = self.workers["generation"]
        chunks = [prompt_ids[i::len(workers)] for i in range(len(workers))]
        seed = sampling.pop("seed", None)
        handles = [(i, self._call(w, "generate", chunk, **sampling, seed=None if seed is None else seed + i))
                   for i, (w, chunk) in enumerate(zip(workers, chunks, strict=True)) if chunk]
        return PendingGeneration(handles, len(prompt_ids), len(workers), sampling["n"])

    def collect(self, pending: PendingGeneration) -> Generated:
        """Wait for a :meth:`generate_async` call; responses (and sampler log-probs) back in prompt order."""
        results = self.wait([h for _, h in pending.handles])
        n, stride = pending.n, pending.workers
        per_prompt: list[list[list[int]]] = [[] for _ in range(pending.prompts)]
        per_prompt_logps: list[list[list[float]]] = [[] for _ in range(pending.prompts)]
        for (worker_index, _), result in zip(pending.handles, results, strict=True):
            for j, start in enumerate(range(0, len(result["responses"]), n)):
                per_prompt[worker_index + j * stride] = result["responses"][start:start + n]
                if result.get("log_probs") is not None:
                    per_prompt_logps[worker_index + j * stride] = result["log_probs"][start:start + n]
        with_logps = all(r.get("log_probs") is not None for r in results)
        return Generated([r for group in per_prompt for r in group], [r["version"] for r in results],
                         [lp for group in per_prompt_logps for lp in group] if with_logps else None)

    def score_async(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    normalize_rewards: bool, temperature: float = 1.0) -> dict[str, Any]:
        """Launch reference log-probs (at the sampling ``temperature``) and every reward model's scores at once;
        resolve with :meth:`wait`."""
        input_ids, attention_mask, labels = input_ids.cpu(), attention_mask.cpu(), labels.cpu()
        handles = {}
        if "reference" in self.workers:
            handles["reference"] = self._call(self.workers["reference"][0], "log_probs", input_ids, attention_mask,
                                              labels, temperature)
        for group in self.reward_groups:
            handles[group] = self._call(self.workers[group][0], "score", input_ids, attention_mask, normalize_rewards)
        return handles

    def shutdown(self) -> None:
        """Remove the workers (the rank that created them)."""
        self.backend.shutdown(self.all_workers())
        self.workers = {}

    def close(self, creator: bool) -> None:
        """End of training, on every rank: the creating rank removes the workers, then each leaves the runtime."""
        if creator:
            self.shutdown()
        self.backend.close()
