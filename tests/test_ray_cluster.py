"""Ray cluster mode on one machine: a 2-node cluster (``ray.cluster_utils.Cluster``, each node with its own custom
resource), rollout actors placed as the config says, and GRPO training against that cluster through the CLI."""

import json
import sys

import pytest
from conftest import REPO, base_args, load_weights, metric_series, read_metrics, run_child

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.rollout.config import RolloutConfig, WorkerGroup
from rlhf_lightning.rollout.engine import Rollout

PROMPTS = REPO / "examples" / "data" / "prompts_tiny.jsonl"


@pytest.fixture(scope="module")
def two_nodes():
    """Two Ray nodes of 1 CPU each: the head has resource ``node_a``, the worker node ``node_b``."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1},
                                                             "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def node_with(resource: str) -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


def test_actors_land_where_the_config_places_them(two_nodes, tiny_model_dir):
    config = RolloutConfig(
        backend="ray", ray_address=two_nodes.address, namespace="test-placement", startup_timeout=120,
        generation=WorkerGroup(count=2, num_cpus=0.25, placement="STRICT_SPREAD"),
        reference=WorkerGroup(num_cpus=0.25, resources={"node_b": 0.1}))
    rollout = Rollout(config, str(tiny_model_dir), str(tiny_model_dir), [], {"device": "cpu"}, create=True)
    try:
        generation = rollout.wait([rollout._call(w, "node_id") for w in rollout.workers["generation"]])
        (reference,) = rollout.wait([rollout._call(rollout.workers["reference"][0], "node_id")])
        assert set(generation) == {node_with("node_a"), node_with("node_b")}  # one per node
        assert reference == node_with("node_b")
    finally:
        rollout.shutdown()


def test_a_placement_the_cluster_cannot_satisfy_names_the_option(two_nodes, tiny_model_dir):
    config = RolloutConfig(backend="ray", ray_address=two_nodes.address, namespace="test-placement-bad",
                           startup_timeout=5, generation=WorkerGroup(count=3, num_cpus=0.1, placement="STRICT_SPREAD"))
    with pytest.raises(ConfigError, match=r"rollout.generation.placement = STRICT_SPREAD .* 2 nodes"):
        Rollout(config, str(tiny_model_dir), None, [], {"device": "cpu"}, create=True)


def test_grpo_trains_on_the_two_node_cluster(two_nodes, tmp_path, tiny_model_dir):
    """The CLI joins the cluster by address; the generation workers spread over both nodes; the run trains."""
    reward = tmp_path / "vowels.py"  # varies across random samples, so GRPO's group advantages are not all 0
    reward.write_text("def vowels(prompts, responses, labels):\n"
                      "    return [sum(c in 'aeiou' for c in r) / max(len(r), 1) for r in responses]\n")
    args = base_args(tmp_path, tiny_model_dir, data=PROMPTS, config=REPO / "configs" / "tiny" / "grpo.yaml") + [
        "--model.init_args.reward_functions", json.dumps([f"{reward}:vowels"]),
        "--data.init_args.batch_size", "2", "--model.init_args.n_samples_per_prompt", "2",
        "--model.init_args.max_new_tokens", "4", "--model.init_args.micro_batch_size", "4",
        "--model.init_args.kl_coef", "0", "--trainer.max_steps", "3",
        "--model.init_args.rollout.backend", "ray", "--model.init_args.rollout.ray_address", two_nodes.address,
        "--model.init_args.rollout.namespace", "test-cluster-grpo",
        "--model.init_args.rollout.generation", json.dumps({"count": 2, "num_cpus": 0.25,
                                                            "placement": "STRICT_SPREAD"})]
    run_child([sys.executable, "-m", "rlhf_lightning", *args], timeout=600)
    assert metric_series(read_metrics(tmp_path), "train/policy_version")[-1] == 3
    start, trained = load_weights(tiny_model_dir), load_weights(tmp_path / "hf")
    assert any(not (start[name] == trained[name]).all() for name in start)  # the policy was updated
