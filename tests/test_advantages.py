"""Rewards, KL estimators and advantage estimators checked against the formulas of their papers.

Each function is checked on a small example worked out by hand (arithmetic in the comments) and on random inputs
against a plain per-row, per-token Python loop written here from the paper's definition. Masked positions are
filled with garbage (1e6, inf, nan) to show they never change a result.
"""

import math

import pytest
import torch

from rlhf_lightning.advantages import (
    AdaptiveKLController,
    FixedKLController,
    discounted_returns,
    gae,
    group_advantages,
    kl_penalty,
    last_valid_index,
    masked_whiten,
    reinforce_baseline_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    token_rewards,
)

F64 = torch.float64
LN2 = math.log(2.0)
GARBAGE = [1e6, -1e6, math.inf, -math.inf, math.nan]
DTYPES = [torch.float32, torch.float64]


def t(rows, dtype=F64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def random_batch(b: int = 6, seq: int = 7, seed: int = 0, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (B, T) values and a right-padded mask whose lengths include 0, 1 and T."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(b, seq, generator=gen, dtype=dtype)
    lengths = torch.randint(1, seq + 1, (b,), generator=gen)
    lengths[0], lengths[1], lengths[-1] = seq, 1, 0
    mask = (torch.arange(seq) < lengths[:, None]).long()
    return values, mask


def with_garbage(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    return x.masked_fill(mask == 0, value)


def assert_masked_positions_ignored(fn, tensors: list[torch.Tensor], mask: torch.Tensor) -> None:
    """``fn(*tensors)`` is identical when every masked position of every (B, T) input holds garbage."""
    def outputs(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = fn(*xs)
        return out if isinstance(out, tuple) else (out,)

    clean = outputs(tensors)
    for garbage in GARBAGE:
        dirty = outputs([with_garbage(x, mask, garbage) for x in tensors])
        for a, b in zip(clean, dirty, strict=True):
            assert torch.equal(a, b), f"garbage {garbage} in masked positions changed the result"


# ----------------------------------------------------------------------------------------------- references
def ref_token_rewards(scores, kl, mask, kl_coef):
    out = torch.zeros_like(kl)
    for b in range(kl.shape[0]):
        length = int(mask[b].sum())
        for i in range(length):
            out[b, i] = -kl_coef * kl[b, i]
        if length:
            out[b, length - 1] += scores[b]
    return out


def ref_returns(rewards, mask, gamma):
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        for i in range(length):
            out[b, i] = sum(gamma**k * rewards[b, i + k].item() for k in range(length - i))
    return out


def ref_gae(rewards, values, mask, gamma, lam):
    """Schulman et al. 2016, eq. 16 as a sum: A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} - V_t, V_L = 0."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        v = [values[b, i].item() for i in range(length)] + [0.0]
        deltas = [rewards[b, i].item() + gamma * v[i + 1] - v[i] for i in range(length)]
        for i in range(length):
            adv[b, i] = sum((gamma * lam) ** k * deltas[i + k] for k in range(length - i))
    return adv, torch.where(mask.bool(), adv + values, 0.0)


def ref_whiten(values, mask, shift_mean=True, eps=1e-8):
    valid = values[mask.bool()]
    mean = valid.mean()
    std = math.sqrt(((valid - mean) ** 2).mean().item() + eps)
    out = torch.zeros_like(values)
    for b in range(values.shape[0]):
        for i in range(values.shape[1]):
            if mask[b, i]:
                out[b, i] = ((values[b, i] - mean) if shift_mean else values[b, i]) / std
    return out


def ref_group(scores, group_size, normalize_std, eps):
    out = []
    for start in range(0, len(scores), group_size):
        group = [s.item() for s in scores[start:start + group_size]]
        mean = sum(group) / group_size
        std = math.sqrt(sum((g - mean) ** 2 for g in group) / (group_size - 1)) if normalize_std else None
        out += [(g - mean) / (std + eps) if normalize_std else g - mean for g in group]
    return torch.tensor(out, dtype=scores.dtype)


def ref_rloo(scores, group_size):
    out = []
    for start in range(0, len(scores), group_size):
        group = [s.item() for s in scores[start:start + group_size]]
        out += [g - sum(o for j, o in enumerate(group) if j != i) / (group_size - 1) for i, g in enumerate(group)]
    return torch.tensor(out, dtype=scores.dtype)


# ----------------------------------------------------------------------------------------------- masked_whiten
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_whiten_hand_computed(dtype):
    # Valid elements 1, 2, 3: mean 2, population variance (1 + 0 + 1) / 3 = 2/3, std = sqrt(2/3).
    values = t([[1.0, 2.0, 3.0, 1e6]], dtype)
    mask = torch.tensor([[1, 1, 1, 0]])
    std = math.sqrt(2 / 3)
    expected = t([[-1 / std, 0.0, 1 / std, 0.0]], dtype)
    torch.testing.assert_close(masked_whiten(values, mask, eps=0.0), expected)
    # shift_mean=False only scales: x / std (std still measured about the mean), masked position still 0.
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False, eps=0.0),
                               t([[1 / std, 2 / std, 3 / std, 0.0]], dtype))
    assert masked_whiten(values, mask).dtype == dtype


def test_masked_whiten_matches_reference_and_ignores_masked_positions():
    values, mask = random_batch()
    for shift in (True, False):
        out = masked_whiten(values, mask, shift_mean=shift)
        torch.testing.assert_close(out, ref_whiten(values, mask, shift), atol=1e-12, rtol=1e-10)
        assert_masked_positions_ignored(lambda v, s=shift: masked_whiten(v, mask, shift_mean=s), [values], mask)
    out = masked_whiten(values, mask)
    valid = out[mask.bool()]
    assert abs(valid.mean().item()) < 1e-12 and abs(valid.var(unbiased=False).item() - 1) < 1e-6


# ------------------------------------------------------------------------------------------------- kl_penalty
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_estimators_hand_computed(dtype):
    # Token 0: π = 1/2, π_ref = 1/4 -> log r = ln(1/4 / 1/2) = -ln2.
    #   k1 = ln2, k2 = ½ ln²2, k3 = (1/2 - 1) + ln2 = ln2 - 1/2.
    # Token 1: π = 1/4, π_ref = 1/2 -> log r = ln2.
    #   k1 = -ln2, k2 = ½ ln²2, k3 = (2 - 1) - ln2 = 1 - ln2.
    logp = t([[math.log(0.5), math.log(0.25)]], dtype)
    ref = t([[math.log(0.25), math.log(0.5)]], dtype)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), t([[LN2, -LN2]], dtype))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), t([[LN2**2 / 2, LN2**2 / 2]], dtype))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), t([[LN2 - 0.5, 1 - LN2]], dtype))
    assert kl_penalty(logp, ref, "k3").dtype == dtype
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


@pytest.mark.parametrize("dtype", DTYPES)
def test_k3_is_never_negative(dtype):
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(4000, generator=gen, dtype=F64) * 5
    delta = torch.cat([torch.randn(2000, generator=gen, dtype=F64) * 5,
                       torch.randn(2000, generator=gen, dtype=F64) * 1e-7])  # tiny log-ratios: rounding regime
    k3 = kl_penalty(logp.to(dtype), (logp + delta).to(dtype), "k3")
    assert (k3 >= 0).all()
    assert (kl_penalty(logp, logp, "k3") == 0).all() and (kl_penalty(logp, logp, "k1") == 0).all()


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    # Exact expectation over a categorical π (no sampling noise): E_π[k1] = E_π[k3] = KL(π || π_ref), since
    # E_π[r - 1] = Σ π_ref - 1 = 0. k2 is biased in general.
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(12, generator=gen, dtype=F64), 0)
    q = torch.softmax(torch.randn(12, generator=gen, dtype=F64), 0)
    kl = (p * (p.log() - q.log())).sum()
    for est in ("k1", "k3"):
        torch.testing.assert_close((p * kl_penalty(p.log(), q.log(), est)).sum(), kl)
    assert abs((p * kl_penalty(p.log(), q.log(), "k2")).sum() - kl) > 1e-4


# ---------------------------------------------------------------------------------------------- token_rewards
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_rewards_hand_computed(dtype):
    # β = 0.5. Row 0 (3 tokens): -0.5·[0.1, 0.2, 0.3] = [-0.05, -0.1, -0.15], score 2 on the last -> 1.85.
    # Row 1 (1 token): -0.5·0.4 + (-1) = -1.2; padding 0. Row 2 (no token): nothing, the score is dropped.
    scores = t([2.0, -1.0, 7.0], dtype)
    kl = t([[0.1, 0.2, 0.3], [0.4, 1e6, 1e6], [1e6, 1e6, 1e6]], dtype)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    expected = t([[-0.05, -0.1, 1.85], [-1.2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype)
    torch.testing.assert_close(token_rewards(scores, kl, mask, 0.5), expected)
    assert last_valid_index(mask).tolist() == [2, 0, -1]


def test_token_rewards_matches_reference_and_ignores_masked_positions():
    kl, mask = random_batch(seed=1)
    scores = torch.randn(kl.shape[0], dtype=F64)
    torch.testing.assert_close(token_rewards(scores, kl, mask, 0.3), ref_token_rewards(scores, kl, mask, 0.3))
    assert_masked_positions_ignored(lambda k: token_rewards(scores, k, mask, 0.3), [kl], mask)


# ------------------------------------------------------------------------------------------------------- gae
@pytest.mark.parametrize("dtype", DTYPES)
def test_gae_hand_computed(dtype):
    # Row 0: r = [0, 0, 1], V = [0.5, 0.6, 0.7], γ = 0.9, λ = 0.5 (γλ = 0.45), V after the last token = 0.
    #   δ2 = 1 + 0.9·0 - 0.7 = 0.3;   δ1 = 0 + 0.9·0.7 - 0.6 = 0.03;   δ0 = 0 + 0.9·0.6 - 0.5 = 0.04
    #   A2 = 0.3;   A1 = 0.03 + 0.45·0.3 = 0.165;   A0 = 0.04 + 0.45·0.165 = 0.11425
    #   returns = A + V = [0.61425, 0.765, 1.0]
    # Row 1: one token, r = 2, V = 1 (garbage V after it must count as 0): δ0 = 2 - 1 = 1 = A0, return 2.
    rewards = t([[0.0, 0.0, 1.0], [2.0, 1e6, 1e6]], dtype)
    values = t([[0.5, 0.6, 0.7], [1.0, 1e6, -1e6]], dtype)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, t([[0.11425, 0.165, 0.3], [1.0, 0.0, 0.0]], dtype))
    torch.testing.assert_close(ret, t([[0.61425, 0.765, 1.0], [2.0, 0.0, 0.0]], dtype))
    assert adv.dtype == ret.dtype == dtype


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (0.8, 0.0), (1.0, 1.0)])
def test_gae_matches_paper_sum_and_ignores_masked_positions(gamma, lam):
    rewards, mask = random_batch(seed=2)
    values = torch.randn_like(rewards)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert_masked_positions_ignored(lambda r, v: gae(r, v, mask, gamma, lam), [rewards, values], mask)


def test_gae_limits():
    rewards, mask = random_batch(seed=3)
    values = torch.randn_like(rewards) * mask
    # λ = 1: A_t = G_t - V_t (Monte-Carlo advantage), so returns are the discounted returns.
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(ret, discounted_returns(rewards, mask, 0.9))
    # λ = 0: A_t = δ_t (one-step TD error).
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_v = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1) * mask
    torch.testing.assert_close(adv, (rewards + 0.9 * next_v - values) * mask)


# ---------------------------------------------------------------------------------------- discounted_returns
@pytest.mark.parametrize("dtype", DTYPES)
def test_discounted_returns_hand_computed(dtype):
    # γ = 0.5, r = [1, 2, 3]: G2 = 3, G1 = 2 + 0.5·3 = 3.5, G0 = 1 + 0.5·3.5 = 2.75. Row 1: G0 = 4, padding 0.
    rewards = t([[1.0, 2.0, 3.0], [4.0, 1e6, 1e6]], dtype)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.5), t([[2.75, 3.5, 3.0], [4.0, 0.0, 0.0]], dtype))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_matches_reference_and_ignores_masked_positions(gamma):
    rewards, mask = random_batch(seed=4)
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma), ref_returns(rewards, mask, gamma))
    assert_masked_positions_ignored(lambda r: discounted_returns(r, mask, gamma), [rewards], mask)


# ---------------------------------------------------------------------------------------------- group / RLOO
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_advantages_hand_computed(dtype):
    # Group 1: [1, 2, 3], mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1].
    # Group 2: [0, 0, 6], mean 2, deviations [-2, -2, 4], unbiased var (4 + 4 + 16) / 2 = 12, std 2√3
    #   -> [-1/√3, -1/√3, 2/√3].
    scores = t([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], dtype)
    r3 = math.sqrt(3)
    grpo = group_advantages(scores, 3, eps=0.0)
    torch.testing.assert_close(grpo, t([-1.0, 0.0, 1.0, -1 / r3, -1 / r3, 2 / r3], dtype))
    # Dr. GRPO: only the group mean is subtracted.
    torch.testing.assert_close(group_advantages(scores, 3, normalize_std=False), t([-1, 0, 1, -2, -2, 4], dtype))
    # A group whose samples all scored the same has no signal: 0 / (0 + eps) = 0.
    assert (group_advantages(t([5.0, 5.0, 1.0, 2.0], dtype), 2)[:2] == 0).all()
    assert grpo.dtype == dtype


def test_group_advantages_matches_reference_and_validates():
    scores = torch.randn(24, dtype=F64, generator=torch.Generator().manual_seed(5))
    for g in (2, 3, 4, 8):
        for norm in (True, False):
            torch.testing.assert_close(group_advantages(scores, g, norm), ref_group(scores, g, norm, 1e-6))
    with pytest.raises(ValueError, match=r"5.*group_size=2"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(4), 1)
    assert (group_advantages(torch.arange(4.0), 1, normalize_std=False) == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rloo_hand_computed(dtype):
    # [1, 2, 3]: A0 = 1 - (2 + 3)/2 = -1.5, A1 = 2 - (1 + 3)/2 = 0, A2 = 3 - (1 + 2)/2 = 1.5.
    # [4, 0]:    A0 = 4 - 0 = 4,            A1 = 0 - 4 = -4   (group_size 2 here: second call)
    torch.testing.assert_close(rloo_advantages(t([1.0, 2.0, 3.0], dtype), 3), t([-1.5, 0.0, 1.5], dtype))
    torch.testing.assert_close(rloo_advantages(t([4.0, 0.0], dtype), 2), t([4.0, -4.0], dtype))


def test_rloo_matches_reference_and_validates():
    scores = torch.randn(24, dtype=F64, generator=torch.Generator().manual_seed(6))
    for g in (2, 3, 4, 6):
        torch.testing.assert_close(rloo_advantages(scores, g), ref_rloo(scores, g))
        # Identity from the paper: A_i = G/(G-1) · (r_i - mean_g).
        torch.testing.assert_close(rloo_advantages(scores, g), g / (g - 1) * group_advantages(scores, g, False))
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match=r"7.*group_size=2"):
        rloo_advantages(torch.zeros(7), 2)


# ------------------------------------------------------------------------------------------------ REINFORCE++
@pytest.mark.parametrize("dtype", DTYPES)
def test_reinforce_pp_hand_computed(dtype):
    # β = 0 (no KL). Token rewards [[0, 1], [3, pad]] -> returns-to-go (γ = 1) [[1, 1], [3, pad]].
    # Whitened over the 3 valid tokens {1, 1, 3}: mean 5/3, population var ((2/3)²·2 + (4/3)²)/3 = 8/9,
    # std 2√2/3 -> (1 - 5/3)/(2√2/3) = -1/√2 and (3 - 5/3)/(2√2/3) = √2.
    scores = t([1.0, 3.0], dtype)
    kl = t([[0.5, 0.5], [0.5, 1e6]], dtype)
    mask = torch.tensor([[1, 1], [1, 0]])
    s2 = math.sqrt(2)
    torch.testing.assert_close(reinforce_pp_advantages(scores, kl, mask, 0.0), t([[-1 / s2, -1 / s2], [s2, 0]], dtype))


def test_reinforce_pp_matches_reference_and_ignores_masked_positions():
    kl, mask = random_batch(seed=7)
    kl = kl.abs()
    scores = torch.randn(kl.shape[0], dtype=F64)
    for gamma in (1.0, 0.95):
        expected = ref_whiten(ref_returns(ref_token_rewards(scores, kl, mask, 0.1), mask, gamma), mask)
        torch.testing.assert_close(reinforce_pp_advantages(scores, kl, mask, 0.1, gamma), expected)
    assert_masked_positions_ignored(lambda k: reinforce_pp_advantages(scores, k, mask, 0.1), [kl], mask)


def test_reinforce_baseline_hand_computed():
    # Groups [1, 3] and [2, 2] -> centred scores [-1, 1, 0, 0] (no std). One token each, β = 0:
    # returns [-1, 1, 0, 0], mean 0, population var 2/4 = 1/2 -> whitened [-√2, √2, 0, 0].
    scores = t([1.0, 3.0, 2.0, 2.0])
    kl, mask = torch.zeros(4, 1, dtype=F64), torch.ones(4, 1)
    s2 = math.sqrt(2)
    torch.testing.assert_close(reinforce_baseline_advantages(scores, kl, mask, 0.0, 2), t([[-s2], [s2], [0], [0]]))


def test_reinforce_baseline_matches_reference():
    kl, mask = random_batch(b=8, seed=8)
    scores = torch.randn(8, dtype=F64)
    centred = torch.tensor([s - scores[i // 4 * 4:i // 4 * 4 + 4].mean() for i, s in enumerate(scores)], dtype=F64)
    expected = ref_whiten(ref_returns(ref_token_rewards(centred, kl, mask, 0.05), mask, 1.0), mask)
    torch.testing.assert_close(reinforce_baseline_advantages(scores, kl, mask, 0.05, 4), expected)
    assert_masked_positions_ignored(lambda k: reinforce_baseline_advantages(scores, k, mask, 0.05, 4), [kl], mask)
    with pytest.raises(ValueError, match=r"8.*group_size=3"):
        reinforce_baseline_advantages(scores, kl, mask, 0.05, 3)


# ---------------------------------------------------------------------------------------------- KL controllers
def test_adaptive_kl_controller_hand_computed_updates():
    # target 6, horizon 100, n_steps 10 -> β ← β (1 + e / 10), e = clip(KL/6 - 1, -0.2, 0.2).
    ctl = AdaptiveKLController(init_kl_coef=1.0, target=6.0, horizon=100)
    ctl.update(12.0, 10)   # e = 1 -> clipped to 0.2:   1.0 · 1.02 = 1.02
    assert ctl.value == pytest.approx(1.02)
    ctl.update(0.0, 10)    # e = -1 -> clipped to -0.2: 1.02 · 0.98 = 0.9996
    assert ctl.value == pytest.approx(0.9996)
    ctl.update(6.6, 10)    # e = 0.1, inside the clip:  0.9996 · 1.01 = 1.009596
    assert ctl.value == pytest.approx(1.009596)
    ctl.update(6.0, 10)    # e = 0: unchanged
    assert ctl.value == pytest.approx(1.009596)
    ctl.update(4.8, 50)    # e = -0.2 (at the clip edge), n_steps 50: 1.009596 · (1 - 0.1) = 0.9086364
    assert ctl.value == pytest.approx(0.9086364)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=100)


def test_kl_controllers_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    for kl in (1.0, 9.0, 7.0):
        ctl.update(kl, 64)
    resumed = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
    ctl.update(3.0, 64)
    resumed.update(3.0, 64)
    assert resumed.value == ctl.value

    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_estimator_table_applies_each_paper_formula():
    """``estimate_advantages`` by name: the table entry is the formula function on the right inputs (KL folded into
    the group estimators' sequence reward as ``score − β·ΣKL``, their sequence advantage on every response token)."""
    from rlhf_lightning.advantages import ESTIMATORS, GROUP_ESTIMATORS, AdvantageInputs, estimate_advantages

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    scores, kl, values = torch.randn(4, dtype=F64), torch.rand(4, 4, dtype=F64) * mask, torch.randn(4, 4, dtype=F64)
    x = AdvantageInputs(scores, kl, mask, values, beta=0.1, group_size=2, gamma=0.9, lam=0.8, whiten=False)
    shaped = scores - 0.1 * kl.sum(-1)
    expected = {
        "gae": gae(token_rewards(scores, kl, mask, 0.1), values, mask, 0.9, 0.8),
        "grpo": (group_advantages(shaped, 2)[:, None] * mask, None),
        "dr_grpo": (group_advantages(shaped, 2, normalize_std=False)[:, None] * mask, None),
        "rloo": (rloo_advantages(shaped, 2)[:, None] * mask, None),
        "reinforce_pp": (reinforce_pp_advantages(scores, kl, mask, 0.1, 0.9), None),
        "reinforce_baseline": (reinforce_baseline_advantages(scores, kl, mask, 0.1, 2, 0.9), None),
    }
    assert set(ESTIMATORS) == set(expected) and set(GROUP_ESTIMATORS) < set(ESTIMATORS)
    for name, (advantages, returns) in expected.items():
        got_advantages, got_returns = estimate_advantages(name, x)
        torch.testing.assert_close(got_advantages, advantages)
        assert (got_returns is None) == (returns is None)
        if returns is not None:
            torch.testing.assert_close(got_returns, returns)
    whitened, _ = estimate_advantages("gae", AdvantageInputs(scores, kl, mask, values, 0.1, 2, 0.9, 0.8, whiten=True))
    torch.testing.assert_close(whitened, masked_whiten(expected["gae"][0], mask))
