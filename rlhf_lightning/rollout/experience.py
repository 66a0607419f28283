"""What one rollout produces for the PPO-family update: :class:`Experience`, a typed container in place of a dict.

Shapes: N sequences (prompt + response, right-padded to L tokens); per-token tensors are aligned with the shifted
labels, i.e. position t scores token t + 1, and ``mask`` marks the response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutTimes:
    """Wall seconds of the rollout's phases: sampling (weight push included), then scoring (reference log-probs,
    reward models and rules, with the old log-probs and values computed meanwhile)."""

    generate_s: float
    score_s: float


@dataclass
class Experience:
    """One rollout, ready for ``ppo_epochs`` of updates.

    Attributes:
        input_ids, attention_mask, labels: (N, L) the sequences; ``labels`` is -100 outside the response.
        mask: (N, L - 1) response tokens of the shifted labels (what every per-token tensor below is aligned to).
        scores: (N,) combined sequence reward (weighted, clipped) of all sources.
        source_scores: (sources, N) each reward source's own score, for logging.
        kl: (N, L - 1) per-token KL estimate to the reference (0 without one).
        advantages: (N, L - 1) from the configured estimator.
        old_logps: (N, L - 1) log-probs of the sampling policy, or ``None`` when the update's own (detached) ones
            are the same (one epoch, one mini-batch, no reference).
        ref_logps: (N, L - 1) reference log-probs, when a reference is used.
        values, returns: (N, L - 1) the critic's values at sampling time and its targets (GAE only).
        sampler_logps: (N, L - 1) log-probs the generation workers sampled the responses with (asynchronous
            rollouts: a policy one version older than the one updated), for the importance weights.
        sampler_version: the policy version that sampled the responses.
        times: phase timings of the rollout.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    scores: torch.Tensor
    source_scores: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    sampler_logps: torch.Tensor | None = None
    sampler_version: int = 0
    times: RolloutTimes | None = None

    def __len__(self) -> int:
        return self.scores.shape[0]

    def sequences(self, rows: slice) -> dict[str, torch.Tensor]:
        """The model inputs of ``rows``: ``input_ids``, ``attention_mask`` and ``labels``."""
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows],
                "labels": self.labels[rows]}
