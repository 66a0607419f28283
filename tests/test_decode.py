"""Faster decoding, same samples: the shared prompt prefill, generation with the trained module itself (the ``local``
rollout backend) and the fused AdamW default. Each test compares against the plain path on the real tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, base_args, run_cli

import rlhf_lightning.generation as generation
from rlhf_lightning.algorithms.base import default_optimizer
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.rollout.engine import Rollout, RolloutConfig
from rlhf_lightning.rollout.workers import GenerationWorker, PolicyGenerationWorker

PROMPTS = [[5, 9, 13, 17, 21, 25, 29], [6, 10], [7, 11, 15, 19]]  # unequal lengths: left padding is exercised
SAMPLING = {"max_new_tokens": 12, "top_p": 0.9, "top_k": 20, "eos_token_ids": [2], "pad_token_id": 0}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir))


def forward_rows(model: torch.nn.Module) -> tuple[list[tuple[int, int]], torch.utils.hooks.RemovableHandle]:
    """Record (rows, positions) of every forward call of ``model``."""
    calls: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("temperature, prompt_seeds", [(0.0, None), (1.0, None), (1.0, [3, 1, 4])])
def test_shared_prefill_samples_what_the_unshared_path_samples(model, monkeypatch, temperature, prompt_seeds):
    kwargs = {**SAMPLING, "n": 3, "temperature": temperature, "seed": 11, "prompt_seeds": prompt_seeds}
    calls, handle = forward_rows(model)
    shared = generation.generate_responses(model, PROMPTS, **kwargs)
    handle.remove()
    assert calls[0] == (len(PROMPTS), len(PROMPTS[0]) - 1)  # each prompt once, all but its last token
    assert calls[1] == (3 * len(PROMPTS), 1)  # then every row continues from the repeated cache
    monkeypatch.setattr(generation, "can_share_prefill", lambda *_: False)
    calls, handle = forward_rows(model)
    unshared = generation.generate_responses(model, PROMPTS, **kwargs)
    handle.remove()
    assert calls[0] == (3 * len(PROMPTS), len(PROMPTS[0]))  # the plain path: every row runs its whole prompt
    assert shared == unshared
    assert len({tuple(r) for r in shared}) > len(PROMPTS) or temperature == 0  # sampled rows really differ


def test_seeded_rows_do_not_depend_on_the_batch(model):
    """RowSeededSampler's contract survives the shared prefill: a prompt's samples are the same alone or batched."""
    kwargs = {**SAMPLING, "n": 2, "temperature": 1.0}
    batched = generation.generate_responses(model, PROMPTS, prompt_seeds=[3, 1, 4], **kwargs)
    alone = generation.generate_responses(model, PROMPTS[1:2], prompt_seeds=[1], **kwargs)
    assert batched[2:4] == alone


def test_policy_worker_generates_with_the_module_in_eval_mode_and_restores_it(tiny_model_dir):
    """The trained module (gradient checkpointing on, train mode) generates what a separate worker with the same
    weights generates, greedily; in eval mode with the KV cache (one new position per step), then back in train."""
    policy = load_causal_lm(str(tiny_model_dir), gradient_checkpointing=True).train()
    worker = PolicyGenerationWorker(lambda: policy)
    modes: list[bool] = []
    hook = policy.register_forward_pre_hook(lambda m, _a: modes.append(m.training))
    calls, handle = forward_rows(policy)
    greedy = {**SAMPLING, "n": 1, "temperature": 0.0}
    ours = worker.generate(PROMPTS, **greedy)
    hook.remove()
    handle.remove()
    assert policy.training and modes and not any(modes)
    assert all(positions == 1 for _, positions in calls[1:])  # the cache is used despite gradient checkpointing
    assert ours["responses"] == GenerationWorker(str(tiny_model_dir), device="cpu").generate(PROMPTS, **greedy)[
        "responses"]
    assert worker.model is policy and worker.load_weights(None, 5) == 5 and ours["version"] == 0


def test_shared_policy_rollout_has_no_generation_copy(tiny_model_dir):
    policy = load_causal_lm(str(tiny_model_dir))
    rollout = Rollout(RolloutConfig(), str(tiny_model_dir), None, [], {}, create=True, policy_module=lambda: policy)
    (worker,) = rollout.workers["generation"]
    assert rollout.shares_policy and isinstance(worker, PolicyGenerationWorker) and worker.model is policy
    rollout.push_weights(None, 3)  # a version bump, no weights copied
    assert rollout.generate(PROMPTS, n=1, temperature=0.0, **{k: v for k, v in SAMPLING.items()})[1] == [3]
    with pytest.raises(ConfigError, match="rollout.share_policy needs model.init_args.rollout.backend: local"):
        Rollout(RolloutConfig(backend="ray"), str(tiny_model_dir), None, [], {}, create=True,
                policy_module=lambda: policy)


def test_grpo_generates_with_its_own_module_unless_told_not_to(tmp_path, tiny_model_dir, monkeypatch):
    """By default the local backend loads no generation copy of the policy; ``share_policy: false`` loads one."""
    from rlhf_lightning.__main__ import main
    from rlhf_lightning.rollout import workers

    loaded: list[str] = []
    original = workers.ModelWorker.__init__
    monkeypatch.setattr(workers.ModelWorker, "__init__",
                        lambda self, *a, **kw: (loaded.append(type(self).__name__), original(self, *a, **kw))[1])
    prompts = REPO / "examples" / "data" / "prompts_tiny.jsonl"
    for share in ("null", "false"):
        loaded.clear()
        args = base_args(tmp_path / share, tiny_model_dir, data=prompts, config=REPO / "configs" / "tiny" / "grpo.yaml")
        cli = main(args + [
            "--model.init_args.reward_functions", json.dumps([f"{REPO}/examples/reward_fns.py:even_answer"]),
            "--data.init_args.batch_size", "2", "--model.init_args.n_samples_per_prompt", "2",
            "--model.init_args.max_new_tokens", "4", "--model.init_args.micro_batch_size", "4",
            "--model.init_args.kl_coef", "0", "--trainer.max_steps", "2",
            *(["--model.init_args.rollout.share_policy", share] if share != "null" else [])])
        assert cli.model.policy_version == 2  # both steps' rollouts passed the weight-version check
        assert loaded == ([] if share == "null" else ["GenerationWorker"])


def test_share_policy_true_on_ray_is_a_config_error(tmp_path, tiny_model_dir, capsys):
    prompts = REPO / "examples" / "data" / "prompts_tiny.jsonl"
    args = base_args(tmp_path, tiny_model_dir, data=prompts, config=REPO / "configs" / "tiny" / "grpo.yaml") + [
        "--model.init_args.reward_functions", json.dumps([f"{REPO}/examples/reward_fns.py:even_answer"]),
        "--model.init_args.rollout.backend", "ray", "--model.init_args.rollout.share_policy", "true"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 2
    assert "model.init_args.rollout.share_policy: true needs" in capsys.readouterr().err


def test_default_optimizer_is_fused_adamw():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = default_optimizer([param])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    param.grad = torch.full((3,), 0.5)
    reference = torch.optim.AdamW([reference_param := torch.nn.Parameter(torch.ones(3))], lr=1e-5, weight_decay=0.0)
    reference_param.grad = param.grad.clone()
    optimizer.step()
    reference.step()
    torch.testing.assert_close(param.detach(), reference_param.detach())  # the same AdamW update
