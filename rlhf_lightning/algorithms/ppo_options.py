"""The PPO family's option checks and reward sources, out of the module's ``__init__``: each bad value is one
:class:`~rlhf_lightning.errors.ConfigError` naming ``model.init_args.<option>``, raised when the config is parsed,
before any model loads."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rlhf_lightning import advantages as adv
from rlhf_lightning.algorithms.base import model_option, option_errors, require
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.rollout.rewards import RemoteReward, RewardFn, load_reward_fn, source_names

# (option, valid(value), requirement), cheapest first; checks across objects are in PPO.check_config.
RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("n_samples_per_prompt", lambda v: v >= 1, ">= 1"),
    ("max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("temperature", lambda v: v >= 0, ">= 0 (0 = greedy)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("top_k", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("remote_reward_timeout", lambda v: v > 0, "> 0 seconds"),
    ("reward_clip", lambda v: v is None or v > 0, "> 0, or null for no clipping"),
    ("kl_coef", lambda v: v >= 0, ">= 0"),
    ("kl_target", lambda v: v is None or v > 0, "> 0, or null for a fixed kl_coef"),
    ("kl_horizon", lambda v: v >= 1, ">= 1"),
    ("critic_learning_rate", lambda v: v is None or v > 0, "> 0, or null for the optimizer's"),
    ("gamma", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("lam", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("ppo_epochs", lambda v: v >= 1, ">= 1"),
    ("mini_batch_size", lambda v: v is None or v >= 1, ">= 1, or null for the whole rollout"),
    ("micro_batch_size", lambda v: v >= 1, ">= 1"),
    ("clip_low", lambda v: 0 < v < 1, "in (0, 1)"),
    ("clip_high", lambda v: v > 0, "> 0"),
    ("dual_clip", lambda v: v is None or v > 1, "> 1, or null for off"),
    ("value_clip", lambda v: v is None or v > 0, "> 0, or null for off"),
    ("value_loss_coef", lambda v: v >= 0, ">= 0"),
    ("importance_sampling_cap", lambda v: v is None or v > 0, "> 0, or null for untruncated weights"),
    ("max_grad_norm", lambda v: v is None or v > 0, "> 0, or null for off"),
)


def check_options(hp: Mapping[str, Any]) -> None:
    """Every range in :data:`RANGES`, then the group estimators' need for several samples per prompt."""
    for name, valid, requirement in RANGES:
        require(valid(hp[name]), name, hp[name], requirement)
    if hp["advantage_estimator"] in adv.GROUP_ESTIMATORS and hp["n_samples_per_prompt"] < 2:
        raise ConfigError(f"model.init_args.advantage_estimator={hp['advantage_estimator']} compares the samples of "
                          f"one prompt: set model.init_args.n_samples_per_prompt >= 2 (got "
                          f"{hp['n_samples_per_prompt']}).")


def reward_sources(hp: Mapping[str, Any]) -> tuple[list[tuple[str, RewardFn]], list[str]]:
    """The rule and remote rewards as ``(name, fn)`` (imported and checked now), and the names of all sources in
    order (reward models, functions, remote), for ``reward_weights`` and the per-source logs."""
    with option_errors(model_option("reward_functions"), OSError, ImportError, AttributeError, ValueError,
                       SyntaxError):
        functions = [(spec, load_reward_fn(spec)) for spec in hp["reward_functions"] or []]
    if hp["remote_reward_url"]:
        with option_errors(model_option("remote_reward_url"), ValueError):
            functions.append((hp["remote_reward_url"], RemoteReward(
                hp["remote_reward_url"], hp["remote_reward_timeout"], hp["remote_reward_retries"],
                hp["remote_reward_batch_size"], hp["remote_reward_max_concurrency"])))
    sources = len(hp["reward_models"] or []) + len(functions)
    if sources == 0:
        raise ConfigError("PPO needs a reward: set model.init_args.reward_models, model.init_args.reward_functions "
                          "or model.init_args.remote_reward_url.")
    weights = hp["reward_weights"]
    if weights is not None and len(weights) != sources:
        raise ConfigError(f"model.init_args.reward_weights has {len(weights)} entries for {sources} reward "
                          f"sources: give one weight per source, in the order reward_models, reward_functions, "
                          f"remote_reward_url.")
    return functions, source_names(hp["reward_models"] or [], hp["reward_functions"] or [], hp["remote_reward_url"])
