"""Asynchronous (one-step-off) rollouts: the sampler's log-probs, the threaded local backend, the schedule (one
version of lag, never more), learning on the local and Ray backends, and the configuration checks."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from conftest import load_weights, metric_series, read_metrics, run_cli
from test_ppo import assert_reward_rises, rl_args

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.generation import response_log_probs, sample_responses
from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.rollout.backends import LocalBackend
from rlhf_lightning.rollout.config import RolloutConfig, WorkerGroup

PROMPTS = [[5, 17, 23, 9], [31, 8], [12, 40, 41, 7, 3]]


@pytest.mark.parametrize("sampling", [{"temperature": 0.7, "top_p": 0.9, "top_k": 0},
                                      {"temperature": 1.3, "top_p": 1.0, "top_k": 20},
                                      {"temperature": 0.0, "top_p": 1.0, "top_k": 0}])
def test_sampler_log_probs_are_the_models_log_probs_of_its_samples(tiny_model_dir, sampling):
    """What the sampler records while it draws (the inverse-CDF sampler; greedy decoding takes the forward-pass path)
    is log softmax(logits / T) of the drawn token, untruncated: the trainer's log-prob of the same token, computed
    here by a separate forward pass over the finished sequences."""
    model = load_causal_lm(str(tiny_model_dir)).eval()
    responses, logps = sample_responses(model, PROMPTS, n=2, max_new_tokens=8, eos_token_ids=[2], pad_token_id=0,
                                        seed=3, with_log_probs=True, **sampling)
    assert [len(lp) for lp in logps] == [len(r) for r in responses]
    prompts = [p for p in PROMPTS for _ in range(2)]
    temperature = sampling["temperature"] or 1.0
    expected = response_log_probs(model, prompts, responses, temperature)
    for got, want in zip(logps, expected, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-5, rtol=1e-5)
    if sampling["top_p"] < 1.0 or sampling["top_k"]:  # truncation is not in the log-probs: they are not renormalised
        assert all(v < 0 for lp in logps for v in lp)
    same, _ = sample_responses(model, PROMPTS, n=2, max_new_tokens=8, eos_token_ids=[2], pad_token_id=0, seed=3,
                               **sampling)
    assert same == responses  # recording changes nothing that is sampled


class SlowWorker:
    """A worker whose calls take a while: records on which thread and in which order they ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def work(self, tag: str, seconds: float) -> str:
        time.sleep(seconds)
        self.calls.append((tag, threading.get_ident()))
        return tag

    def fail(self) -> None:
        raise ValueError("worker failed")


def test_asynchronous_local_backend_runs_each_worker_on_its_own_thread_in_order():
    backend = LocalBackend(RolloutConfig(asynchronous=True))
    a, b = (backend.make(g, 0, lambda _path: SlowWorker(), "", WorkerGroup(), {}, True) for g in ("gen", "ref"))
    started = time.perf_counter()
    handles = [backend.call(a, "work", "a1", 0.3), backend.call(a, "work", "a2", 0.0),
               backend.call(b, "work", "b", 0.3)]
    launched = time.perf_counter() - started
    assert backend.wait(handles) == ["a1", "a2", "b"]
    took = time.perf_counter() - started
    assert launched < 0.1 and took < 0.55  # calls return at once; the two workers' calls overlap (0.3 s, not 0.6)
    assert [tag for tag, _ in a.calls] == ["a1", "a2"]  # one worker's calls run in the order they were made
    assert a.calls[0][1] != threading.get_ident() and a.calls[0][1] != b.calls[0][1]
    with pytest.raises(ValueError, match="worker failed"):
        backend.wait([backend.call(a, "fail")])
    backend.shutdown([a, b])
    synchronous = LocalBackend(RolloutConfig())
    worker = synchronous.make("gen", 0, lambda _path: SlowWorker(), "", WorkerGroup(), {}, True)
    synchronous.wait([synchronous.call(worker, "work", "x", 0.0)])
    assert worker.calls[0][1] == threading.get_ident()  # without asynchronous: in the caller's thread


def test_share_policy_true_with_asynchronous_or_a_bad_cap_is_refused():
    from rlhf_lightning.algorithms import PPO

    with pytest.raises(ConfigError, match="share_policy.*asynchronous"):
        RolloutConfig(share_policy=True, asynchronous=True)
    with pytest.raises(ConfigError, match="importance_sampling_cap"):
        PPO(model="tiny-llama", reward_functions=["rlhf_lightning.tasks.reverse:exact_match"],
            importance_sampling_cap=0.0)


def async_args(run_dir, model, *extra: str) -> list[str]:
    return rl_args(run_dir, model, "--model.init_args.rollout.asynchronous", "true", *extra)


def test_async_grpo_learns_with_one_version_of_lag(tmp_path, sft_model_dir):
    """Local backend, generation on its own thread: every update but the first trains on responses of the policy
    one version older (never more), weighted by the truncated importance ratio; the reward still rises."""
    run_dir = tmp_path / "async-grpo"
    run_cli(async_args(run_dir, sft_model_dir, "--trainer.max_steps", "12", "--model.init_args.kl_coef", "0"))
    rows = assert_reward_rises(run_dir, sft_model_dir)
    assert metric_series(rows, "train/policy_lag") == [0.0] + [1.0] * 11
    weights = metric_series(rows, "train/is_weight_mean")
    assert weights[0] == pytest.approx(1.0, abs=1e-4)  # the sampler was the updated policy: ratio 1
    assert all(0 < w <= 2.0 for w in weights) and any(abs(w - 1) > 1e-3 for w in weights[1:])
    assert all(0 <= f < 0.5 for f in metric_series(rows, "train/is_truncated_frac"))


def test_async_ppo_with_reference_on_ray(tmp_path, sft_model_dir, monkeypatch):
    """Ray actors: the generation actor samples the next batch while the trainer updates; with a reference worker
    (KL in the reward, so the old log-probs get their own pass) and a critic. Lags, weights, finite losses."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_dir = tmp_path / "async-ppo-ray"
    run_cli(async_args(run_dir, sft_model_dir, "--trainer.max_steps", "4", "--model.init_args.advantage_estimator",
                       "gae", "--model.init_args.kl_in_reward", "true", "--model.init_args.rollout.backend", "ray",
                       "--model.init_args.rollout.namespace", "test-async"))
    rows = read_metrics(run_dir)
    assert metric_series(rows, "train/policy_lag") == [0.0, 1.0, 1.0, 1.0]
    assert metric_series(rows, "train/policy_version") == [1.0, 2.0, 3.0, 4.0]
    for key in ("train/policy_loss", "train/value_loss", "train/kl", "train/is_weight_mean"):
        assert all(math.isfinite(v) for v in metric_series(rows, key)), key
    assert metric_series(rows, "train/kl")[0] == pytest.approx(0.0, abs=1e-4)  # reference = sampler = policy
    before, after = load_weights(sft_model_dir), load_weights(run_dir / "hf")
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_async_grpo_two_ranks_on_ray_checkpoints_each_ranks_next_batch(tmp_path, sft_model_dir):
    """Two trainer ranks (ZeRO-2) share the Ray actors, each sampling its own prompts one step ahead; the checkpoint
    (saved at step 5) holds both ranks' next batches, with their responses."""
    from conftest import run_cli_subprocess

    run_dir = tmp_path / "async-grpo-2ranks"
    run_cli_subprocess(async_args(run_dir, sft_model_dir, "--trainer.max_steps", "6", "--trainer.devices", "2",
                                  "--data.init_args.batch_size", "4", "--model.init_args.micro_batch_size", "16",
                                  "--model.init_args.rollout.backend", "ray",
                                  "--model.init_args.rollout.namespace", "test-async-2ranks"))
    rows = read_metrics(run_dir)
    assert metric_series(rows, "train/policy_lag") == [0.0] + [1.0] * 5
    assert all(math.isfinite(v) for v in metric_series(rows, "train/policy_loss"))
    states = next((run_dir / "checkpoints").glob("*step=5*/**/*model_states.pt"))  # DeepSpeed: rank 0's file
    pending = torch.load(states, map_location="cpu", weights_only=False)["ppo"]["pending_rollouts"]
    assert len(pending) == 2 and all(len(p["generated"]["responses"]) == 4 * 4 for p in pending)
    assert pending[0]["batch"]["prompt_ids"] != pending[1]["batch"]["prompt_ids"]  # each rank its own prompts


def test_resuming_an_asynchronous_checkpoint_synchronously_warns_that_its_next_batch_is_dropped():
    from rlhf_lightning.algorithms import PPO

    ppo = PPO(model="tiny-llama", reward_functions=["rlhf_lightning.tasks.reverse:exact_match"])
    state = {"ppo": {"policy_version": 3, "kl": {"value": 0.05}, "rollouts_started": 4,
                     "pending_rollouts": [{"batch": {"prompt_ids": [[1, 2]]}, "seed": 7, "version": 3,
                                           "generated": None}]}}
    with pytest.warns(UserWarning, match="rollout.asynchronous: true to keep it"):
        ppo.on_load_checkpoint(state)
    assert ppo.policy_version == 3 and ppo.sampled is None
