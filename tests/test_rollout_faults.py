"""Ray rollout faults, on a real local Ray cluster (one per module): workers that cannot be scheduled fail fast with
the option to change, the local cluster listens on 127.0.0.1 only, and an actor killed mid-run stops the run within
seconds, naming the actor, with a checkpoint saved."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, base_args, metric_series, read_metrics, run_child, run_cli

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.rollout.backends import check_resources, resource_demand, start_ray
from rlhf_lightning.rollout.config import RolloutConfig, RolloutWorkerError, WorkerGroup
from rlhf_lightning.rollout.engine import Rollout

PROMPTS = REPO / "examples" / "data" / "prompts_tiny.jsonl"


def test_workers_asking_for_more_than_the_cluster_has_name_the_options():
    demand = resource_demand({"generation": (2, WorkerGroup(num_cpus=1)), "reference": (1, WorkerGroup(num_cpus=1)),
                              "reward0": (1, WorkerGroup(num_gpus=0.5, num_cpus=0))})
    with pytest.raises(ConfigError, match=r"ask for 3 CPUs \(generation: 2, reference: 1\) but the cluster has 2: "
                                          r"lower model.init_args.rollout.generation.num_cpus / "
                                          r"model.init_args.rollout.reference.num_cpus \(fractions"):
        check_resources(demand, {"CPU": 2.0}, "the cluster")
    with pytest.raises(ConfigError, match=r"0.5 GPUs \(reward0: 0.5\) .*rollout\.reward\.num_gpus"):
        check_resources(demand, {"CPU": 3.0}, "the cluster")
    check_resources(demand, {"CPU": 3.0, "GPU": 1.0}, "the cluster")


@pytest.mark.parametrize("name", ["ppo.yaml", "grpo.yaml"])
def test_tiny_configs_fit_a_two_core_machine_on_ray(name):
    """``--model.init_args.rollout.backend ray`` (as the README suggests) must not ask for more than 2 cores."""
    args = yaml.safe_load((REPO / "configs" / "tiny" / name).read_text())["model"]["init_args"]
    config = RolloutConfig(**{k: WorkerGroup(**v) if isinstance(v, dict) else v for k, v in args["rollout"].items()})
    groups = {"generation": (config.generation.count, config.generation), "reference": (1, config.reference)}
    groups |= {f"reward{i}": (1, config.reward) for i, _ in enumerate(args.get("reward_models", []))}
    check_resources(resource_demand(groups), {"CPU": 2.0, "GPU": 0.0}, "a 2-core machine")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray cluster for the module, started the way the trainer starts it."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        if ray.is_initialized():
            ray.shutdown()
        start_ray(RolloutConfig(backend="ray", namespace="test-faults"))
        yield ray
        ray.shutdown()


def test_local_cluster_listens_on_loopback_only(local_ray):
    import psutil

    assert os.environ["RAY_ADDRESS"].startswith("127.0.0.1:")
    listening = [(p.name(), c.laddr.ip, c.laddr.port) for p in psutil.Process().children(recursive=True)
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert {name for name, _, _ in listening} >= {"gcs_server", "raylet"}, listening
    exposed = [x for x in listening if x[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
    # The other trainer ranks (processes Lightning launches) still join it through RAY_ADDRESS.
    join = ("import os, ray; from rlhf_lightning.rollout.backends import join_ray; "
            "join_ray(os.environ['RAY_ADDRESS'], 'test-faults'); print(ray.cluster_resources()['CPU'])")
    out = run_child([sys.executable, "-c", join], timeout=120, env={"RAY_ADDRESS": os.environ["RAY_ADDRESS"]})
    assert float(out.stdout.strip().splitlines()[-1]) > 0


def test_unschedulable_workers_fail_fast(local_ray, tiny_model_dir):
    # A local cluster: checked against what it has before any actor starts.
    config = RolloutConfig(backend="ray", namespace="test-faults", reference=WorkerGroup(num_cpus=64))
    with pytest.raises(ConfigError, match="model.init_args.rollout.reference.num_cpus"):
        Rollout(config, str(tiny_model_dir), str(tiny_model_dir), [], {}, create=True)
    # A given cluster (it may grow): actors still pending after startup_timeout fail, naming them and the option.
    config = RolloutConfig(backend="ray", namespace="test-faults", ray_address="auto", startup_timeout=2,
                           generation=WorkerGroup(num_gpus=1, num_cpus=0.5))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"\['test-faults-generation-0'\] did not start within "
                                          r"model.init_args.rollout.startup_timeout = 2s"):
        Rollout(config, str(tiny_model_dir), None, [], {}, create=True)
    assert time.perf_counter() - started < 10
    assert not [a for a in local_ray.util.list_named_actors(all_namespaces=True) if "generation" in str(a)]


KILLER = '''
import json, os, signal, time
import ray

calls = 0


def kill_generation_actor_at_step_2(prompts, responses, labels):
    """A rule reward that, on its second call, SIGKILLs the generation actor's process."""
    global calls
    calls += 1
    namespace = os.environ["KILLER_NAMESPACE"]
    actor = ray.get_actor(f"{namespace}-generation-0", namespace=namespace)
    if calls == 2:
        pid = ray.get(actor.pid.remote())
        os.kill(pid, signal.SIGKILL)
        with open(os.environ["KILLED_AT_FILE"], "w") as f:
            json.dump({"pid": pid, "time": time.time()}, f)
    if calls == 4:  # only reached when the run survived the kill
        with open(os.environ["KILLED_AT_FILE"] + ".after", "w") as f:
            json.dump({"pid": ray.get(actor.pid.remote())}, f)
    return [0.0] * len(responses)
'''


def killer_run_args(tmp_path: Path, model: Path, max_steps: int, monkeypatch: pytest.MonkeyPatch, *extra: str,
                    namespace: str = "test-faults") -> list[str]:
    """A short GRPO run on Ray whose reward function kills the generation actor's process during step 2 (the
    actors in ``namespace``: a run stopped by the failure leaves its other actors behind)."""
    (tmp_path / "killer.py").write_text(KILLER)
    monkeypatch.setenv("KILLER_NAMESPACE", namespace)
    return base_args(tmp_path / "run", model, data=PROMPTS, config=REPO / "configs" / "tiny" / "grpo.yaml") + [
        "--trainer.max_steps", str(max_steps), "--data.init_args.batch_size", "2",
        "--model.init_args.n_samples_per_prompt", "2", "--model.init_args.max_new_tokens", "4",
        "--model.init_args.micro_batch_size", "4",
        "--model.init_args.reward_functions", json.dumps([f"{tmp_path}/killer.py:kill_generation_actor_at_step_2"]),
        "--model.init_args.rollout.backend", "ray", "--model.init_args.rollout.namespace", namespace, *extra]


@pytest.mark.parametrize("asynchronous", ["false", "true"])
def test_restarted_generation_actor_gets_the_weights_and_the_run_goes_on(tmp_path, tiny_model_dir, local_ray,
                                                                         monkeypatch, asynchronous):
    """With ``rollout.max_restarts: 1`` Ray restarts the killed actor (a new process, initial weights); the trainer
    pushes the current weights again (the version check refuses samples from stale ones) and finishes the run.
    Asynchronous: a batch whose sampling died with the actor is sampled again after the restart."""
    killed_at = tmp_path / "killed.json"
    monkeypatch.setenv("KILLED_AT_FILE", str(killed_at))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # an earlier run's teardown may have shut the cluster down
    run_cli(killer_run_args(tmp_path, tiny_model_dir, 4, monkeypatch, "--model.init_args.rollout.max_restarts", "1",
                            "--model.init_args.rollout.asynchronous", asynchronous))
    rows = read_metrics(tmp_path / "run")
    assert metric_series(rows, "train/policy_version") == [1.0, 2.0, 3.0, 4.0]
    if asynchronous == "true":
        assert max(metric_series(rows, "train/policy_lag")) <= 1
    assert metric_series(rows, "train/rollout_retries")[-1] <= 1  # 0 when the restart won the race with the push
    before, after = (json.loads(p.read_text())["pid"] for p in (killed_at, Path(f"{killed_at}.after")))
    assert after != before  # generation went on in the restarted process


@pytest.mark.parametrize("asynchronous", ["false", "true"])
def test_killed_generation_actor_stops_the_run_with_a_checkpoint(tmp_path, tiny_model_dir, local_ray, monkeypatch,
                                                                 asynchronous):
    """GRPO on Ray; the generation actor's process is killed during step 2: step 3's weight push (asynchronous: the
    wait for the batch it was sampling, or the push after it) fails within seconds, naming the actor, after a
    checkpoint of the state before step 3 is saved; asynchronous, it keeps the batch step 3 was to train on."""
    killed_at = tmp_path / "killed.json"
    monkeypatch.setenv("KILLED_AT_FILE", str(killed_at))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # an earlier run's teardown may have shut the cluster down
    run_dir = tmp_path / "run"
    with pytest.raises(RolloutWorkerError) as err:
        run_cli(killer_run_args(tmp_path, tiny_model_dir, 6, monkeypatch, "--model.init_args.rollout.asynchronous",
                                asynchronous, namespace=f"test-faults-stop-{asynchronous}"))
    stopped = time.time()
    message = str(err.value)
    assert f"Ray rollout actor 'test-faults-stop-{asynchronous}-generation-0' died" in message, message
    checkpoint = run_dir / "checkpoints" / "rollout-failure-step2.ckpt"
    assert f"checkpoint saved to {checkpoint}" in message, message
    state = _checkpoint_state(checkpoint)["ppo"]
    assert state["policy_version"] == 2  # two steps trained before the failure
    if asynchronous == "true":
        (pending,) = state["pending_rollouts"]
        assert len(pending["batch"]["prompt_ids"]) == 2  # the batch step 3 was to train on
        # Its responses, if the actor finished them before it died (else resuming samples it again).
        assert pending["generated"] is None or pending["generated"]["versions"] == [1]
    seconds = stopped - json.loads(killed_at.read_text())["time"]
    print(f"killed generation actor -> run stopped (checkpoint saved) in {seconds:.1f} s")
    assert seconds < 30, seconds


def _checkpoint_state(path: Path) -> dict:
    import torch

    files = sorted(path.rglob("*model_states.pt")) if path.is_dir() else [path]
    return torch.load(files[0], map_location="cpu", weights_only=False)
