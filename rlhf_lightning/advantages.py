"""Rewards, KL penalties and advantage estimators for PPO, GRPO, RLOO and REINFORCE++ as small pure functions.

Shapes: B batch of sequences (rollouts), T response length. ``mask`` (B, T) is 1 on response tokens and 0 on the
padding after EOS; rows are right-padded (``1…1 0…0``). Values at masked positions never influence any result
(they may hold garbage, even ``inf``): inputs are selected with ``torch.where`` rather than multiplied by the mask,
and outputs are 0 there. Nothing here tracks gradients on purpose: callers pass detached tensors (rollout data).
Tests in ``tests/test_advantages.py`` check every function against its formula.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from rlhf_lightning.losses import masked_mean

KLEstimator = Literal["k1", "k2", "k3"]


def _zero_masked(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values`` with masked positions set to 0 (``where``, so ``inf``/``nan`` garbage cannot leak as ``0·inf``)."""
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``values`` (any shape, usually (B, T)) over the elements where ``mask`` is set.

    ``(x - μ) / sqrt(σ² + eps)`` with μ and the population variance σ² (``unbiased=False``) taken over the valid
    elements only, as TRL's ``masked_whiten`` and OpenRLHF's advantage normalisation do. With
    ``shift_mean=False`` the values are only scaled, ``x / sqrt(σ² + eps)`` (σ² still about the mean), so the sign
    and the mean's direction are kept (used for rewards). Masked positions are 0 in the output.
    """
    valid = mask.bool()
    x = _zero_masked(values, valid)
    mean = masked_mean(x, valid)
    var = masked_mean(_zero_masked((x - mean) ** 2, valid), valid)
    scaled = (x - mean if shift_mean else x) * torch.rsqrt(var + eps)
    return _zero_masked(scaled, valid)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from sampled-token log-probs (B, T) -> (B, T).

    Schulman, "Approximating KL Divergence" (2020), with ``log r = log π_ref - log π`` (tokens sampled from π):

    - ``k1 = -log r = log π - log π_ref``: unbiased, can be negative (InstructGPT's per-token penalty);
    - ``k2 = ½ (log r)²``: biased, low variance, always >= 0;
    - ``k3 = (r - 1) - log r``: unbiased, always >= 0 (computed as ``expm1(log r) - log r``, clamped at 0 against
      rounding, so tiny ``log r`` keeps its precision).

    Elementwise: masked positions give garbage here and are dropped by the consumers (:func:`token_rewards`).
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return (torch.expm1(log_r) - log_r).clamp(min=0)
    raise ValueError(f"Unknown KL estimator '{estimator}': use k1, k2 or k3.")


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last set position of each row of ``mask`` (B, T) -> (B,) long; -1 for rows with none."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(-1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): ``-kl_coef · kl_t`` on every response token, plus the sequence score on the last one.

    The KL-shaped reward of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") and Ouyang et
    al. 2022 (InstructGPT): ``r_t = -β KL_t + [t = last] · score``.

    Args:
        scores: (B,) sequence-level rewards (reward model / verifier).
        kl: (B, T) per-token KL estimates, see :func:`kl_penalty`.
        mask: (B, T) response mask; the score goes on each row's last set position (rows without any valid token
            get no reward at all).
        kl_coef: β.
    """
    valid = mask.bool()
    rewards = _zero_masked(-kl_coef * kl, valid)
    last = last_valid_index(valid)
    at_last = (torch.arange(kl.shape[-1], device=kl.device) == last.unsqueeze(-1)) & valid
    return rewards + _zero_masked(scores.to(rewards.dtype).unsqueeze(-1).expand_as(rewards), at_last)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE").

    ``δ_t = r_t + γ V_{t+1} - V_t`` with ``V`` beyond the last valid token taken as 0 (the episode ends at EOS),
    ``A_t = δ_t + γλ A_{t+1}``; ``returns = A + V`` (the critic's regression target). All inputs (B, T); returns
    ``(advantages, returns)``, both (B, T) and 0 where ``mask == 0``. A masked position inside a row acts as the
    end of the episode for the tokens before it (rows are expected to be right-padded).
    """
    valid = mask.bool()
    rewards, values = _zero_masked(rewards, valid), _zero_masked(values.to(rewards.dtype), valid)
    advantages = torch.zeros_like(rewards)
    next_value = next_adv = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = _zero_masked(delta + gamma * lam * next_adv, valid[:, t])
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, _zero_masked(advantages + values, valid)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go ``G_t = Σ_k γ^k r_{t+k}`` over the valid tokens (B, T) -> (B, T); 0 where ``mask == 0``.

    The Monte-Carlo return REINFORCE uses (Williams 1992); REINFORCE++ (Hu 2025) applies it to :func:`token_rewards`.
    """
    valid = mask.bool()
    rewards = _zero_masked(rewards, valid)
    returns = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[-1])):
        running = _zero_masked(rewards[:, t] + gamma * running, valid[:, t])
        returns[:, t] = running
    return returns


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``scores`` (B,) as (B / group_size, group_size): consecutive samples of the same prompt."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size != 0:
        raise ValueError(f"batch of {scores.numel()} scores is not divisible into groups of group_size={group_size}")
    return scores.view(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (B,) -> (B,), one per sampled sequence.

    ``scores`` hold consecutive groups of ``group_size`` samples of the same prompt.

    - ``normalize_std=True``: GRPO (Shao et al. 2024, "DeepSeekMath"), ``A = (r - mean_g) / (std_g + eps)`` with
      the *unbiased* sample std (``torch.std`` default, divisor G - 1), as the GRPO reference code and TRL's
      ``GRPOTrainer`` compute it; needs ``group_size >= 2``.
    - ``normalize_std=False``: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"), ``A = r - mean_g``.

    Broadcast to (B, T) over the response tokens before :func:`rlhf_lightning.losses.policy_loss`.
    """
    if normalize_std and group_size < 2:
        raise ValueError(f"GRPO's std normalisation needs group_size >= 2 (unbiased std), got {group_size}")
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if normalize_std:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (B,) -> (B,): ``A_i = r_i - mean_{j≠i} r_j`` within each group.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE-Style Optimization for Learning from Human Feedback
    in LLMs" (Kool et al. 2019's baseline). Equals ``G/(G-1) · (r_i - mean_g)``; needs ``group_size >= 2``.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    groups = _groups(scores, group_size)
    baseline = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def reinforce_pp_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                            gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ advantages (B, T) (Hu 2025, arXiv 2501.03262).

    :func:`token_rewards` (score on the last token, ``-β KL`` on every token), their return-to-go
    (:func:`discounted_returns`), then whitened over *all* valid tokens of the batch (global batch
    normalisation, :func:`masked_whiten`). ``scores`` (B,), ``kl`` and ``mask`` (B, T).
    """
    returns = discounted_returns(token_rewards(scores, kl, mask, kl_coef), mask, gamma)
    return masked_whiten(returns, mask)


def reinforce_baseline_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                                  group_size: int, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++-baseline advantages (B, T), as OpenRLHF's ``reinforce_baseline`` estimator (Hu 2025).

    The group mean of the scores (``group_size`` consecutive samples per prompt) is subtracted first, without std
    normalisation; then as :func:`reinforce_pp_advantages`: KL-shaped token rewards, return-to-go, global whitening.
    """
    centred = _groups(scores, group_size)
    centred = (centred - centred.mean(-1, keepdim=True)).reshape(-1)
    return reinforce_pp_advantages(centred, kl, mask, kl_coef, gamma)


# ------------------------------------------------------------------------------------------- the estimator table
Estimator = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_baseline"]


@dataclass(frozen=True)
class AdvantageInputs:
    """What a rollout gives an estimator: sequence ``scores`` (B,), per-token ``kl`` to the reference and the response
    ``mask`` (B, T), the critic's ``values`` (B, T; GAE only), the KL coefficient ``beta`` folded into the reward
    (0 when the KL is a loss term instead), samples per prompt ``group_size``, ``gamma``, ``lam`` and whether GAE
    advantages are whitened."""

    scores: torch.Tensor
    kl: torch.Tensor
    mask: torch.Tensor
    values: torch.Tensor | None = None
    beta: float = 0.0
    group_size: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True

    def shaped_scores(self) -> torch.Tensor:
        """Sequence scores minus β times the sequence's summed KL (the critic-free group estimators' reward)."""
        return self.scores - self.beta * self.kl.sum(-1)

    def per_token(self, sequence: torch.Tensor) -> torch.Tensor:
        """A sequence-level advantage (B,) on every response token (B, T)."""
        return sequence[:, None] * self.mask


def _gae_estimator(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    advantages, returns = gae(token_rewards(x.scores, x.kl, x.mask, x.beta), x.values, x.mask, x.gamma, x.lam)
    return (masked_whiten(advantages, x.mask) if x.whiten else advantages), returns


# estimator name -> (AdvantageInputs -> (token advantages (B, T), returns (B, T) for a critic, else None)).
ESTIMATORS: dict[str, Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]] = {
    "gae": _gae_estimator,
    "grpo": lambda x: (x.per_token(group_advantages(x.shaped_scores(), x.group_size, normalize_std=True)), None),
    "dr_grpo": lambda x: (x.per_token(group_advantages(x.shaped_scores(), x.group_size, normalize_std=False)), None),
    "rloo": lambda x: (x.per_token(rloo_advantages(x.shaped_scores(), x.group_size)), None),
    "reinforce_pp": lambda x: (reinforce_pp_advantages(x.scores, x.kl, x.mask, x.beta, x.gamma), None),
    "reinforce_baseline": lambda x: (
        reinforce_baseline_advantages(x.scores, x.kl, x.mask, x.beta, x.group_size, x.gamma), None),
}
CRITIC_ESTIMATORS = ("gae",)  # the estimators that need a value model
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_baseline")  # compare the samples of one prompt: n >= 2


def estimate_advantages(estimator: Estimator, inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-level advantages (B, T) and, for a critic, its returns (B, T): ``ESTIMATORS[estimator](inputs)``."""
    return ESTIMATORS[estimator](inputs)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2).

    After each batch: ``e = clip(KL / target - 1, -0.2, 0.2)``, ``β ← β (1 + e · n_steps / horizon)``; β grows when
    the policy drifts further than ``target`` nats from the reference and shrinks when it stays closer.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt ``value`` to the KL measured on the last ``n_steps`` samples (the paper's batch size)."""
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The coefficient (``target``/``horizon`` are configuration and come from the constructor on resume)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient with :class:`AdaptiveKLController`'s interface; ``update`` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
