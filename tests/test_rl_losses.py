"""Policy-gradient losses (PPO family) checked against the formulas of their papers.

Every branch of the clipped surrogate and of the clipped value loss is worked out by hand (value and gradient, in
the comments); random inputs are compared, values and autograd gradients, with a per-token Python loop written
here from the papers' definitions. Masked positions hold garbage (1e6, inf, nan) and must change nothing.
"""

import math

import pytest
import torch

from rlhf_lightning.losses import aggregate, entropy_from_logits, policy_loss, value_loss

F64 = torch.float64
DTYPES = [torch.float32, torch.float64]
GARBAGE = [1e6, -1e6, math.inf, -math.inf, math.nan]
MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


def t(rows, dtype=F64, grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype, requires_grad=grad)


def random_batch(b: int = 5, seq: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (B, T) values and a right-padded mask whose lengths include 0, 1 and T."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(b, seq, generator=gen, dtype=F64)
    lengths = torch.randint(1, seq + 1, (b,), generator=gen)
    lengths[0], lengths[1], lengths[-1] = seq, 1, 0
    return values, (torch.arange(seq) < lengths[:, None]).long()


# ----------------------------------------------------------------------------------------------- references
def ref_aggregate(per_token: list[list[torch.Tensor]], lengths: list[int], mode: str) -> torch.Tensor:
    """``per_token[b][i]`` for the valid tokens i < lengths[b] only (padding never enters)."""
    rows = [per_token[b][:n] for b, n in enumerate(lengths) if n > 0]
    if mode == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / len(rows)


def ref_ppo_token(logp, old, adv, clip_low, clip_high, dual_clip):
    """Schulman et al. 2017 eq. 7 (as a loss), with Ye et al. 2020's dual clip for negative advantages."""
    ratio = torch.exp(logp - old)
    clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    objective = torch.minimum(ratio * adv, clipped_ratio * adv)
    if dual_clip is not None and adv < 0:
        objective = torch.maximum(objective, dual_clip * adv)
    return -objective


def ref_value_token(v, old, ret, clip):
    if clip is None:
        return 0.5 * (v - ret) ** 2
    v_clipped = old + torch.clamp(v - old, -clip, clip)
    return 0.5 * torch.maximum((v - ret) ** 2, (v_clipped - ret) ** 2)


def per_token_lists(fn, *tensors, mask):
    lengths = mask.sum(-1).tolist()
    rows = [[fn(*(x[b, i] for x in tensors)) for i in range(n)] for b, n in enumerate(lengths)]
    return rows, lengths


# ---------------------------------------------------------------------------------------------------- aggregate
@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_hand_computed(dtype):
    # Row 0: [1, 2, 3]; row 1: [4] then padding; row 2: all padding (ignored by every mode).
    #   token_mean          = (1 + 2 + 3 + 4) / 4 = 2.5
    #   seq_mean_token_mean = (6/3 + 4/1) / 2     = 3
    #   seq_mean_token_sum  = (6 + 4) / 2         = 5
    values = t([[1.0, 2.0, 3.0], [4.0, 1e6, 1e6], [1e6, 1e6, 1e6]], dtype)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    for mode, expected in zip(MODES, (2.5, 3.0, 5.0), strict=True):
        out = aggregate(values, mask, mode)
        assert out.dtype == dtype and out.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="seq_mean"):
        aggregate(values, mask, "sum")


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_matches_reference_and_ignores_masked_positions(mode):
    values, mask = random_batch(seed=1)
    rows, lengths = per_token_lists(lambda v: v, values, mask=mask)
    torch.testing.assert_close(aggregate(values, mask, mode), ref_aggregate(rows, lengths, mode))
    for garbage in GARBAGE:
        assert torch.equal(aggregate(values.masked_fill(mask == 0, garbage), mask, mode), aggregate(values, mask, mode))


# -------------------------------------------------------------------------------------------------- policy_loss
# (advantage, ratio, per-token loss, d loss / d log π, clipped?) with clip 0.2 on both sides. The unclipped term is
# -A·r with gradient -A·r (d r / d log π = r); a clipped term is constant in log π, so its gradient is 0.
PPO_CASES = [
    (1.0, 1.1, -1.1, -1.1, False),   # A > 0, r inside [0.8, 1.2]:  max(-1.1, -1.1) = -1.1
    (1.0, 1.5, -1.2, 0.0, True),     # A > 0, r above:  max(-1.5, -1.2) = -1.2, clipped branch active
    (1.0, 0.5, -0.5, -0.5, False),   # A > 0, r below:  max(-0.5, -0.8) = -0.5, unclipped (no clip on the way down)
    (-1.0, 1.1, 1.1, 1.1, False),    # A < 0, r inside: max(1.1, 1.1) = 1.1
    (-1.0, 1.5, 1.5, 1.5, False),    # A < 0, r above:  max(1.5, 1.2) = 1.5, unclipped (pessimistic bound)
    (-1.0, 0.5, 0.8, 0.0, True),     # A < 0, r below:  max(0.5, 0.8) = 0.8, clipped branch active
    (2.0, 1.5, -2.4, 0.0, True),     # A = 2, r above:  max(-3.0, -2.4) = -2.4
    (0.0, 3.0, 0.0, 0.0, False),     # A = 0: no signal
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_every_clip_branch_by_hand(dtype):
    adv = t([[c[0] for c in PPO_CASES]], dtype)
    logp = t([[math.log(c[1]) for c in PPO_CASES]], dtype, grad=True)
    old = torch.zeros_like(logp)
    mask = torch.ones_like(adv)
    n = len(PPO_CASES)
    loss, stats = policy_loss(logp, old, adv, mask)
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(sum(c[2] for c in PPO_CASES) / n)
    loss.backward()
    # token_mean divides by n, so each token's gradient is its own derivative / n.
    torch.testing.assert_close(logp.grad, t([[c[3] / n for c in PPO_CASES]], dtype))
    assert stats["clip_frac"].item() == pytest.approx(sum(c[4] for c in PPO_CASES) / n)
    assert stats["dual_clip_frac"].item() == 0
    # ratio_mean = mean(r); approx_kl = mean(½ (log r)²).
    assert stats["ratio_mean"].item() == pytest.approx(sum(c[1] for c in PPO_CASES) / n)
    assert stats["approx_kl"].item() == pytest.approx(sum(0.5 * math.log(c[1]) ** 2 for c in PPO_CASES) / n)
    assert not any(s.requires_grad for s in stats.values())


def test_policy_loss_asymmetric_clip_higher():
    # clip_low 0.2, clip_high 0.28 (DAPO). A = +1:
    #   r = 1.25: inside [0.8, 1.28] -> -1.25, gradient -1.25 (it would be clipped at 1.2 with the symmetric 0.2)
    #   r = 1.5:  clipped at 1.28    -> -1.28, gradient 0
    #   r = 0.7 with A = -1: below 0.8 -> max(0.7, 0.8) = 0.8, gradient 0
    adv = t([[1.0, 1.0, -1.0]])
    logp = t([[math.log(1.25), math.log(1.5), math.log(0.7)]], grad=True)
    loss, stats = policy_loss(logp, torch.zeros_like(logp), adv, torch.ones(1, 3), clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8) / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([[-1.25 / 3, 0.0, 0.0]]))
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    symmetric, _ = policy_loss(logp[:, :1], torch.zeros(1, 1, dtype=F64), adv[:, :1], torch.ones(1, 1))
    assert symmetric.item() == pytest.approx(-1.2)


def test_policy_loss_dual_clip_by_hand():
    # dual_clip c = 3, clip 0.2. Per token (A, r):
    #   (-1, 4):  PPO loss max(4, 1.2) = 4 > cap -A·c = 3 -> 3, gradient 0 (dual clip active)
    #   (-2, 4):  max(8, 2.4) = 8 > cap 6                  -> 6, gradient 0 (dual clip active)
    #   (-1, 2):  max(2, 1.2) = 2 <= cap 3                  -> 2, gradient -A·r = 2
    #   (+1, 4):  A > 0, dual clip does not apply           -> max(-4, -1.2) = -1.2, gradient 0 (PPO clip)
    #   (-1, 0.5): max(0.5, 0.8) = 0.8 (PPO clip)           -> 0.8, gradient 0
    adv = t([[-1.0, -2.0, -1.0, 1.0, -1.0]])
    logp = t([[math.log(4.0), math.log(4.0), math.log(2.0), math.log(4.0), math.log(0.5)]], grad=True)
    loss, stats = policy_loss(logp, torch.zeros_like(logp), adv, torch.ones(1, 5), dual_clip=3.0)
    assert loss.item() == pytest.approx((3 + 6 + 2 - 1.2 + 0.8) / 5)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([[0.0, 0.0, 2.0 / 5, 0.0, 0.0]]))
    assert stats["dual_clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip"):
            policy_loss(logp, logp, adv, torch.ones(1, 5), dual_clip=bad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("clip_low", "clip_high", "dual_clip"), [(0.2, 0.2, None), (0.1, 0.3, 2.0)])
def test_policy_loss_matches_reference_values_and_gradients(mode, clip_low, clip_high, dual_clip):
    old, mask = random_batch(seed=2)
    gen = torch.Generator().manual_seed(3)
    logp = (old + 0.5 * torch.randn(old.shape, generator=gen, dtype=F64)).requires_grad_()
    adv = torch.randn(old.shape, generator=gen, dtype=F64)
    loss, _ = policy_loss(logp, old, adv, mask, clip_low, clip_high, dual_clip, mode)
    rows, lengths = per_token_lists(lambda lp, o, a: ref_ppo_token(lp, o, a, clip_low, clip_high, dual_clip),
                                    logp, old, adv, mask=mask)
    expected = ref_aggregate(rows, lengths, mode)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logp)
    (ref_grad,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(grad, ref_grad)
    assert (grad[mask == 0] == 0).all()


def test_policy_loss_truncated_importance_weights_by_hand():
    # Yao et al. 2025: per-token loss × min(π_old / μ, cap), the weight detached. cap 2, clip 0.2, A = +1, r = 1:
    #   π_old/μ = 0.5 -> weight 0.5: loss -0.5, gradient -0.5
    #   π_old/μ = 1.5 -> weight 1.5: loss -1.5, gradient -1.5
    #   π_old/μ = 4   -> truncated at 2: loss -2, gradient -2
    #   masked token (π_old/μ = 100): no weight, no loss
    adv = t([[1.0, 1.0, 1.0, 1.0]])
    old = t([[-1.0, -1.0, -1.0, -1.0]])
    logp = old.clone().requires_grad_()
    sampler = old - t([[math.log(0.5), math.log(1.5), math.log(4.0), math.log(100.0)]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, old, adv, mask, sampler_logprobs=sampler, importance_cap=2.0)
    assert loss.item() == pytest.approx((-0.5 - 1.5 - 2.0) / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([[-0.5 / 3, -1.5 / 3, -2.0 / 3, 0.0]]))
    assert stats["is_weight_mean"].item() == pytest.approx((0.5 + 1.5 + 2.0) / 3)
    assert stats["is_truncated_frac"].item() == pytest.approx(1 / 3)
    untruncated, stats = policy_loss(logp, old, adv, mask, sampler_logprobs=sampler, importance_cap=None)
    assert untruncated.item() == pytest.approx((-0.5 - 1.5 - 4.0) / 3) and stats["is_truncated_frac"].item() == 0
    on_policy, _ = policy_loss(logp, old, adv, mask, sampler_logprobs=old)  # μ = π_old: the plain PPO loss
    assert torch.equal(on_policy, policy_loss(logp, old, adv, mask)[0])
    with pytest.raises(ValueError, match="importance_cap"):
        policy_loss(logp, old, adv, mask, sampler_logprobs=sampler, importance_cap=0.0)


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_importance_weights_on_random_inputs(mode):
    """Against the reference per-token PPO loss times min(exp(old - sampler), cap), through every aggregation."""
    old, mask = random_batch(seed=5)
    gen = torch.Generator().manual_seed(6)
    logp = (old + 0.3 * torch.randn(old.shape, generator=gen, dtype=F64)).requires_grad_()
    sampler = old + 0.8 * torch.randn(old.shape, generator=gen, dtype=F64)
    adv = torch.randn(old.shape, generator=gen, dtype=F64)
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, mode, sampler, 1.5)
    weights = torch.exp(old - sampler).clamp(max=1.5)
    rows, lengths = per_token_lists(lambda lp, o, a: ref_ppo_token(lp, o, a, 0.2, 0.28, 3.0), logp, old, adv,
                                    mask=mask)
    weighted = [[v * weights[i, j] for j, v in enumerate(row)] for i, row in enumerate(rows)]
    torch.testing.assert_close(loss, ref_aggregate(weighted, lengths, mode))


@pytest.mark.parametrize("garbage", GARBAGE)
def test_policy_loss_ignores_masked_positions(garbage):
    old, mask = random_batch(seed=4)
    logp = (old + 0.3 * torch.randn_like(old)).requires_grad_()
    adv = torch.randn_like(old)
    loss, stats = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    (grad,) = torch.autograd.grad(loss, logp)
    dirty = [x.detach().masked_fill(mask == 0, garbage) for x in (logp, old, adv)]
    dirty[0].requires_grad_()
    dirty_loss, dirty_stats = policy_loss(*dirty, mask, dual_clip=3.0)
    (dirty_grad,) = torch.autograd.grad(dirty_loss, dirty[0])
    assert torch.equal(loss, dirty_loss) and torch.equal(grad, dirty_grad)
    assert all(torch.equal(stats[k], dirty_stats[k]) for k in stats)
    assert (dirty_grad[mask == 0] == 0).all()


# --------------------------------------------------------------------------------------------------- value_loss
# (V, V_old, R, per-token loss, d loss / d V, clipped?) with clip 0.2: V_clip = V_old + clip(V - V_old, ±0.2).
VALUE_CASES = [
    (1.0, 1.0, 2.0, 0.5, -1.0, False),    # V = V_old: both terms (1-2)² = 1 -> ½; gradient V - R = -1
    (1.5, 1.0, 2.0, 0.32, 0.0, True),     # V_clip 1.2: (1.5-2)² = 0.25 < (1.2-2)² = 0.64 -> ½·0.64, clipped
    (1.5, 1.0, 0.0, 1.125, 1.5, False),   # V_clip 1.2: 2.25 > 1.44 -> ½·2.25; gradient 1.5
    (0.5, 1.0, 0.0, 0.32, 0.0, True),     # V_clip 0.8: 0.25 < 0.64 -> ½·0.64, clipped
    (1.1, 1.0, 3.0, 1.805, -1.9, False),  # inside the clip: V_clip = V, ½·1.9² = 1.805; gradient -1.9
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_loss_every_clip_branch_by_hand(dtype):
    values = t([[c[0] for c in VALUE_CASES]], dtype, grad=True)
    old, returns = t([[c[1] for c in VALUE_CASES]], dtype), t([[c[2] for c in VALUE_CASES]], dtype)
    mask = torch.ones(1, len(VALUE_CASES))
    n = len(VALUE_CASES)
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    assert loss.dtype == dtype and loss.item() == pytest.approx(sum(c[3] for c in VALUE_CASES) / n)
    loss.backward()
    torch.testing.assert_close(values.grad, t([[c[4] / n for c in VALUE_CASES]], dtype))
    assert stats["value_clip_frac"].item() == pytest.approx(2 / 5)
    # clip=None: plain ½ (V - R)² = ½ [1, 0.25, 2.25, 0.25, 3.61].
    plain, stats = value_loss(values, old, returns, mask, clip=None)
    assert plain.item() == pytest.approx(0.5 * (1 + 0.25 + 2.25 + 0.25 + 3.61) / 5)
    assert stats["value_clip_frac"].item() == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_matches_reference_and_ignores_masked_positions(mode, clip):
    old, mask = random_batch(seed=5)
    values = (old + 0.4 * torch.randn_like(old)).requires_grad_()
    returns = torch.randn_like(old)
    loss, stats = value_loss(values, old, returns, mask, clip, mode)
    rows, lengths = per_token_lists(lambda v, o, r: ref_value_token(v, o, r, clip), values, old, returns, mask=mask)
    expected = ref_aggregate(rows, lengths, mode)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, values)[0])
    for garbage in GARBAGE:
        dirty = [x.detach().masked_fill(mask == 0, garbage) for x in (values, old, returns)]
        dirty[0].requires_grad_()
        dirty_loss, dirty_stats = value_loss(*dirty, mask, clip, mode)
        (dirty_grad,) = torch.autograd.grad(dirty_loss, dirty[0])
        assert torch.equal(loss, dirty_loss) and torch.equal(grad, dirty_grad)
        assert torch.equal(stats["value_clip_frac"], dirty_stats["value_clip_frac"])


# ------------------------------------------------------------------------------------------ entropy_from_logits
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_hand_computed(dtype):
    # [0, 0]: uniform over 2 -> ln 2.  [ln 3, 0]: p = [3/4, 1/4] -> H = ln 4 - ¾ ln 3 (logsumexp - Σ p·l).
    # [0, 0, -inf]: a filtered token has p = 0 and adds nothing -> ln 2.  [0, 0, 0, 0] + 1000: shift-invariant, ln 4.
    logits = t([[[0.0, 0.0, -math.inf, -math.inf], [math.log(3.0), 0.0, -math.inf, -math.inf],
                 [0.0, 0.0, -math.inf, 0.0], [1000.0, 1000.0, 1000.0, 1000.0]]], dtype)
    expected = t([[math.log(2), math.log(4) - 0.75 * math.log(3), math.log(3), math.log(4)]], dtype)
    out = entropy_from_logits(logits)
    assert out.shape == (1, 4) and out.dtype == dtype
    torch.testing.assert_close(out, expected)


def test_entropy_matches_definition_and_gradients():
    logits = (3 * torch.randn(3, 5, 17, dtype=F64)).requires_grad_()
    out = entropy_from_logits(logits)
    reference = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(out, reference)
    weights = torch.rand(3, 5, dtype=F64)
    torch.testing.assert_close(torch.autograd.grad((weights * out).sum(), logits)[0],
                               torch.autograd.grad((weights * reference).sum(), logits)[0])
    assert ((out >= 0) & (out <= math.log(17) + 1e-12)).all()
    # -inf logits give finite gradients; half precision is computed in float32.
    filtered = logits.detach().clone().index_fill_(-1, torch.tensor([0, 3]), -math.inf).requires_grad_()
    entropy_from_logits(filtered).sum().backward()
    assert torch.isfinite(filtered.grad).all()
    assert entropy_from_logits(logits.detach().bfloat16()).dtype == torch.float32


def test_token_log_probs_at_a_temperature_score_the_sampling_distribution():
    from rlhf_lightning.losses import token_log_probs

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(token_log_probs(logits, labels, temperature=0.7), expected.masked_fill(labels < 0, 0))
    torch.testing.assert_close(token_log_probs(logits, labels), token_log_probs(logits, labels, temperature=1.0))
