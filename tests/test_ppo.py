"""PPO family: rule rewards, rollout engine, GRPO and PPO (with critic) learning on the tiny model."""

import json
import math

import pytest
import torch
from conftest import REPO, SFT_DATA, base_args, load_weights, metric_series, read_metrics, run_cli

from rlhf_lightning.rollout.engine import Rollout, RolloutConfig, WorkerGroup
from rlhf_lightning.rollout.rewards import checked_scores, load_reward_fn

PROMPTS = REPO / "examples" / "data" / "prompts_tiny.jsonl"
GRPO_CONFIG = REPO / "configs" / "tiny" / "grpo.yaml"
EVEN = f"{REPO}/examples/reward_fns.py:even_answer"


@pytest.fixture(scope="module")
def sft_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model after a short SFT: it answers with numbers, so number-shaped rewards are learnable."""
    run_dir = tmp_path_factory.mktemp("sft-for-ppo")
    run_cli(base_args(run_dir, tiny_model_dir, data=SFT_DATA) + ["--trainer.max_epochs", "2"])
    return run_dir / "hf"


def rl_args(run_dir, model, *extra: str) -> list[str]:
    args = base_args(run_dir, model, data=PROMPTS, config=GRPO_CONFIG)
    callbacks = json.loads(args[args.index("--trainer.callbacks") + 1])
    callbacks.append({"class_path": "rlhf_lightning.callbacks.SampleTable", "init_args": {"every_n_steps": 5}})
    args[args.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
    return args + ["--model.init_args.reward_functions", json.dumps([EVEN]), "--data.init_args.batch_size", "8",
                   "--model.init_args.optimizer.init_args.lr", "2e-3", *extra]


def assert_reward_rises(run_dir, start_model):
    rows = read_metrics(run_dir)
    rewards = metric_series(rows, "train/reward")
    assert all(math.isfinite(r) for r in rewards)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert metric_series(rows, "train/policy_version")[-1] == len(rewards)  # one policy update per step
    for key in ("time/generate_s", "time/score_s", "time/train_s", "train/samples_per_sec", "train/kl",
                "train/clip_frac", "train/response_length"):
        assert metric_series(rows, key), key
    assert (run_dir / "csv" / "version_0" / "samples.csv").read_text().count("\n") > 8
    before, after = load_weights(start_model), load_weights(run_dir / "hf")
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    return rows


def test_grpo_learns_rule_reward(tmp_path, sft_model_dir):
    run_dir = tmp_path / "grpo"
    run_cli(rl_args(run_dir, sft_model_dir, "--trainer.max_steps", "12"))
    assert_reward_rises(run_dir, sft_model_dir)


def test_ppo_with_critic_learns_rule_reward(tmp_path, sft_model_dir):
    run_dir = tmp_path / "ppo"
    run_cli(rl_args(run_dir, sft_model_dir, "--trainer.max_steps", "12", "--model.init_args.advantage_estimator", "gae",
                    "--model.init_args.kl_in_reward", "true", "--model.init_args.critic_learning_rate", "5e-3"))
    rows = assert_reward_rises(run_dir, sft_model_dir)
    assert metric_series(rows, "train/value_loss") and metric_series(rows, "train/explained_variance")


# ------------------------------------------------------------------------------------------- reward functions
def test_reward_function_errors_name_the_function(tmp_path):
    fn = load_reward_fn(EVEN)
    assert checked_scores(fn, "even", ["p", "p"], ["12", "13"], [None, None]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="'short' returned 1 scores for 2 responses"):
        checked_scores(lambda p, r, lab: [1.0], "short", ["a", "b"], ["x", "y"], [None, None])
    with pytest.raises(ValueError, match="'nan' returned NaN/inf for 1 responses"):
        checked_scores(lambda p, r, lab: [1.0, float("nan")], "nan", ["a", "b"], ["x", "y"], [None, None])
    with pytest.raises(TypeError, match="'words' must return a list of numbers"):
        checked_scores(lambda p, r, lab: ["good", "bad"], "words", ["a", "b"], ["x", "y"], [None, None])
    with pytest.raises(ValueError, match="must look like"):
        load_reward_fn("no_colon")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_reward_fn(str(tmp_path / "missing.py") + ":fn")
    with pytest.raises(AttributeError, match="no callable 'nope'"):
        load_reward_fn(f"{REPO}/examples/reward_fns.py:nope")


def test_ppo_without_reward_or_with_bad_group_size_is_rejected():
    from rlhf_lightning.algorithms import PPO

    with pytest.raises(ValueError, match="PPO needs a reward"):
        PPO(model="tiny-llama")
    with pytest.raises(ValueError, match="n_samples_per_prompt >= 2"):
        PPO(model="tiny-llama", reward_functions=[EVEN], advantage_estimator="grpo", n_samples_per_prompt=1)


# -------------------------------------------------------------------------------------------------- rollout
def test_local_rollout_splits_prompts_keeps_order_and_syncs_weights(sft_model_dir, tiny_model_dir):
    prompts = [[1, 4, 949, 505, 226, 22 + i, 36, 2, 5] for i in range(5)]
    sampling = {"n": 2, "max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "eos_token_ids": [2],
                "pad_token_id": 0}
    one = Rollout(RolloutConfig(), str(sft_model_dir), None, [], {}, create=True)
    three = Rollout(RolloutConfig(generation=WorkerGroup(count=3)), str(sft_model_dir), None, [], {}, create=True)
    a, versions_one = one.generate(prompts, **sampling)
    b, versions_three = three.generate(prompts, **sampling)
    assert a == b and len(a) == 10 and versions_one == [0] and versions_three == [0, 0, 0]
    other = load_weights(tiny_model_dir)  # different weights: greedy outputs must change after the push
    one.push_weights(other, version=1)
    c, versions = one.generate(prompts, **sampling)
    assert versions == [1] and c != a


# ------------------------------------------------------------------------------------------------------ ray
def test_ray_rollout_actors_sync_weights(sft_model_dir, tiny_model_dir, monkeypatch):
    """Separate Ray actors: greedy outputs change once new weights are pushed, and the version is checked."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = RolloutConfig(backend="ray", namespace="test-sync", generation=WorkerGroup(count=2, num_cpus=0.5),
                           reference=WorkerGroup(num_cpus=0.5))
    rollout = Rollout(config, str(sft_model_dir), str(sft_model_dir), [], {}, create=True)
    try:
        assert ray.get_actor("test-sync-generation-1", namespace="test-sync") is not None
        prompts = [[1, 4, 949, 505, 226, 22 + i, 36, 2, 5] for i in range(3)]
        sampling = {"n": 2, "max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "eos_token_ids": [2],
                    "pad_token_id": 0}
        before, versions = rollout.generate(prompts, **sampling)
        assert versions == [0, 0] and len(before) == 6
        rollout.push_weights(load_weights(tiny_model_dir), version=1)
        after, versions = rollout.generate(prompts, **sampling)
        assert versions == [1, 1] and after != before
        ids = torch.tensor([prompts[0] + before[0]])
        labels = torch.tensor([[-100] * len(prompts[0]) + before[0]])
        handles = rollout.score_async(ids, torch.ones_like(ids), labels, normalize_rewards=True)
        (ref_logps,) = rollout.wait(list(handles.values()))
        assert ref_logps.shape == ids.shape and (ref_logps <= 0).all()
    finally:
        rollout.shutdown()
        ray.shutdown()


def test_grpo_two_ranks_on_ray(tmp_path, sft_model_dir):
    """Two trainer ranks share Ray generation/reference actors; each rank gets different prompts."""
    from conftest import run_cli_subprocess

    run_dir = tmp_path / "grpo-ray"
    run_cli_subprocess(rl_args(run_dir, sft_model_dir, "--trainer.max_steps", "10", "--trainer.devices", "2",
                               "--data.init_args.batch_size", "4", "--model.init_args.rollout.backend", "ray",
                               "--model.init_args.rollout.namespace", "test-grpo-ray",
                               "--model.init_args.rollout.generation.num_cpus", "0.5",
                               "--model.init_args.rollout.reference.num_cpus", "0.5"))
    assert_reward_rises(run_dir, sft_model_dir)
