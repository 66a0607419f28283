"""Exact resume after a crash: ``kill -9`` of a CLI run in a later epoch, then ``fit --ckpt_path last``.

The resumed run must log what an uninterrupted run logs for every step after the checkpoint: the same loss
(data position and sampler epoch, weights, optimizer, scheduler), the same draws of the global RNG (RNG state in
the checkpoint) and, for GRPO, the same rewards (prompts, policy version, sampling seed, KL controller).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SFT_DATA, base_args, child_env, run_cli, write_jsonl

CONFIGS = REPO / "configs" / "tiny"
PROMPTS = REPO / "examples" / "data" / "prompts_tiny.jsonl"
HELPERS_PATH = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
# 4 batches per epoch, a checkpoint every 5 steps: the checkpoint at step 5 is in epoch 1 (second batch), the
# crash at step 7 (fourth batch of epoch 1), and the resumed run finishes in epoch 2.
CHECKPOINT_STEP, KILL_STEP, MAX_STEPS = 5, 7, 10


def run_args(run_dir, config, data, model, version: int, *extra: str, callbacks: tuple[dict, ...] = ()) -> list[str]:
    """CLI args of one run (``version``: its own CSV log folder) with the probe callbacks added."""
    args = base_args(run_dir, model, data=data, config=config)
    args[args.index("--trainer.logger.init_args.version") + 1] = str(version)
    index = args.index("--trainer.callbacks") + 1
    args[index] = json.dumps(json.loads(args[index]) + [{"class_path": "resume_helpers.LogRandom"}, *callbacks])
    return args + ["--trainer.max_steps", str(MAX_STEPS), "--trainer.max_epochs", "-1", *extra]


def run_killed(args: list[str], step: int) -> None:
    """Run the CLI in a child process that SIGKILLs itself at ``step``."""
    index = args.index("--trainer.callbacks") + 1
    args = list(args)
    args[index] = json.dumps(json.loads(args[index]) + [
        {"class_path": "resume_helpers.KillAtStep", "init_args": {"step": step}}])
    proc = subprocess.run([sys.executable, "-m", "rlhf_lightning", *args], cwd=REPO, env=child_env(HELPERS_PATH),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"expected a SIGKILL at step {step}:\n{proc.stderr[-4000:]}"


def logged(run_dir, version: int, key: str) -> dict[int, float]:
    """``key`` per step from the CSV log of run ``version``."""
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def assert_crash_resume_matches(tmp_path, config, data, model, keys: tuple[str, ...], *extra: str,
                                logged_steps: range = range(CHECKPOINT_STEP, MAX_STEPS)) -> None:
    """Uninterrupted run vs. a run killed at ``KILL_STEP`` and resumed from the checkpoint at ``CHECKPOINT_STEP``:
    the resumed run logs ``logged_steps``, each as the uninterrupted run did."""
    reference, crashed = tmp_path / "uninterrupted", tmp_path / "crashed"
    run_cli(run_args(reference, config, data, model, 0, *extra))
    run_killed(run_args(crashed, config, data, model, 0, *extra), KILL_STEP)
    assert (crashed / "checkpoints" / "last.ckpt").exists()
    run_cli(run_args(crashed, config, data, model, 1, *extra, "--ckpt_path", "last"))
    for key in keys:
        expected, resumed = logged(reference, 0, key), logged(crashed, 1, key)
        assert sorted(resumed) == list(logged_steps), (key, sorted(resumed))
        torch.testing.assert_close(torch.tensor([resumed[s] for s in sorted(resumed)], dtype=torch.float64),
                                   torch.tensor([expected[s] for s in sorted(resumed)], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


SMALL_SFT = ("--data.init_args.max_samples", "32", "--data.init_args.val_split", "0", "--data.init_args.batch_size",
             "8", "--model.init_args.lr_scheduler", "constant", "--model.init_args.warmup_steps", "0")


@pytest.mark.parametrize("strategy", ["deepspeed", "auto"])
def test_sft_crash_in_a_later_epoch_resumes_exactly(tmp_path, tiny_model_dir, strategy):
    """Before the fix, the DeepSpeed run resumed in epoch 1 trained on epoch 0's batch order, and neither strategy
    restored the RNG."""
    extra = SMALL_SFT + (("--trainer.strategy", "auto") if strategy == "auto" else ())
    assert_crash_resume_matches(tmp_path, CONFIGS / "sft.yaml", SFT_DATA, tiny_model_dir,
                                ("train/loss", "probe/rand"), *extra)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rows = [{"prompt": f"What is {i} + {i % 7}?", "chosen": str(i + i % 7), "rejected": "no idea"} for i in range(32)]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


@pytest.mark.parametrize("precompute", ["true", "false"])
def test_dpo_crash_in_a_later_epoch_resumes_exactly(tmp_path, tiny_model_dir, pairs, precompute):
    assert_crash_resume_matches(tmp_path, CONFIGS / "dpo.yaml", pairs, tiny_model_dir,
                                ("train/loss", "train/margin", "probe/rand"),
                                "--model.init_args.precompute_reference", precompute, "--data.init_args.val_split",
                                "0", "--data.init_args.batch_size", "8", "--model.init_args.lr_scheduler", "constant",
                                "--model.init_args.warmup_steps", "0")


def test_grpo_crash_in_a_later_epoch_resumes_exactly(tmp_path, tiny_model_dir):
    """Same prompts, samples (seeded by policy version), rewards and losses after the checkpoint."""
    extra = ("--model.init_args.reward_functions", '["resume_helpers:prompt_and_length"]', "--data.init_args.path",
             str(PROMPTS), "--data.init_args.max_samples", "16", "--data.init_args.batch_size", "4",
             "--model.init_args.n_samples_per_prompt", "4", "--model.init_args.max_new_tokens", "4",
             "--model.init_args.micro_batch_size", "16",
             "--model.init_args.temperature", "1.0", "--model.init_args.kl_target", "0.1",
             "--model.init_args.lr_scheduler", "constant", "--model.init_args.warmup_steps", "0")
    assert_crash_resume_matches(tmp_path, CONFIGS / "grpo.yaml", PROMPTS, tiny_model_dir,
                                ("train/reward", "train/kl_coef", "train/policy_loss", "probe/rand"), *extra)


def test_async_grpo_crash_in_a_later_epoch_resumes_exactly(tmp_path, tiny_model_dir):
    """Asynchronous rollouts: the checkpoint keeps the batch sampled for the next step (with its responses and the
    sampler's log-probs), so the resumed run trains on exactly what the uninterrupted run trained on. (The first
    batch only starts sampling, so the logger's step runs one ahead of the optimizer steps.)"""
    extra = ("--model.init_args.reward_functions", '["resume_helpers:prompt_and_length"]', "--data.init_args.path",
             str(PROMPTS), "--data.init_args.max_samples", "16", "--data.init_args.batch_size", "4",
             "--model.init_args.n_samples_per_prompt", "4", "--model.init_args.max_new_tokens", "4",
             "--model.init_args.micro_batch_size", "16", "--model.init_args.rollout.asynchronous", "true",
             "--model.init_args.temperature", "1.0", "--model.init_args.kl_target", "0.1",
             "--model.init_args.lr_scheduler", "constant", "--model.init_args.warmup_steps", "0")
    assert_crash_resume_matches(tmp_path, CONFIGS / "grpo.yaml", PROMPTS, tiny_model_dir,
                                ("train/reward", "train/kl_coef", "train/policy_loss", "train/is_weight_mean",
                                 "train/policy_lag", "probe/rand"), *extra,
                                logged_steps=range(CHECKPOINT_STEP + 1, MAX_STEPS + 1))
