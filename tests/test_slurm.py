"""examples/slurm/*.sbatch submitted to a real Slurm (slurmctld + two slurmd, see ``slurm_cluster.py``) on this
machine: multi-node SFT through srun, and GRPO with its rollout actors on the Ray cluster the script starts over the
allocation (head on the first node, a worker on the second). Both "nodes" are this host, so the jobs show that the
scripts drive Slurm and Ray correctly, not that they cross a network.

Skipped when Slurm is not installed (``bash scripts/install_slurm.sh`` as root installs it), unless
``RLHF_REQUIRE_SLURM`` is set (CI sets it): then a Slurm that cannot run fails the tests."""

import json
import math
import os
import re
import sys
import time

import pytest
from conftest import REPO, base_args, child_env, load_weights, metric_series, read_metrics
from slurm_cluster import LocalSlurm, free_port, missing, processes_with

SCRIPTS = REPO / "examples" / "slurm"
PROMPTS = REPO / "examples" / "data" / "prompts_tiny.jsonl"
JOB_TIMEOUT = 240


@pytest.fixture(scope="module")
def slurm():
    why = missing()
    if why and os.environ.get("RLHF_REQUIRE_SLURM"):
        pytest.fail(f"RLHF_REQUIRE_SLURM is set but {why}")
    if why:
        pytest.skip(why)
    cluster = LocalSlurm().start()
    yield cluster
    cluster.stop()


def submit(slurm: LocalSlurm, script: str, args: list[str], env: dict[str, str], run_dir, nodes: int = 2
           ) -> tuple[dict, str]:
    """Submit ``examples/slurm/<script>`` as a CPU job of ``nodes`` nodes (one task and one CPU each) and wait for it
    to end; return ``scontrol show job`` and the job's output."""
    options = [f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10",
               f"--output={run_dir}/slurm-%j.out"]
    job_id = slurm.sbatch(SCRIPTS / script, args, options, child_env({"PYTHON": sys.executable, **env}), cwd=REPO)
    log = run_dir / f"slurm-{job_id}.out"
    try:
        info = slurm.wait(job_id, JOB_TIMEOUT)
    except TimeoutError as e:
        pytest.fail(f"{e}:\n{log.read_text(errors='replace')[-6000:] if log.exists() else ''}")
    return info, log.read_text(errors="replace")


def run_job(slurm: LocalSlurm, script: str, args: list[str], env: dict[str, str], run_dir) -> tuple[dict, str]:
    """:func:`submit` on 2 nodes; the job must have completed."""
    info, output = submit(slurm, script, args, env, run_dir)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"job {info['JobId']}: {info.get('JobState')} {info.get('ExitCode')}\n{output[-6000:]}")
    return info, output


def no_processes_left(job_id: str, timeout: float = 30) -> list[int]:
    """Processes the job started that are still running (none once ``timeout`` allowed them to exit)."""
    deadline = time.monotonic() + timeout
    while (left := processes_with(f"SLURM_JOB_ID={job_id}\0")) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_train_sbatch_runs_sft_over_two_nodes(slurm, tmp_path, tiny_model_dir):
    """srun starts one rank per node; Lightning's SLURMEnvironment makes them one world of 2 (DeepSpeed writes a
    ZeRO shard per rank)."""
    args = base_args(tmp_path, tiny_model_dir)[3:] + [  # base_args minus `fit --config`: the script adds them
        "--trainer.max_epochs", "1", "--trainer.max_steps", "5", "--data.init_args.batch_size", "4",
        "--trainer.accelerator", "cpu"]
    info, out = run_job(slurm, "train.sbatch", args, {"CONFIG": "configs/tiny/sft.yaml",
                                                      "MASTER_PORT": str(free_port())}, tmp_path)
    assert info["NodeList"] == "rlhf-n[1-2]"
    assert "[train.sbatch] job" in out and "2 nodes (rlhf-n[1-2]) x 1 tasks" in out
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    losses = metric_series(read_metrics(tmp_path), "train/loss")
    assert losses and all(math.isfinite(x) for x in losses)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt" / "checkpoint"
    assert list(checkpoint.glob("*zero_pp_rank_0*")) and list(checkpoint.glob("*zero_pp_rank_1*"))
    start, trained = load_weights(tiny_model_dir), load_weights(tmp_path / "hf")
    assert any(not (start[name] == trained[name]).all() for name in start)
    assert not no_processes_left(info["JobId"])


def ray_env(slurm: LocalSlurm, name: str) -> dict[str, str]:
    """The Ray cluster on free ports (another cluster may run on this machine), in ``name`` under the Slurm cluster's
    directory."""
    return {"CONFIG": "configs/tiny/grpo.yaml", "MASTER_PORT": str(free_port()), "RAY_PORT": str(free_port()),
            "RAY_TMPDIR": str(slurm.dir / name),
            "RAY_HEAD_ARGS": f"--ray-client-server-port={free_port()} --dashboard-agent-listen-port={free_port()}",
            "RAY_WORKER_ARGS": f"--dashboard-agent-listen-port={free_port()}"}


def test_ppo_ray_sbatch_runs_grpo_on_the_ray_cluster_it_starts(slurm, tmp_path, tiny_model_dir):
    """The script starts the Ray head on the first node and a worker on the second; GRPO attaches to it, its two
    generation actors land one per Ray node (STRICT_SPREAD), the run trains, and the script stops Ray at the end."""
    reward = tmp_path / "vowels.py"  # varies across random samples, so GRPO's group advantages are not all 0
    reward.write_text("def vowels(prompts, responses, labels):\n"
                      "    return [sum(c in 'aeiou' for c in r) / max(len(r), 1) for r in responses]\n")
    args = base_args(tmp_path, tiny_model_dir, data=PROMPTS, config=REPO / "configs" / "tiny" / "grpo.yaml")[3:] + [
        "--model.init_args.reward_functions", json.dumps([f"{reward}:vowels"]),
        "--data.init_args.batch_size", "2", "--model.init_args.n_samples_per_prompt", "2",
        "--model.init_args.max_new_tokens", "4", "--model.init_args.micro_batch_size", "4",
        "--model.init_args.kl_coef", "0", "--trainer.max_steps", "3", "--trainer.accelerator", "cpu",
        "--model.init_args.rollout.namespace", "test-slurm-grpo",
        "--model.init_args.rollout.generation", json.dumps({"count": 2, "num_cpus": 0.25,
                                                            "placement": "STRICT_SPREAD"})]
    env = ray_env(slurm, "ray-grpo")
    info, out = run_job(slurm, "ppo_ray.sbatch", args, env, tmp_path)
    started = re.search(r"\[ppo_ray.sbatch\] job \d+: Ray cluster at (\S+) with 2 nodes \(rlhf-n1 rlhf-n2\); "
                        r"trainer: 1 tasks on rlhf-n1", out)
    assert started and started[1].endswith(f":{env['RAY_PORT']}"), out[-6000:]
    assert f"Connecting to existing Ray cluster at address: {started[1]}" in out  # the trainer joined it
    assert "stopping the Ray cluster" in out
    assert metric_series(read_metrics(tmp_path), "train/policy_version")[-1] == 3
    assert all(math.isfinite(x) for x in metric_series(read_metrics(tmp_path), "train/loss"))
    start, trained = load_weights(tiny_model_dir), load_weights(tmp_path / "hf")
    assert any(not (start[name] == trained[name]).all() for name in start)
    # the actors ran in the script's cluster: their logs are in its RAY_TMPDIR
    logs = list((slurm.dir / "ray-grpo").glob("session_latest/logs/worker-*.out"))
    actors = [line for log in logs for line in log.read_text(errors="replace").splitlines() if ":actor_name:" in line]
    assert len([a for a in actors if "Generation" in a]) == 2, actors
    assert not no_processes_left(info["JobId"])  # Ray stopped with the job


def test_ppo_ray_sbatch_on_one_node_stops_ray_when_training_fails(slurm, tmp_path):
    """One node: the head alone (no workers). A trainer that fails (here: a bad option) fails the job, and the
    script's trap still stops Ray."""
    info, out = submit(slurm, "ppo_ray.sbatch", ["--trainer.max_steps", "not-a-number"], ray_env(slurm, "ray-fail"),
                       tmp_path, nodes=1)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", out[-4000:]
    assert "with 1 nodes (rlhf-n1)" in out and "not-a-number" in out and "stopping the Ray cluster" in out
    assert not no_processes_left(info["JobId"])
