"""``Rollout``: one interface over the generation, reference and reward workers, in-process or on Ray.

``local`` runs the workers in the trainer process (single device, tests). ``ray`` starts them as named Ray
actors on their own devices: global rank 0 creates them (connecting to ``ray_address`` or starting a local
cluster), the other trainer ranks look them up by name. Calls return handles; :meth:`Rollout.wait` resolves
several at once, so reference and reward scoring run concurrently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rlhf_lightning.rollout.workers import GenerationWorker, ReferenceWorker, RewardModelWorker


@dataclass
class WorkerGroup:
    """Size and resources of one worker group. Fractional ``num_gpus`` colocate workers on one GPU (e.g.
    reference 0.5 + reward 0.5)."""

    count: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0


@dataclass
class RolloutConfig:
    """Where rollout work runs.

    Attributes:
        backend: ``local`` (in the trainer process) or ``ray`` (named actors).
        ray_address: an existing Ray cluster (``auto`` or ``host:port``); ``None`` starts a local one.
        namespace: Ray namespace of the actors; use distinct ones for concurrent jobs on one cluster.
        generation: generation workers (the prompts of a step are split among them).
        reference: reference workers (one is used; more are reserved for sharding large batches).
        reward: reward-model workers, one group per reward model.
    """

    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    namespace: str = "rlhf_lightning"
    generation: WorkerGroup = field(default_factory=WorkerGroup)
    reference: WorkerGroup = field(default_factory=WorkerGroup)
    reward: WorkerGroup = field(default_factory=WorkerGroup)


def start_ray(config: RolloutConfig) -> None:
    """Connect the driver (global rank 0, before the other ranks are launched) to Ray: ``ray_address`` or a new
    local cluster. Its address goes into ``RAY_ADDRESS`` so the trainer ranks Lightning launches next join the
    same cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray_address, namespace=config.namespace, include_dashboard=False,
                 log_to_driver=False)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


class _Ready:
    """A local call's result, shaped like a Ray object reference for :meth:`Rollout.wait`."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Rollout:
    """Creates (or finds) the workers and dispatches calls to them."""

    def __init__(self, config: RolloutConfig, policy: str, reference: str | None, reward_models: list[str],
                 worker_kwargs: dict[str, Any], create: bool) -> None:
        self.config = config
        if config.backend == "ray":
            import ray

            if create:
                start_ray(config)
            elif not ray.is_initialized():
                address = os.environ.get("RAY_ADDRESS") or config.ray_address or "auto"
                ray.init(address=address, namespace=config.namespace, log_to_driver=False)
        specs = [("generation", i, GenerationWorker, policy, config.generation)
                 for i in range(config.generation.count)]
        if reference is not None:
            specs.append(("reference", 0, ReferenceWorker, reference, config.reference))
        specs += [(f"reward{j}", 0, RewardModelWorker, path, config.reward) for j, path in enumerate(reward_models)]
        self.workers: dict[str, list[Any]] = {}
        for group, index, cls, path, resources in specs:
            worker = self._make(f"{group}-{index}", cls, path, resources, worker_kwargs, create)
            self.workers.setdefault(group, []).append(worker)
        self.wait([self._call(w, "ready") for group in self.workers.values() for w in group])
        self.reward_groups = [g for g in self.workers if g.startswith("reward")]

    def _make(self, name: str, cls: type, path: str, resources: WorkerGroup, kwargs: dict, create: bool) -> Any:
        if self.config.backend == "local":
            return cls(path, **kwargs)
        import ray

        full_name = f"{self.config.namespace}-{name}"
        if not create:
            return ray.get_actor(full_name, namespace=self.config.namespace)
        actor_cls = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)(cls)
        return actor_cls.options(name=full_name, namespace=self.config.namespace).remote(path, **kwargs)

    def _call(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.config.backend == "local":
            return _Ready(getattr(worker, method)(*args, **kwargs))
        return getattr(worker, method).remote(*args, **kwargs)

    def wait(self, handles: list[Any]) -> list[Any]:
        """Resolve several handles together (Ray waits for all of them concurrently)."""
        if self.config.backend == "local":
            return [h.value for h in handles]
        import ray

        return ray.get(handles)

    # ------------------------------------------------------------------------------------------------ API
    def push_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Load new policy weights into every generation worker and check they all report ``version``."""
        if self.config.backend == "ray":
            import ray

            state_dict = ray.put(state_dict)
        versions = self.wait([self._call(w, "load_weights", state_dict, version) for w in self.workers["generation"]])
        if any(v != version for v in versions):
            raise RuntimeError(f"Generation workers report weight versions {versions}, expected {version}.")

    def generate(self, prompt_ids: list[list[int]], **sampling: Any) -> tuple[list[list[int]], list[int]]:
        """Split the prompts over the generation workers; responses grouped by prompt, and each worker's version.
        A ``seed`` is offset by the worker's index, so workers draw different samples."""
        workers = self.workers["generation"]
        chunks = [prompt_ids[i::len(workers)] for i in range(len(workers))]
        seed = sampling.pop("seed", None)
        handles = [(i, self._call(w, "generate", chunk, **sampling, seed=None if seed is None else seed + i))
                   for i, (w, chunk) in enumerate(zip(workers, chunks, strict=True)) if chunk]
        results = self.wait([h for _, h in handles])
        n = sampling["n"]
        per_prompt: list[list[list[int]]] = [[] for _ in prompt_ids]
        for (worker_index, _), result in zip(handles, results, strict=True):
            for j, start in enumerate(range(0, len(result["responses"]), n)):
                per_prompt[worker_index + j * len(workers)] = result["responses"][start:start + n]
        return [r for group in per_prompt for r in group], [r["version"] for r in results]

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
        if self.config.backend == "ray":
            import ray

            for group in self.workers.values():
                for actor in group:
                    ray.kill(actor)
        self.workers = {}
