"""``Rollout``: one interface over the generation, reference and reward workers, in-process or on Ray.

``local`` runs the workers in the trainer process (single device, tests). ``ray`` starts them as named Ray
actors on their own devices: global rank 0 creates them (connecting to ``ray_address`` or starting a local
cluster that listens on 127.0.0.1 only), the other trainer ranks look them up by name. Calls return handles;
:meth:`Rollout.wait` resolves several at once, so reference and reward scoring run concurrently.

Failures are loud and early: worker groups asking for more CPUs/GPUs than a local cluster has are a
:class:`~rlhf_lightning.errors.ConfigError` before any actor starts, actors not running within
``startup_timeout`` are one too, and an actor that dies mid-run raises :class:`RolloutWorkerError` naming it
(instead of the run waiting forever on a worker that will never answer).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.rollout.workers import (
    GenerationWorker,
    PolicyGenerationWorker,
    ReferenceWorker,
    RewardModelWorker,
)


@dataclass
class WorkerGroup:
    """Size and resources of one worker group. Fractional ``num_gpus`` colocate workers on one GPU (e.g.
    reference 0.5 + reward 0.5); fractional ``num_cpus`` (e.g. 0.5) let CPU-only workers share a small machine."""

    count: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0


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
    generation: WorkerGroup = field(default_factory=WorkerGroup)
    reference: WorkerGroup = field(default_factory=WorkerGroup)
    reward: WorkerGroup = field(default_factory=WorkerGroup)


class RolloutWorkerError(RuntimeError):
    """A rollout worker (Ray actor) died or failed to start; the message names the actor."""


# --------------------------------------------------------------------------------------------------------- Ray
_CLUSTER_MODE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While a local Ray cluster starts, make it listen on 127.0.0.1 only.

    Ray 2.x binds its servers (GCS, raylet, workers, agents) to all interfaces and turns a requested node address
    of 127.0.0.1 into the machine's network address. With its multi-node mode off (``RAY_ENABLE_WINDOWS_OR_OSX_
    CLUSTER=0``, Ray's default on macOS and Windows) it takes the loopback address as the node address and binds
    every server to it. The flag is read by Ray at import (the constant) and by the processes it spawns (the
    environment), so both are set, and restored afterwards (joining a real cluster later needs the default)."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_CLUSTER_MODE_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_MODE_VAR], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTER_MODE_VAR, None)
        else:
            os.environ[_CLUSTER_MODE_VAR] = saved_env


def is_loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``) names this machine's loopback interface."""
    return address.rpartition(":")[0].strip("[]") in ("127.0.0.1", "localhost", "::1")


def join_ray(address: str, namespace: str) -> None:
    """Connect to a running cluster. Ray rewrites a loopback address to the machine's network address, where a
    cluster started by :func:`start_ray` does not listen: such an address is joined in :func:`loopback_only` mode."""
    import ray

    with loopback_only() if is_loopback(address) else contextlib.nullcontext():
        ray.init(address=address, namespace=namespace, log_to_driver=False)


def start_ray(config: RolloutConfig) -> None:
    """Connect the driver (global rank 0, before the other ranks are launched) to Ray: ``ray_address`` (or
    ``RAY_ADDRESS``) or a new local cluster bound to 127.0.0.1. Its address goes into ``RAY_ADDRESS`` so the trainer
    ranks Lightning launches next join the same cluster."""
    import ray

    if not ray.is_initialized():
        address = config.ray_address or os.environ.get("RAY_ADDRESS")
        if address is None:
            with loopback_only():
                ray.init(_node_ip_address="127.0.0.1", namespace=config.namespace, include_dashboard=False,
                         log_to_driver=False)
        else:
            join_ray(address, config.namespace)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def group_option(group: str) -> str:
    """The ``RolloutConfig`` field configuring a worker group (``reward0``, ``reward1``... share ``reward``)."""
    return "reward" if group.startswith("reward") else group


def resource_demand(groups: dict[str, tuple[int, WorkerGroup]]) -> dict[str, dict[str, float]]:
    """CPUs and GPUs each worker group asks Ray for: ``{group: {"CPU": n, "GPU": n}}`` from ``{group: (actors,
    resources)}``."""
    return {group: {"CPU": count * res.num_cpus, "GPU": count * res.num_gpus}
            for group, (count, res) in groups.items()}


def check_resources(demand: dict[str, dict[str, float]], available: dict[str, float], where: str) -> None:
    """Raise a ``ConfigError`` naming the groups and options to change when the workers ask for more CPUs or GPUs
    than ``available`` (Ray would otherwise leave the extra actors pending forever, silently)."""
    for resource, option in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        need = sum(d[resource] for d in demand.values())
        have = available.get(resource, 0.0)
        if need <= have + 1e-9:
            continue
        asking = {g: d[resource] for g, d in demand.items() if d[resource] > 0}
        options = " / ".join(dict.fromkeys(f"model.init_args.rollout.{group_option(g)}.{option}" for g in asking))
        share = " (fractions such as 0.5 let CPU workers share a core)" if resource == "CPU" else ""
        detail = ", ".join(f"{g}: {v:g}" for g, v in asking.items())
        raise ConfigError(
            f"The Ray rollout workers ask for {need:g} {resource}s ({detail}) but {where} has {have:g}: lower "
            f"{options}{share} or the worker counts, or connect to a larger cluster "
            f"with model.init_args.rollout.ray_address.")


def _actor_id(actor: Any) -> str | None:
    actor_id = getattr(actor, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else None


class _Ready:
    """A local call's result, shaped like a Ray object reference for :meth:`Rollout.wait`."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Rollout:
    """Creates (or finds) the workers and dispatches calls to them."""

    def __init__(self, config: RolloutConfig, policy: str, reference: str | None, reward_models: list[str],
                 worker_kwargs: dict[str, Any], create: bool,
                 policy_module: Callable[[], torch.nn.Module] | None = None) -> None:
        """``policy_module`` (``local`` backend): return the trained module, which then generates itself
        (:class:`PolicyGenerationWorker`) instead of ``generation.count`` workers loading ``policy``."""
        self.config = config
        self.shares_policy = policy_module is not None
        if self.shares_policy and config.backend != "local":
            raise ConfigError("model.init_args.rollout.share_policy needs model.init_args.rollout.backend: local.")
        specs = [] if self.shares_policy else [("generation", i, GenerationWorker, policy, config.generation)
                                               for i in range(config.generation.count)]
        if reference is not None:
            specs.append(("reference", 0, ReferenceWorker, reference, config.reference))
        specs += [(f"reward{j}", 0, RewardModelWorker, path, config.reward) for j, path in enumerate(reward_models)]
        if config.backend == "ray":
            self._connect(create, {group: (sum(s[0] == group for s in specs), res) for group, _, _, _, res in specs})
        self.workers: dict[str, list[Any]] = {"generation": [PolicyGenerationWorker(policy_module)]} \
            if self.shares_policy else {}
        self.actor_names: dict[str, str] = {}  # Ray actor id -> name, for error messages
        for group, index, cls, path, resources in specs:
            worker = self._make(f"{group}-{index}", cls, path, resources, worker_kwargs, create)
            self.workers.setdefault(group, []).append(worker)
        self._wait_started(create)
        self.reward_groups = [g for g in self.workers if g.startswith("reward")]

    def _connect(self, create: bool, groups: dict[str, tuple[int, WorkerGroup]]) -> None:
        """Join (or start) the cluster; on a local cluster the creating rank checks the workers fit it."""
        import ray

        if create:
            start_ray(self.config)
            if self.config.ray_address is None:  # a local cluster: what it has is all it will ever have
                check_resources(resource_demand(groups), ray.cluster_resources(), "the local Ray cluster")
        elif not ray.is_initialized():
            join_ray(os.environ.get("RAY_ADDRESS") or self.config.ray_address or "auto", self.config.namespace)

    def _make(self, name: str, cls: type, path: str, resources: WorkerGroup, kwargs: dict, create: bool) -> Any:
        if self.config.backend == "local":
            return cls(path, **kwargs)
        import ray

        full_name = f"{self.config.namespace}-{name}"
        if create:
            actor_cls = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                   max_restarts=self.config.max_restarts)(cls)
            actor = actor_cls.options(name=full_name, namespace=self.config.namespace).remote(path, **kwargs)
        else:
            actor = ray.get_actor(full_name, namespace=self.config.namespace)
        self.actor_names[_actor_id(actor)] = full_name
        return actor

    def _wait_started(self, created: bool) -> None:
        """Wait for every worker to be up (models loaded), at most ``startup_timeout`` seconds on Ray (then the
        creating rank removes the actors it asked for, so none is left pending)."""
        actors = [w for group in self.workers.values() for w in group]
        handles = [self._call(w, "ready") for w in actors]
        if self.config.backend == "ray":
            import ray

            _, pending = ray.wait(handles, num_returns=len(handles), timeout=self.config.startup_timeout)
            if pending:
                late = [self.actor_names.get(_actor_id(a), "?") for a, h in zip(actors, handles, strict=True)
                        if h in pending]
                free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
                if created:
                    self.shutdown()
                raise ConfigError(
                    f"Ray actors {late} did not start within model.init_args.rollout.startup_timeout = "
                    f"{self.config.startup_timeout:g}s; the cluster has {free} free. Lower the workers' num_cpus / "
                    f"num_gpus (model.init_args.rollout.<generation|reference|reward>.num_cpus), add nodes, or "
                    f"raise startup_timeout if their models are still loading.")
        self.wait(handles)

    def recover(self) -> None:
        """After a worker failure: wait (at most ``startup_timeout`` seconds) until every worker answers again, i.e.
        Ray restarted the dead ones; raises :class:`RolloutWorkerError` if one is dead for good. A restarted
        generation worker holds its initial weights (version 0) until the trainer pushes the current ones."""
        if self.config.backend == "local":
            return
        import ray

        deadline = time.monotonic() + self.config.startup_timeout
        for actor in [w for group in self.workers.values() for w in group]:
            name = self.actor_names.get(_actor_id(actor), "?")
            late = (f"Ray actor '{name}' did not come back within model.init_args.rollout.startup_timeout = "
                    f"{self.config.startup_timeout:g}s.")
            while True:
                try:
                    ray.get(actor.ready.remote(), timeout=max(deadline - time.monotonic(), 0.1))
                    break
                except ray.exceptions.ActorUnavailableError:  # still restarting: calls fail rather than queue
                    if time.monotonic() > deadline:
                        raise RolloutWorkerError(late) from None
                    time.sleep(0.5)
                except ray.exceptions.GetTimeoutError as err:
                    raise RolloutWorkerError(late) from err
                except ray.exceptions.RayActorError as err:
                    raise RolloutWorkerError(f"Ray actor '{name}' is dead for good (no restarts left): {err}") from err

    def _call(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.config.backend == "local":
            return _Ready(getattr(worker, method)(*args, **kwargs))
        return getattr(worker, method).remote(*args, **kwargs)

    def wait(self, handles: list[Any]) -> list[Any]:
        """Resolve several handles together (Ray waits for all of them concurrently). A dead actor raises
        :class:`RolloutWorkerError` naming it, within about a second of its death."""
        if self.config.backend == "local":
            return [h.value for h in handles]
        import ray

        try:
            return ray.get(handles)
        except ray.exceptions.RayActorError as err:
            name = self.actor_names.get(err.actor_id, f"with id {err.actor_id}")
            what = ("could not start" if err.actor_init_failed else "is restarting"
                    if isinstance(err, ray.exceptions.ActorUnavailableError) else "died")
            raise RolloutWorkerError(f"Ray rollout actor '{name}' {what}: {str(err).strip()[:2000]}") from err

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
