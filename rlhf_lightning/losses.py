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


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Summed (or per-token averaged) log-probability of each sequence's labelled tokens: (B, T, V) -> (B,).

    ``labels`` are aligned with ``logits`` (see :func:`shift_labels`); prompt and padding are ``-100``.
    """
    token_logps = token_log_probs(logits, labels)
    mask = labels != IGNORE_INDEX
    total = token_logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


# --------------------------------------------------------------------------------------------- reward models
def pairwise_sigmoid_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                          margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bradley–Terry loss ``-log σ(r_c - r_r - m)``, averaged over pairs (B,) -> scalar.

    Bradley & Terry (1952); used for reward models by Ouyang et al. 2022 (InstructGPT). The optional per-pair
    margin ``m`` (Touvron et al. 2023, Llama 2) asks for a larger gap on pairs rated far apart.
    """
    return -F.logsigmoid(chosen - rejected - margin).mean()


def pairwise_logexp_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                         margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Log-exp loss ``log(1 + exp(r_r - r_c + m))`` (B,) -> scalar.

    Mathematically the same as :func:`pairwise_sigmoid_loss`; kept as its own name because reward-model recipes
    (e.g. OpenRLHF's ``log_exp``) select it. Computed as ``softplus`` so large gaps do not overflow ``exp``.
    """
    return F.softplus(rejected - chosen + margin).mean()


# ------------------------------------------------------------------------------------------------ DPO family
def preference_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                      ref_rejected: torch.Tensor) -> torch.Tensor:
    """``h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))``, per pair (B,)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO-family losses from sequence log-probs (all (B,)) -> (B,). ``h`` = :func:`preference_logits`.

    - ``sigmoid``: DPO (Rafailov et al. 2023), ``-log σ(βh)``; with ``label_smoothing`` ε > 0 it is conservative
      DPO (cDPO, Mitchell 2023): ``-(1-ε) log σ(βh) - ε log σ(-βh)``.
    - ``cdpo``: the same as ``sigmoid`` (name kept for configs that select cDPO explicitly).
    - ``robust``: robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate ε:
      ``[-(1-ε) log σ(βh) + ε log σ(-βh)] / (1 - 2ε)``.
    - ``ipo``: IPO (Azar et al. 2023), ``(h - 1/(2β))²``.
    - ``hinge``: SLiC-HF (Zhao et al. 2023), ``max(0, 1 - βh)``.
    """
    h = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    if loss_type in ("sigmoid", "cdpo"):
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        if not 0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"Unknown DPO loss_type '{loss_type}': use sigmoid, cdpo, robust, ipo or hinge.")


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl_reference_point: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024) per example (B,) -> (B,), on unpaired completions labelled good or bad.

    With ``r = log π(y|x) - log π_ref(y|x)`` and reference point ``z0`` (a detached, non-negative estimate of
    KL(π || π_ref), see :func:`kto_reference_point`)::

        desirable:   λ_D (1 - σ(β (r - z0)))
        undesirable: λ_U (1 - σ(β (z0 - r)))
    """
    r = policy_logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl_reference_point)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl_reference_point - r)))
    return torch.where(desirable.bool(), good, bad)


def kto_reference_point(policy_mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's ``z0 = max(0, mean(log π(y'|x) - log π_ref(y'|x)))`` over mismatched pairs (x, y'), detached."""
    return (policy_mismatched_logps - ref_mismatched_logps).mean().clamp(min=0).detach()


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free (B,) -> (B,): ``-log σ(β·avg log π(y_w) - β·avg log π(y_l) - γ)``.

    Inputs are length-normalised (per-token mean) log-probs; ``γ`` is the target reward margin.
    """
    return -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)


def orpo_odds_ratio_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024) (B,) -> (B,): ``-log σ(log odds(y_w) - log odds(y_l))``.

    ``odds(y) = P(y|x) / (1 - P(y|x))`` with ``log P`` the per-token mean log-prob; ``log(1 - P)`` is computed as
    ``log1p(-exp(log P))``. The full ORPO loss adds the chosen response's NLL: ``L_SFT + λ·L_OR``.
    """
    def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
        return avg_logps - torch.log1p(-torch.exp(avg_logps).clamp(max=1 - 1e-6))

    return -F.logsigmoid(log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps))
