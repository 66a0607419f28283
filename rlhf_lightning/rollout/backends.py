"""Where rollout workers run: :class:`LocalBackend` (in the trainer process) or :class:`RayBackend` (named Ray
actors), behind one interface that :class:`~rlhf_lightning.rollout.engine.Rollout` uses without knowing which.

A backend makes workers, calls their methods (a call returns a handle), resolves handles together, waits for
workers to start and to come back after a failure, and starts and stops its runtime (a Ray cluster is joined, or
started on 127.0.0.1, in the launching process before Lightning spawns the other ranks).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.rollout.config import RolloutConfig, RolloutWorkerError, WorkerGroup


class Backend:
    """The interface. ``in_process``: workers live in the trainer process (they may then share its modules, and
    every rank has its own); otherwise global rank 0 creates them and the other ranks look them up."""

    in_process: bool = True

    def __init__(self, config: RolloutConfig) -> None:
        self.config = config

    def start(self) -> None:
        """In the launching process, before the trainer ranks start: bring up the runtime the workers need."""

    def connect(self, create: bool, groups: dict[str, tuple[int, WorkerGroup]]) -> None:
        """On each rank before its workers are made; ``groups``: ``{group: (workers, resources each)}``."""

    def make(self, group: str, index: int, cls: type, path: str, resources: WorkerGroup, kwargs: dict[str, Any],
             create: bool) -> Any:
        """Worker ``index`` of ``group``: ``cls(path, **kwargs)`` with the group's ``resources``; created on the
        creating rank, looked up elsewhere."""
        raise NotImplementedError

    def call(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def wait(self, handles: list[Any]) -> list[Any]:
        """Resolve several handles together."""
        raise NotImplementedError

    def wait_started(self, workers: list[Any], created: bool) -> None:
        """Return once every worker has loaded its model."""
        self.wait([self.call(w, "ready") for w in workers])

    def share(self, value: Any) -> Any:
        """``value`` in the form a call to several workers takes it without copying it once per worker."""
        return value

    def recover(self, workers: list[Any]) -> None:
        """After a worker failure: return once every worker answers again, or raise :class:`RolloutWorkerError`."""

    def shutdown(self, workers: list[Any]) -> None:
        """Remove the workers (the creating rank only)."""

    def close(self) -> None:
        """On every rank at the end of training: leave the runtime."""


class _Ready:
    """A local call's result, shaped like a Ray object reference for :meth:`LocalBackend.wait`."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def _half_the_cpu_threads() -> None:
    """On a worker's thread: use half of torch's CPU threads (the trainer's thread keeps its own count), so a worker
    computing beside the trainer does not oversubscribe the cores."""
    torch.set_num_threads(max(1, torch.get_num_threads() // 2))


class LocalBackend(Backend):
    """Workers are plain objects in the trainer process. Calls run when made; with ``rollout.asynchronous`` each
    worker runs its calls in order on a thread of its own (on a GPU, on a CUDA stream of its own), so that
    generating the next rollout overlaps the trainer's update as Ray actors do."""

    def __init__(self, config: RolloutConfig) -> None:
        super().__init__(config)
        self.threads: dict[int, ThreadPoolExecutor] = {}  # id(worker) -> its thread (asynchronous mode)
        self.streams: dict[int, Any] = {}  # id(worker) -> its CUDA stream, made on the worker's thread

    def make(self, group: str, index: int, cls: type, path: str, resources: WorkerGroup, kwargs: dict[str, Any],
             create: bool) -> Any:
        worker = cls(path, **kwargs)
        if self.config.asynchronous:
            self.threads[id(worker)] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rollout-{group}",
                                                          initializer=_half_the_cpu_threads)
        return worker

    def call(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> _Ready | Future:
        thread = self.threads.get(id(worker))
        if thread is None:
            return _Ready(getattr(worker, method)(*args, **kwargs))
        return thread.submit(self._on_own_stream, worker, method, args, kwargs)

    def _on_own_stream(self, worker: Any, method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Run a call on the worker's thread. On a GPU, on its own stream (the trainer's kernels and the worker's
        then run concurrently): it first waits for the work the trainer queued before the call (e.g. the optimizer
        step whose weights a push reads), and is finished on the GPU before its result is handed back."""
        device = getattr(worker, "device", None)
        if device is None or device.type != "cuda":
            return getattr(worker, method)(*args, **kwargs)
        if id(worker) not in self.streams:
            self.streams[id(worker)] = torch.cuda.Stream(device)
        stream = self.streams[id(worker)]
        stream.wait_stream(torch.cuda.default_stream(device))
        with torch.cuda.stream(stream):
            result = getattr(worker, method)(*args, **kwargs)
        stream.synchronize()
        return result

    def wait(self, handles: list[Any]) -> list[Any]:
        return [h.result() for h in handles]

    def shutdown(self, workers: list[Any]) -> None:
        for worker in workers:
            thread = self.threads.pop(id(worker), None)
            if thread is not None:
                thread.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------- Ray
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


class RayBackend(Backend):
    """Workers are named Ray actors (``<namespace>-<group>-<index>``) with the group's CPUs and GPUs; calls return
    object references, resolved together by :meth:`wait`."""

    in_process = False

    def __init__(self, config: RolloutConfig) -> None:
        super().__init__(config)
        self.actor_names: dict[str | None, str] = {}  # Ray actor id -> name, for error messages
        self.placement_groups: dict[str, Any] = {}  # worker group -> its Ray placement group (creating rank)

    def start(self) -> None:
        start_ray(self.config)

    def connect(self, create: bool, groups: dict[str, tuple[int, WorkerGroup]]) -> None:
        """Join (or start) the cluster; the creating rank checks the workers fit a local cluster and reserves the
        placement groups."""
        import ray

        if create:
            start_ray(self.config)
            if self.config.ray_address is None:  # a local cluster: what it has is all it will ever have
                check_resources(resource_demand(groups), ray.cluster_resources(), "the local Ray cluster")
            for group, (count, resources) in groups.items():
                if resources.placement and count:
                    self.placement_groups[group] = self.reserve(group, count, resources)
        elif not ray.is_initialized():
            join_ray(os.environ.get("RAY_ADDRESS") or self.config.ray_address or "auto", self.config.namespace)

    def reserve(self, group: str, count: int, resources: WorkerGroup) -> Any:
        """A placement group of ``count`` bundles for ``group``, ready (or a ConfigError naming the option)."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        bundle = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **(resources.resources or {})}
        bundle = {key: value for key, value in bundle.items() if value > 0}
        pg = placement_group([dict(bundle) for _ in range(count)], strategy=resources.placement,
                             name=f"{self.config.namespace}-{group}")
        try:
            ray.get(pg.ready(), timeout=self.config.startup_timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            self.shutdown([])
            nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
            raise ConfigError(
                f"Ray could not place the {count} '{group}' workers ({bundle} each) with "
                f"model.init_args.rollout.{group_option(group)}.placement = {resources.placement} within "
                f"rollout.startup_timeout = {self.config.startup_timeout:g}s; the cluster's {len(nodes)} nodes "
                f"have {nodes}. Choose another placement (STRICT_SPREAD needs a node per worker), fewer workers, "
                f"or smaller resources.") from None
        return pg

    def make(self, group: str, index: int, cls: type, path: str, resources: WorkerGroup, kwargs: dict[str, Any],
             create: bool) -> Any:
        import ray

        full_name = f"{self.config.namespace}-{group}-{index}"
        if create:
            options: dict[str, Any] = {"name": full_name, "namespace": self.config.namespace}
            if group in self.placement_groups:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    self.placement_groups[group], placement_group_bundle_index=index)
            custom = {"resources": resources.resources} if resources.resources else {}
            actor_cls = ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                   max_restarts=self.config.max_restarts, **custom)(cls)
            actor = actor_cls.options(**options).remote(path, **kwargs)
        else:
            actor = ray.get_actor(full_name, namespace=self.config.namespace)
        self.actor_names[_actor_id(actor)] = full_name
        return actor

    def name_of(self, actor: Any) -> str:
        return self.actor_names.get(_actor_id(actor), "?")

    def call(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(worker, method).remote(*args, **kwargs)

    def wait(self, handles: list[Any]) -> list[Any]:
        """Ray waits for all of them concurrently. A dead actor raises :class:`RolloutWorkerError` naming it, within
        about a second of its death."""
        import ray

        try:
            return ray.get(handles)
        except ray.exceptions.RayActorError as err:
            name = self.actor_names.get(err.actor_id, f"with id {err.actor_id}")
            what = ("could not start" if err.actor_init_failed else "is restarting"
                    if isinstance(err, ray.exceptions.ActorUnavailableError) else "died")
            raise RolloutWorkerError(f"Ray rollout actor '{name}' {what}: {str(err).strip()[:2000]}") from err

    def wait_started(self, workers: list[Any], created: bool) -> None:
        """At most ``startup_timeout`` seconds; then the creating rank removes the actors it asked for, so none is
        left pending, and the error says what the cluster has free."""
        import ray

        handles = [self.call(w, "ready") for w in workers]
        _, pending = ray.wait(handles, num_returns=len(handles), timeout=self.config.startup_timeout)
        if pending:
            late = [self.name_of(a) for a, h in zip(workers, handles, strict=True) if h in pending]
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            if created:
                self.shutdown(workers)
            raise ConfigError(
                f"Ray actors {late} did not start within model.init_args.rollout.startup_timeout = "
                f"{self.config.startup_timeout:g}s; the cluster has {free} free. Lower the workers' num_cpus / "
                f"num_gpus (model.init_args.rollout.<generation|reference|reward>.num_cpus), add nodes, or "
                f"raise startup_timeout if their models are still loading.")
        self.wait(handles)

    def share(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def recover(self, workers: list[Any]) -> None:
        """Wait (at most ``startup_timeout`` seconds) until Ray has restarted the dead workers. A restarted
        generation worker holds its initial weights (version 0) until the trainer pushes the current ones."""
        import ray

        deadline = time.monotonic() + self.config.startup_timeout
        for actor in workers:
            name = self.name_of(actor)
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

    def shutdown(self, workers: list[Any]) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in workers:
            ray.kill(actor)
        for pg in self.placement_groups.values():
            remove_placement_group(pg)
        self.placement_groups = {}

    def close(self) -> None:
        import ray

        ray.shutdown()


def make_backend(config: RolloutConfig) -> Backend:
    """The backend ``config.backend`` names."""
    return {"local": LocalBackend, "ray": RayBackend}[config.backend](config)
