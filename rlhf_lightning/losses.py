"""Losses as small pure functions. Shapes: B batch, T sequence length, V vocabulary.

Each function cites its source; tests in ``tests/test_losses.py`` check them against the formulas.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def upcast_half(values: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> float32 for softmax-type reductions; float32 and float64 keep their precision."""
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each label under ``logits`` (B, T, V) -> (B, T); ignored positions give 0.

    ``temperature`` scores under ``softmax(logits / T)``, the distribution that sampling at temperature ``T`` drew
    from (RL on sampled responses must use it, or ratios and KL describe another policy).
    Uses ``logsumexp`` per position instead of a full-vocabulary ``log_softmax`` tensor (as TRL's
    ``selective_log_softmax`` does) to keep peak memory at one (B, T, V) tensor.
    """
    if temperature != 1.0:
        logits = logits / temperature
    logits = upcast_half(logits)
    logps = picked_log_probs(logits, labels.clamp(min=0))
    return logps.masked_fill(labels == IGNORE_INDEX, 0.0)


def head_logits(lm_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """``lm_head(hidden) / temperature``: the logits of the distribution sampling at ``temperature`` drew from."""
    logits = lm_head(hidden)
    return logits / temperature if temperature != 1.0 else logits


def picked_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[label]`` for logits (..., V) and labels (...) -> (...), without materialising the
    log-softmax: the picked logit minus the log-sum-exp."""
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def map_head_chunks(per_chunk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``per_chunk(h, y)`` over ``chunk_size`` rows of ``hidden`` (N, H) and ``labels`` (N,) at a time, results
    concatenated along their last dimension. With gradients, each chunk is recomputed in backward (activation
    checkpointing) instead of keeping its (chunk_size, V) logits for the softmax gradient: one more head matmul per
    chunk, and the memory bound holds in backward too."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] <= chunk_size:
        return per_chunk(hidden, labels)
    recompute = torch.is_grad_enabled()
    return torch.cat([checkpoint(per_chunk, h, y, use_reentrant=False) if recompute else per_chunk(h, y)
                      for h, y in zip(hidden.split(chunk_size), labels.split(chunk_size), strict=True)], dim=-1)


def selective_log_probs(hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                        chunk_size: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(lm_head(h) / T)[label]`` for ``N`` hidden states (N, H) and their labels (N,) -> (N,).

    The LM head is applied to the given positions only (callers pass the response positions), ``chunk_size`` rows
    at a time (:func:`map_head_chunks`), so at most a (chunk_size, V) block of logits exists at once instead of
    (tokens, V): the idea of TRL's ``selective_log_softmax`` and Liger's chunked cross-entropy, here for any head.
    Values and gradients equal :func:`token_log_probs` on the full logits.
    """
    def chunk_log_probs(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return picked_log_probs(upcast_half(head_logits(lm_head, h, temperature)), y)

    return map_head_chunks(chunk_log_probs, hidden, labels, chunk_size)


def selective_log_probs_and_entropy(hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor],
                                    labels: torch.Tensor, chunk_size: int = 1024,
                                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_log_probs` and, from the same chunk of logits, the entropy of each position's next-token
    distribution (as :func:`entropy_from_logits`): (N, H), (N,) -> ((N,), (N,)). The PPO update needs both; the
    entropy costs a softmax per chunk and no second head matmul."""
    def chunk_stats(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = upcast_half(head_logits(lm_head, h, temperature))
        # (2, n): chunks concatenate along dim -1
        return torch.stack([picked_log_probs(logits, y), entropy_from_logits(logits)])

    log_probs, entropy = map_head_chunks(chunk_stats, hidden, labels, chunk_size)
    return log_probs, entropy


def segment_sums(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum of ``values`` per segment: ``out[s] = Σ_{t: segment_ids[t] = s} values[t]`` (any shape, flattened) ->
    (num_segments,). Packed batches hold several samples in one row; this is their per-sample reduction."""
    out = values.new_zeros(num_segments)
    return out.index_add(0, segment_ids.reshape(-1), values.reshape(-1))


def sft_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level negative log-likelihood averaged over the labelled tokens (the standard SFT / LM loss).

    Args:
        logits: (B, T, V) next-token logits.
        labels: (B, T) token ids, already shifted so ``labels[:, t]`` is the target of ``logits[:, t]``;
            ``-100`` marks positions without a target (prompt, padding).
    """
    return F.cross_entropy(upcast_half(logits).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


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


# --------------------------------------------------------------------------------- policy gradient (PPO family)
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


def _where_valid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values`` with masked positions set to 0 by selection (garbage there, even ``inf``, cannot leak)."""
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: Aggregation = "token_mean") -> torch.Tensor:
    """Reduce per-token losses (B, T) to a scalar over the tokens where ``mask`` is set.

    - ``token_mean``: ``Σ values·mask / Σ mask`` over the whole batch, every token weighs the same (DAPO, Yu et al.
      2025, token-level policy-gradient loss).
    - ``seq_mean_token_mean``: mean over sequences of each sequence's per-token mean (original GRPO, Shao et al.
      2024); short and long answers weigh the same.
    - ``seq_mean_token_sum``: mean over sequences of each sequence's token *sum*. Dr. GRPO (Liu et al. 2025) sums
      over tokens and divides by a constant (the generation budget) instead of the length; this is that loss times
      the constant, which a learning rate absorbs.

    Sequence modes average over the rows with at least one valid token (all-padding rows are ignored).
    """
    valid = mask.bool()
    values = _where_valid(values, valid)
    if mode == "token_mean":
        return masked_mean(values, valid)
    nonempty = valid.any(-1)
    if mode == "seq_mean_token_mean":
        return masked_mean(masked_mean(values, valid, dim=-1), nonempty)
    if mode == "seq_mean_token_sum":
        return masked_mean(values.sum(-1), nonempty)
    raise ValueError(f"Unknown aggregation '{mode}': use token_mean, seq_mean_token_mean or seq_mean_token_sum.")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                aggregation: Aggregation = "token_mean", sampler_logprobs: torch.Tensor | None = None,
                importance_cap: float | None = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017) over response tokens; all inputs (B, T).

    With ``ratio = exp(log π - log π_old)`` the per-token loss is
    ``max(-A·ratio, -A·clip(ratio, 1 - clip_low, 1 + clip_high))``; ``clip_high > clip_low`` is DAPO's clip-higher
    (Yu et al. 2025). Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"): for
    ``A < 0`` the per-token loss is also capped at ``-A·dual_clip`` (``dual_clip > 1``), so a huge ratio on a bad
    token cannot blow the update up. Clipped tokens get no gradient. Per-token losses are reduced by
    :func:`aggregate`.

    Off-policy samples (``sampler_logprobs`` given: the responses were drawn from another policy μ than π_old, e.g.
    one version older in asynchronous rollouts, or an inference engine's numerics): each token's loss is weighted by
    the truncated importance ratio ``w = min(π_old / μ, importance_cap)`` (detached), the truncated importance
    sampling of Yao et al. 2025 ("Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"), which is
    also the behaviour-policy weight of decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy
    optimization"): the clipped ratio stays relative to π_old, the proximal policy; ``importance_cap=None`` leaves
    the weights untruncated.

    Args:
        logprobs: (B, T) log π(a_t) of the current policy (with gradient).
        old_logprobs: (B, T) log-probs of the policy that sampled the rollout (detached).
        advantages: (B, T) per-token advantages; sequence-level advantages (B,) (GRPO, RLOO) must be broadcast by
            the caller, e.g. ``adv[:, None].expand_as(mask)``.
        mask: (B, T) response mask.
        sampler_logprobs: (B, T) log μ(a_t) of the policy that sampled, or ``None`` (it was π_old).

    Returns:
        ``(loss, stats)``; stats (detached scalars): ``clip_frac`` (share of valid tokens where the clipped branch
        is the active one), ``dual_clip_frac`` (share where the dual-clip cap is active, 0 without it),
        ``approx_kl`` (masked mean of ``½ (log π - log π_old)²``, the k2 estimator of KL(π_old || π) as OpenAI
        baselines and TRL log it) and ``ratio_mean``; with ``sampler_logprobs`` also ``is_weight_mean`` (mean
        weight after truncation) and ``is_truncated_frac`` (share of tokens whose ratio exceeded the cap).
    """
    if importance_cap is not None and importance_cap <= 0:
        raise ValueError(f"importance_cap must be > 0, got {importance_cap}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip ranges must be >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    valid = mask.bool()
    log_ratio = _where_valid(logprobs - old_logprobs, valid)
    advantages = _where_valid(advantages.to(log_ratio.dtype), valid)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    is_clipped = clipped > unclipped
    per_token = torch.where(is_clipped, clipped, unclipped)
    is_dual_clipped = torch.zeros_like(valid)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        is_dual_clipped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(is_dual_clipped, cap, per_token)
    is_stats = {}
    if sampler_logprobs is not None:
        with torch.no_grad():
            is_ratio = torch.exp(_where_valid(old_logprobs - sampler_logprobs, valid).float()).to(per_token.dtype)
            weights = is_ratio if importance_cap is None else is_ratio.clamp(max=importance_cap)
            is_stats = {"is_weight_mean": masked_mean(weights, valid),
                        "is_truncated_frac": masked_mean((weights < is_ratio).to(ratio.dtype), valid)}
        per_token = per_token * weights
    loss = aggregate(per_token, valid, aggregation)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(is_clipped.to(ratio.dtype), valid),
            "dual_clip_frac": masked_mean(is_dual_clipped.to(ratio.dtype), valid),
            "approx_kl": masked_mean(0.5 * log_ratio**2, valid),
            "ratio_mean": masked_mean(ratio, valid),
            **is_stats,
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2,
               aggregation: Aggregation = "token_mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Critic loss ``½ max((V - R)², (V_clip - R)²)`` with ``V_clip = V_old + clip(V - V_old, -clip, clip)``.

    PPO2's value clipping (OpenAI baselines ``ppo2``; Schulman et al. 2017); ``clip=None`` gives the plain
    ``½ (V - R)²``. All inputs (B, T): ``values`` with gradient, ``old_values`` from the rollout, ``returns`` the
    targets (e.g. from :func:`rlhf_lightning.advantages.gae`). Returns ``(loss, stats)`` with ``value_clip_frac``,
    the share of valid tokens where the clipped term is the active one.
    """
    valid = mask.bool()
    values = _where_valid(values, valid)
    returns = _where_valid(returns.to(values.dtype), valid)
    per_token = (values - returns) ** 2
    is_clipped = torch.zeros_like(valid)
    if clip is not None:
        old_values = _where_valid(old_values.to(values.dtype), valid)
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (clipped_values - returns) ** 2
        is_clipped = clipped > per_token
        per_token = torch.where(is_clipped, clipped, per_token)
    loss = aggregate(0.5 * per_token, valid, aggregation)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean(is_clipped.to(values.dtype), valid)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position, (B, T, V) -> (B, T).

    ``H = logsumexp(l) - Σ softmax(l)·l``, which needs one probability tensor and no ``log_softmax`` copy.
    Half-precision logits are computed in float32 (float32/float64 keep their dtype); ``-inf`` logits (filtered
    tokens) have probability 0 and contribute nothing.
    """
    logits = upcast_half(logits)
    probs = torch.softmax(logits, dim=-1)
    finite = logits.clamp(min=torch.finfo(logits.dtype).min)
    return torch.logsumexp(logits, dim=-1) - (probs * finite).sum(-1)
