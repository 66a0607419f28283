"""Losses as small pure functions. Shapes: B batch, T sequence length, V vocabulary.

Each function cites its source; tests in ``tests/test_losses.py`` check them against the formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (over all elements, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with next-token logits: position t predicts token t+1; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under ``logits`` (B, T, V) -> (B, T); ignored positions give 0.

    Uses ``logsumexp`` per position instead of a full-vocabulary ``log_softmax`` tensor (as TRL's
    ``selective_log_softmax`` does) to keep peak memory at one (B, T, V) tensor.
    """
    safe = labels.clamp(min=0)
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1).float()
    logps = picked - torch.logsumexp(logits.float(), dim=-1)
    return logps.masked_fill(labels == IGNORE_INDEX, 0.0)


def sft_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level negative log-likelihood averaged over the labelled tokens (the standard SFT / LM loss).

    Args:
        logits: (B, T, V) next-token logits.
        labels: (B, T) token ids, already shifted so ``labels[:, t]`` is the target of ``logits[:, t]``;
            ``-100`` marks positions without a target (prompt, padding).
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
