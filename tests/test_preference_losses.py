"""Preference-optimisation losses checked against the formulas of their papers.

Every loss is checked three ways: on a small example whose value is worked out by hand (arithmetic in the
comments), on random inputs against a plain re-implementation of the paper's formula written here (values and
autograd gradients, float64), and where the derivative is simple, against a hand-derived analytic gradient.
"""

import math

import pytest
import torch

from rlhf_lightning.losses import (
    IGNORE_INDEX,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_odds_ratio_loss,
    pairwise_logexp_loss,
    pairwise_sigmoid_loss,
    preference_logits,
    sequence_log_probs,
    simpo_loss,
)

LN2, LN3, LN4 = math.log(2.0), math.log(3.0), math.log(4.0)
F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=True)


def random_leaves(n: int, size: int = 16, scale: float = 3.0, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(size, generator=gen, dtype=F64)).requires_grad_() for _ in range(n)]


def grads_of(fn, inputs: list[torch.Tensor], weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Autograd gradients of ``sum(weights * fn(*inputs))`` (a random weighting tests every output's gradient)."""
    out = fn(*inputs)
    total = out.sum() if weights is None else (weights * out).sum()
    return list(torch.autograd.grad(total, inputs))


def assert_same_values_and_grads(lib_fn, ref_fn, inputs: list[torch.Tensor], atol: float = 1e-10) -> None:
    lib_out, ref_out = lib_fn(*inputs), ref_fn(*inputs)
    assert lib_out.shape == ref_out.shape
    torch.testing.assert_close(lib_out, ref_out, atol=atol, rtol=1e-9)
    weights = torch.rand(lib_out.shape, generator=torch.Generator().manual_seed(123), dtype=F64) + 0.5
    for g_lib, g_ref in zip(grads_of(lib_fn, inputs, weights), grads_of(ref_fn, inputs, weights), strict=True):
        torch.testing.assert_close(g_lib, g_ref, atol=atol, rtol=1e-9)


# ---------------------------------------------------------------------------------- plain paper re-implementations
def ref_neg_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """-log σ(x) = log(1 + exp(-x)), written naively (fine in float64 for the moderate inputs used here)."""
    return torch.log(1 + torch.exp(-x))


def ref_h(pc, pr, rc, rr):
    """DPO implicit reward margin: log π(y_w)/π_ref(y_w) - log π(y_l)/π_ref(y_l)."""
    return (pc - rc) - (pr - rr)


# ------------------------------------------------------------------------------------------- sequence_log_probs
def test_sequence_log_probs_hand_computed_with_masked_positions():
    # V = 3. Probabilities chosen so log-softmax is hand-computable:
    #   softmax([0, ln2, 0])    = [1, 2, 1] / 4 -> label 1: 1/2
    #   softmax([ln3, 0, 0])    = [3, 1, 1] / 5 -> label 0: 3/5
    #   softmax([0, 0, 0])      = 1/3 each      -> label 2: 1/3
    #   softmax([ln4, 0, ln3])  = [4, 1, 3] / 8 -> label 2: 3/8
    # Row 0: three labelled tokens: sum = ln(1/2 · 3/5 · 1/3) = ln(1/10), mean = ln(1/10) / 3.
    # Row 1: positions 0 and 2 are -100 (their huge logits must not matter): sum = mean = ln(3/8).
    logits = torch.tensor([
        [[0.0, LN2, 0.0], [LN3, 0.0, 0.0], [0.0, 0.0, 0.0]],
        [[50.0, -50.0, 7.0], [LN4, 0.0, LN3], [-30.0, 30.0, 0.0]],
    ])
    labels = torch.tensor([[1, 0, 2], [IGNORE_INDEX, 2, IGNORE_INDEX]])
    summed = sequence_log_probs(logits, labels)
    averaged = sequence_log_probs(logits, labels, average=True)
    assert summed.shape == averaged.shape == (2,)
    torch.testing.assert_close(summed, torch.tensor([math.log(1 / 10), math.log(3 / 8)]), atol=1e-6, rtol=0)
    torch.testing.assert_close(averaged, torch.tensor([math.log(1 / 10) / 3, math.log(3 / 8)]), atol=1e-6, rtol=0)
    # Default is the sum.
    torch.testing.assert_close(sequence_log_probs(logits, labels, average=False), summed)


def test_sequence_log_probs_row_without_labels_is_zero_not_nan():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[IGNORE_INDEX] * 3, [1, 2, 3]])
    for average in (False, True):
        out = sequence_log_probs(logits, labels, average=average)
        assert torch.isfinite(out).all()
        assert out[0].item() == 0.0


@pytest.mark.parametrize("average", [False, True])
def test_sequence_log_probs_matches_loop_reference_and_analytic_gradient(average):
    torch.manual_seed(0)
    B, T, V = 3, 6, 7
    logits = (2 * torch.randn(B, T, V, dtype=F64)).requires_grad_()
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = IGNORE_INDEX  # prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    labels[2, 1] = IGNORE_INDEX  # a hole in the middle

    # Straightforward reference: loop over positions, log p = z_label - log Σ_v exp(z_v).
    expected = torch.zeros(B, dtype=F64)
    with torch.no_grad():
        for b in range(B):
            n = 0
            for s in range(T):
                if labels[b, s] != IGNORE_INDEX:
                    z = logits[b, s]
                    expected[b] += z[labels[b, s]] - torch.log(torch.exp(z).sum())
                    n += 1
            if average:
                expected[b] /= n
    out = sequence_log_probs(logits, labels, average=average)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-6)

    # Analytic gradient: d log p(label) / d z = onehot(label) - softmax(z) at labelled positions, 0 elsewhere;
    # divided by the row's number of labelled tokens when averaging.
    out.sum().backward()
    mask = labels != IGNORE_INDEX
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), V).to(F64)
    analytic = (onehot - torch.softmax(logits.detach(), -1)) * mask.unsqueeze(-1)
    if average:
        analytic = analytic / mask.sum(-1).to(F64).view(B, 1, 1)
    torch.testing.assert_close(logits.grad, analytic, atol=1e-6, rtol=1e-5)
    assert logits.grad[~mask].abs().max() == 0


# ------------------------------------------------------------------------------------------- reward-model losses
def test_pairwise_losses_hand_computed():
    # margin 0: pair 0 gap 2 - 1 = 1 -> -log σ(1) = log(1 + e^-1); pair 1 gap 0 -> -log σ(0) = ln 2.
    chosen, rejected = t(2.0, 0.0), t(1.0, 0.0)
    expected = (math.log1p(math.exp(-1.0)) + LN2) / 2
    assert pairwise_sigmoid_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-12)
    assert pairwise_logexp_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-12)
    # Per-pair margin m = [1, -ln3]: pair 0: 2 - 1 - 1 = 0 -> ln 2; pair 1: 0 - 0 + ln3 -> -log σ(ln3) = ln(4/3)
    # (σ(ln 3) = 3 / (3 + 1) = 3/4). Mean = (ln 2 + ln 4/3) / 2 = ln(8/3) / 2.
    margin = t(1.0, -LN3)
    expected = math.log(8 / 3) / 2
    assert pairwise_sigmoid_loss(chosen, rejected, margin).item() == pytest.approx(expected, abs=1e-12)
    assert pairwise_logexp_loss(chosen, rejected, margin).item() == pytest.approx(expected, abs=1e-12)
    # A scalar margin applies to every pair: m = 1 -> gaps [0, -1] -> (ln 2 + log(1 + e)) / 2.
    expected = (LN2 + math.log1p(math.e)) / 2
    assert pairwise_sigmoid_loss(chosen, rejected, 1.0).item() == pytest.approx(expected, abs=1e-12)
    assert pairwise_logexp_loss(chosen, rejected, 1.0).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("loss_fn", [pairwise_sigmoid_loss, pairwise_logexp_loss])
def test_pairwise_losses_match_bradley_terry_formula_and_gradient(loss_fn):
    chosen, rejected, margin = random_leaves(3, size=32, seed=1)
    margin = margin.detach().abs().requires_grad_()

    def ref(c, r, m):  # mean over pairs of -log P(c ≻ r) with P = σ(r_c - r_r - m); as log(1 + exp(r_r - r_c + m))
        return torch.log(1 + torch.exp(r - c + m)).mean()

    inputs = [chosen, rejected, margin]
    # atol 1e-8: F.softplus switches to the identity above x = 20, an error of log(1 + e^-20) ≈ 2e-9 per pair.
    torch.testing.assert_close(loss_fn(*inputs), ref(*inputs), atol=1e-8, rtol=1e-12)
    g_lib, g_ref = grads_of(loss_fn, inputs), grads_of(ref, inputs)
    for a, b in zip(g_lib, g_ref, strict=True):  # (softplus' gradient is exactly 1 above x = 20, not 1 - e^-20)
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-10)
    # Analytic: d/dr_c = -σ(-(r_c - r_r - m)) / B, d/dr_r = d/dm = +σ(-(r_c - r_r - m)) / B.
    s = torch.sigmoid(-(chosen - rejected - margin)).detach() / chosen.numel()
    torch.testing.assert_close(g_lib[0], -s)
    torch.testing.assert_close(g_lib[1], s)
    torch.testing.assert_close(g_lib[2], s)


def test_pairwise_sigmoid_and_logexp_are_the_same_function():
    chosen, rejected, margin = random_leaves(3, size=64, scale=10.0, seed=2)
    inputs = [chosen, rejected, margin]
    # atol 1e-8: F.softplus switches to the identity above x = 20, an error of log(1 + e^-20) ≈ 2e-9 per pair.
    torch.testing.assert_close(pairwise_sigmoid_loss(*inputs), pairwise_logexp_loss(*inputs), atol=1e-8, rtol=1e-12)
    for a, b in zip(grads_of(pairwise_sigmoid_loss, inputs), grads_of(pairwise_logexp_loss, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("loss_fn", [pairwise_sigmoid_loss, pairwise_logexp_loss])
def test_pairwise_losses_do_not_overflow_on_large_gaps(loss_fn, dtype):
    # r_r - r_c = 1000: log(1 + e^1000) = 1000 + log(1 + e^-1000) ≈ 1000 (naive exp(1000) is inf).
    chosen = torch.tensor([0.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([1000.0], dtype=dtype, requires_grad=True)
    loss = loss_fn(chosen, rejected)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1000.0, rel=1e-6)
    loss.backward()  # gradient -σ(1000) = -1 for chosen, +1 for rejected
    assert chosen.grad.item() == pytest.approx(-1.0) and rejected.grad.item() == pytest.approx(1.0)
    # Opposite direction: r_c - r_r = 1000 -> loss ≈ e^-1000 ≈ 0, finite and non-negative.
    loss = loss_fn(torch.tensor([1000.0], dtype=dtype), torch.tensor([0.0], dtype=dtype))
    assert torch.isfinite(loss) and 0 <= loss.item() < 1e-30
    # The margin enters inside the softplus as well: gap 0, m = 1000 -> ≈ 1000.
    loss = loss_fn(torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype), torch.full((1,), 1000.0, dtype=dtype))
    assert loss.item() == pytest.approx(1000.0, rel=1e-6)


# ------------------------------------------------------------------------------------------------- DPO family
# Hand example shared by the DPO tests:
#   policy_chosen = -1, policy_rejected = -3, ref_chosen = -2, ref_rejected = -2
#   h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2
def dpo_example() -> list[torch.Tensor]:
    return [leaf(-1.0), leaf(-3.0), leaf(-2.0), leaf(-2.0)]


def test_preference_logits_hand_computed_and_gradient():
    pc, pr, rc, rr = dpo_example()
    h = preference_logits(pc, pr, rc, rr)
    assert h.item() == 2.0
    h.backward()
    assert [x.grad.item() for x in (pc, pr, rc, rr)] == [1.0, -1.0, -1.0, 1.0]
    inputs = random_leaves(4, seed=3)
    assert_same_values_and_grads(preference_logits, ref_h, inputs)


def test_dpo_sigmoid_hand_computed():
    # β = ln(3)/2 -> βh = ln 3 -> σ(ln 3) = 3/4 -> loss = -ln(3/4) = ln(4/3) ≈ 0.2876820725.
    beta = LN3 / 2
    loss = dpo_loss(*dpo_example(), beta=beta, loss_type="sigmoid")
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    # Default loss_type is sigmoid.
    assert dpo_loss(*dpo_example(), beta=beta).item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    # β = 0.5 -> βh = 1 -> loss = log(1 + e^-1) ≈ 0.3132616875.
    assert dpo_loss(*dpo_example(), beta=0.5).item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "cdpo"])
def test_cdpo_label_smoothing_hand_computed(loss_type):
    # ε = 0.1, βh = ln 3: σ(βh) = 3/4, σ(-βh) = 1/4.
    # loss = -(0.9) ln(3/4) - 0.1 ln(1/4) = 0.9 ln(4/3) + 0.1 ln 4 ≈ 0.2589138653 + 0.1386294361 = 0.3975433014.
    loss = dpo_loss(*dpo_example(), beta=LN3 / 2, loss_type=loss_type, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log(4 / 3) + 0.1 * LN4, abs=1e-12)
    assert loss.item() == pytest.approx(0.3975433014, abs=1e-9)


def test_robust_dpo_hand_computed():
    # ε = 0.1, βh = ln 3: ℓ(βh) = -log σ(βh) = ln(4/3), ℓ(-βh) = -log σ(-βh) = ln 4.
    # loss = [(1-ε) ℓ(βh) - ε ℓ(-βh)] / (1 - 2ε) = (0.9 ln(4/3) - 0.1 ln 4) / 0.8
    #      ≈ (0.2589138653 - 0.1386294361) / 0.8 = 0.1202844292 / 0.8 = 0.1503555365.
    loss = dpo_loss(*dpo_example(), beta=LN3 / 2, loss_type="robust", label_smoothing=0.1)
    assert loss.item() == pytest.approx((0.9 * math.log(4 / 3) - 0.1 * LN4) / 0.8, abs=1e-12)
    assert loss.item() == pytest.approx(0.1503555365, abs=1e-9)
    # ε = 0 reduces to plain DPO.
    loss0 = dpo_loss(*dpo_example(), beta=LN3 / 2, loss_type="robust", label_smoothing=0.0)
    assert loss0.item() == pytest.approx(math.log(4 / 3), abs=1e-12)


def test_ipo_hand_computed():
    # h = 2. β = 0.1: 1/(2β) = 5 -> (2 - 5)² = 9.  β = 0.25: 1/(2β) = 2 -> 0.  β = 0.5: 1/(2β) = 1 -> 1.
    assert dpo_loss(*dpo_example(), beta=0.1, loss_type="ipo").item() == pytest.approx(9.0, abs=1e-12)
    assert dpo_loss(*dpo_example(), beta=0.25, loss_type="ipo").item() == pytest.approx(0.0, abs=1e-12)
    assert dpo_loss(*dpo_example(), beta=0.5, loss_type="ipo").item() == pytest.approx(1.0, abs=1e-12)


def test_hinge_hand_computed():
    # h = 2. β = 0.1: max(0, 1 - 0.2) = 0.8.  β = 1: max(0, 1 - 2) = 0.
    assert dpo_loss(*dpo_example(), beta=0.1, loss_type="hinge").item() == pytest.approx(0.8, abs=1e-12)
    assert dpo_loss(*dpo_example(), beta=1.0, loss_type="hinge").item() == 0.0


def test_dpo_sigmoid_gradient_is_minus_beta_sigma_of_minus_beta_h():
    # Rafailov et al. 2023, eq. 7: ∇L = -β σ(r̂(y_l) - r̂(y_w)) [∇ log π(y_w) - ∇ log π(y_l)], i.e.
    # d loss / d policy_chosen = -β σ(-βh) and d loss / d policy_rejected = +β σ(-βh).
    # Hand example: β = ln3/2, βh = ln 3, σ(-ln 3) = 1/4 -> d/d policy_chosen = -ln3/8 ≈ -0.1373265361.
    beta = LN3 / 2
    pc, pr, rc, rr = dpo_example()
    dpo_loss(pc, pr, rc, rr, beta=beta).sum().backward()
    assert pc.grad.item() == pytest.approx(-LN3 / 8, abs=1e-12)
    assert pr.grad.item() == pytest.approx(LN3 / 8, abs=1e-12)
    assert rc.grad.item() == pytest.approx(LN3 / 8, abs=1e-12)
    assert rr.grad.item() == pytest.approx(-LN3 / 8, abs=1e-12)
    # Random inputs.
    pc, pr, rc, rr = random_leaves(4, seed=4)
    beta = 0.3
    dpo_loss(pc, pr, rc, rr, beta=beta).sum().backward()
    h = ref_h(pc, pr, rc, rr).detach()
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-beta * h))
    torch.testing.assert_close(pr.grad, beta * torch.sigmoid(-beta * h))


def _ref_dpo(loss_type: str, beta: float, eps: float):
    def ref(pc, pr, rc, rr):
        z = beta * ref_h(pc, pr, rc, rr)
        if loss_type in ("sigmoid", "cdpo"):  # Rafailov et al. 2023; cDPO (Mitchell 2023) for ε > 0
            return (1 - eps) * ref_neg_log_sigmoid(z) + eps * ref_neg_log_sigmoid(-z)
        if loss_type == "robust":  # Chowdhury et al. 2024, eq. (6): [(1-ε) ℓ(θ; y_w, y_l) - ε ℓ(θ; y_l, y_w)] / (1-2ε)
            return ((1 - eps) * ref_neg_log_sigmoid(z) - eps * ref_neg_log_sigmoid(-z)) / (1 - 2 * eps)
        h = ref_h(pc, pr, rc, rr)
        if loss_type == "ipo":  # Azar et al. 2023: (h - 1/(2τ))²
            return (h - 1 / (2 * beta)) ** 2
        if loss_type == "hinge":  # SLiC-HF, Zhao et al. 2023: max(0, δ - βh) with δ = 1
            return torch.clamp(1 - beta * h, min=0)
        raise AssertionError(loss_type)

    return ref


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps"),
    [
        ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("sigmoid", 0.3, 0.2), ("cdpo", 0.1, 0.0), ("cdpo", 0.4, 0.25),
        ("robust", 0.1, 0.0), ("robust", 0.3, 0.1), ("robust", 0.5, 0.4),
        ("ipo", 0.1, 0.0), ("ipo", 1.0, 0.0), ("hinge", 0.1, 0.0), ("hinge", 0.7, 0.0),
    ],
)
def test_dpo_family_matches_paper_formulas_on_random_inputs(loss_type, beta, eps):
    inputs = random_leaves(4, size=32, scale=4.0, seed=5)

    def lib(pc, pr, rc, rr):
        return dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)

    assert_same_values_and_grads(lib, _ref_dpo(loss_type, beta, eps), inputs)


def test_dpo_family_analytic_gradients_wrt_h():
    # dL/dh on random h (policy_chosen = h, others 0), derived by hand:
    #   cDPO:   -(1-ε) β σ(-βh) + ε β σ(βh) = β (ε - σ(-βh))
    #   robust: -β [(1-ε) σ(-βh) + ε σ(βh)] / (1-2ε)
    #   ipo:    2 (h - 1/(2β))
    #   hinge:  -β where βh < 1, else 0
    beta, eps = 0.3, 0.15
    (h,) = random_leaves(1, size=32, scale=5.0, seed=6)
    zeros = torch.zeros_like(h)
    hd = h.detach()
    expected = {
        "sigmoid": beta * (eps - torch.sigmoid(-beta * hd)),
        "robust": -beta * ((1 - eps) * torch.sigmoid(-beta * hd) + eps * torch.sigmoid(beta * hd)) / (1 - 2 * eps),
        "ipo": 2 * (hd - 1 / (2 * beta)),
        "hinge": torch.where(beta * hd < 1, torch.full_like(hd, -beta), torch.zeros_like(hd)),
    }
    for loss_type, grad in expected.items():
        (g,) = torch.autograd.grad(dpo_loss(h, zeros, zeros, zeros, beta, loss_type, eps).sum(), h)
        torch.testing.assert_close(g, grad, msg=loss_type)


def test_cdpo_is_expected_dpo_loss_under_label_flips():
    # cDPO = DPO loss in expectation when the preference label is flipped with probability ε.
    pc, pr, rc, rr = random_leaves(4, seed=7)
    beta, eps = 0.2, 0.3
    clean = dpo_loss(pc, pr, rc, rr, beta=beta)
    flipped = dpo_loss(pr, pc, rr, rc, beta=beta)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, "sigmoid", eps), (1 - eps) * clean + eps * flipped)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, "cdpo", eps), (1 - eps) * clean + eps * flipped)


def test_robust_dpo_is_unbiased_under_label_flips():
    # Chowdhury et al. 2024, Lemma: if labels are flipped with probability ε, E[robust loss on noisy label]
    # equals the clean DPO loss: (1-ε) L̂(y_w, y_l) + ε L̂(y_l, y_w) = ℓ(βh).
    pc, pr, rc, rr = random_leaves(4, seed=8)
    beta = 0.2
    clean = dpo_loss(pc, pr, rc, rr, beta=beta)
    for eps in (0.05, 0.2, 0.45):
        robust = dpo_loss(pc, pr, rc, rr, beta, "robust", eps)
        robust_swapped = dpo_loss(pr, pc, rr, rc, beta, "robust", eps)
        torch.testing.assert_close((1 - eps) * robust + eps * robust_swapped, clean)


@pytest.mark.parametrize("eps", [0.5, 0.6, 1.0, -0.1])
def test_robust_dpo_rejects_invalid_label_smoothing(eps):
    with pytest.raises(ValueError):
        dpo_loss(*dpo_example(), beta=0.1, loss_type="robust", label_smoothing=eps)


@pytest.mark.parametrize("loss_type", ["unknown", "SIGMOID", "kto", ""])
def test_dpo_unknown_loss_type_raises(loss_type):
    with pytest.raises(ValueError):
        dpo_loss(*dpo_example(), beta=0.1, loss_type=loss_type)


# ------------------------------------------------------------------------------------------------------- KTO
def test_kto_reference_point_hand_computed_clamped_and_detached():
    # Mismatched log-ratios [-2 - -3, -3 - -3, -1 - -2] = [1, 0, 1] -> mean 2/3.
    policy = leaf(-2.0, -3.0, -1.0)
    z0 = kto_reference_point(policy, t(-3.0, -3.0, -2.0))
    assert z0.item() == pytest.approx(2 / 3, abs=1e-12)
    assert z0.dim() == 0
    assert not z0.requires_grad and z0.grad_fn is None
    # Log-ratios [-3 - -2, -3 - -2.5] = [-1, -0.5] -> mean -0.75 -> clamped to max(0, -0.75) = 0.
    policy = leaf(-3.0, -3.0)
    z0 = kto_reference_point(policy, t(-2.0, -2.5))
    assert z0.item() == 0.0
    assert not z0.requires_grad


def test_kto_loss_hand_computed():
    # β = 1, z0 = 0.5, λ_D = 2, λ_U = 1.5; σ(ln 3) = 3/4, σ(-ln 3) = 1/4.
    #   desirable,   r = 0.5 + ln3: λ_D (1 - σ(ln 3))  = 2 · 1/4   = 0.5
    #   undesirable, r = 0.5 + ln3: λ_U (1 - σ(-ln 3)) = 1.5 · 3/4 = 1.125
    #   undesirable, r = 0.5 - ln3: λ_U (1 - σ(ln 3))  = 1.5 · 1/4 = 0.375
    #   desirable,   r = 0.5:       λ_D (1 - σ(0))     = 2 · 1/2   = 1.0
    r = t(0.5 + LN3, 0.5 + LN3, 0.5 - LN3, 0.5)
    ref_logps = t(-4.0, -1.0, -2.0, -3.0)
    policy_logps = ref_logps + r
    z0 = torch.tensor(0.5, dtype=F64)
    expected = [0.5, 1.125, 0.375, 1.0]
    for desirable in (torch.tensor([True, False, False, True]), torch.tensor([1, 0, 0, 1])):
        loss = kto_loss(policy_logps, ref_logps, desirable, z0, beta=1.0, desirable_weight=2.0,
                        undesirable_weight=1.5)
        assert loss.tolist() == pytest.approx(expected, abs=1e-12)


def test_kto_loss_matches_paper_formula_and_analytic_gradient():
    torch.manual_seed(9)
    policy, ref = random_leaves(2, size=32, seed=9)
    desirable = torch.rand(32) < 0.5
    z0 = torch.tensor(0.7, dtype=F64)
    beta, lam_d, lam_u = 0.3, 1.3, 0.8

    def lib(p, q):
        return kto_loss(p, q, desirable, z0, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)

    def paper(p, q):  # Ethayarajh et al. 2024: v = λ_D σ(β(r - z0)) or λ_U σ(β(z0 - r)); loss = λ_y - v
        r = p - q
        v = torch.where(desirable, lam_d / (1 + torch.exp(-beta * (r - z0))), lam_u / (1 + torch.exp(-beta * (z0 - r))))
        lam = torch.where(desirable, torch.full_like(r, lam_d), torch.full_like(r, lam_u))
        return lam - v

    assert_same_values_and_grads(lib, paper, [policy, ref])
    # Analytic: with x = β(r - z0), d/dr of λ_D(1 - σ(x)) = -λ_D β σ(x)σ(-x); of λ_U(1 - σ(-x)) = +λ_U β σ(x)σ(-x).
    (g,) = torch.autograd.grad(lib(policy, ref).sum(), policy)
    x = beta * (policy - ref).detach() - beta * z0
    s = torch.sigmoid(x) * torch.sigmoid(-x)
    torch.testing.assert_close(g, torch.where(desirable, -lam_d * beta * s, lam_u * beta * s))


def test_kto_reference_point_carries_no_gradient_into_the_loss():
    # Policy log-probs of matched and mismatched completions come from the same parameter θ; the KTO gradient must
    # treat z0 as a constant, so it equals the gradient with z0 computed under no_grad.
    torch.manual_seed(10)
    theta = torch.randn(8, dtype=F64, requires_grad=True)
    feats, feats_mm = torch.randn(4, 8, dtype=F64), torch.randn(4, 8, dtype=F64)
    ref, ref_mm = torch.randn(4, dtype=F64) - 3, torch.randn(4, dtype=F64) - 6  # ref_mm low -> mean KL > 0
    desirable = torch.tensor([True, False, True, False])

    def total(z0_fn):
        policy, policy_mm = feats @ theta - 3, feats_mm @ theta - 3
        z0 = z0_fn(policy_mm)
        return kto_loss(policy, ref, desirable, z0, beta=0.5).sum(), z0

    loss, z0 = total(lambda p_mm: kto_reference_point(p_mm, ref_mm))
    assert z0.item() > 0  # not clamped here, so a gradient would exist if z0 were not detached
    (g_lib,) = torch.autograd.grad(loss, theta)
    with torch.no_grad():
        z0_const = (feats_mm @ theta - 3 - ref_mm).mean().clamp(min=0)
    loss_ref, _ = total(lambda p_mm: z0_const)
    (g_ref,) = torch.autograd.grad(loss_ref, theta)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(g_lib, g_ref)


# ----------------------------------------------------------------------------------------------------- SimPO
def test_simpo_hand_computed():
    # β = 2, γ = 0.5, avg_w = -0.5, avg_l = -1: 2·(-0.5) - 2·(-1) - 0.5 = 0.5 -> -log σ(0.5) = log(1 + e^-0.5)
    # ≈ 0.4740769842.
    loss = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.5)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-12)
    # Defaults are β = 2, γ = 0.5 (the same numbers).
    assert simpo_loss(t(-0.5), t(-1.0)).item() == pytest.approx(0.4740769842, abs=1e-9)
    # β = 1, γ = 0, avg_w - avg_l = ln 3 -> -log σ(ln 3) = ln(4/3).
    assert simpo_loss(t(LN3 - 2.0), t(-2.0), beta=1.0, gamma=0.0).item() == pytest.approx(math.log(4 / 3))


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.5), (2.5, 1.4), (10.0, 3.0), (1.0, 0.0)])
def test_simpo_matches_paper_formula_and_analytic_gradient(beta, gamma):
    chosen, rejected = random_leaves(2, size=32, scale=1.0, seed=11)
    chosen, rejected = (-chosen.detach().abs()).requires_grad_(), (-rejected.detach().abs()).requires_grad_()

    def lib(w, rej):
        return simpo_loss(w, rej, beta=beta, gamma=gamma)

    def paper(w, rej):  # Meng et al. 2024, eq. 6: -log σ(β/|y_w| log π(y_w) - β/|y_l| log π(y_l) - γ)
        return ref_neg_log_sigmoid(beta * w - beta * rej - gamma)

    assert_same_values_and_grads(lib, paper, [chosen, rejected])
    # Analytic: d/d avg_w = -β σ(-z), d/d avg_l = +β σ(-z), z = β(avg_w - avg_l) - γ.
    g_w, g_l = torch.autograd.grad(lib(chosen, rejected).sum(), [chosen, rejected])
    s = torch.sigmoid(-(beta * (chosen - rejected) - gamma)).detach()
    torch.testing.assert_close(g_w, -beta * s)
    torch.testing.assert_close(g_l, beta * s)


# ------------------------------------------------------------------------------------------------------ ORPO
def test_orpo_odds_ratio_hand_computed():
    # P_w = 1/2 -> odds 1 -> log odds 0; P_l = 1/4 -> odds (1/4)/(3/4) = 1/3 -> log odds -ln 3.
    # loss = -log σ(0 - (-ln 3)) = -log σ(ln 3) = -log(3/4) = ln(4/3) ≈ 0.2876820725.
    chosen, rejected = leaf(math.log(0.5)), leaf(math.log(0.25))
    loss = orpo_odds_ratio_loss(chosen, rejected)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    # Gradient: d log odds / d log P = 1 + P/(1-P) = 1/(1-P), and d(-log σ(x))/dx = -σ(-x) = -1/4 here, so
    #   d loss / d log P_w = -1/4 · 1/(1 - 1/2) = -1/2,   d loss / d log P_l = +1/4 · 1/(1 - 1/4) = +1/3.
    loss.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.5, abs=1e-12)
    assert rejected.grad.item() == pytest.approx(1 / 3, abs=1e-12)


def test_orpo_odds_ratio_matches_paper_formula_and_analytic_gradient():
    gen = torch.Generator().manual_seed(12)
    # Per-token mean log-probs in [-4, -0.01], i.e. P in (0.018, 0.99).
    chosen = (-0.01 - 3.99 * torch.rand(32, generator=gen, dtype=F64)).requires_grad_()
    rejected = (-0.01 - 3.99 * torch.rand(32, generator=gen, dtype=F64)).requires_grad_()

    def paper(w, rej):  # Hong et al. 2024, eq. 7-8: -log σ(log(odds(y_w) / odds(y_l))), odds = P / (1 - P)
        p_w, p_l = torch.exp(w), torch.exp(rej)
        return ref_neg_log_sigmoid(torch.log((p_w / (1 - p_w)) / (p_l / (1 - p_l))))

    assert_same_values_and_grads(orpo_odds_ratio_loss, paper, [chosen, rejected], atol=1e-9)
    # Analytic: x = log odds_w - log odds_l; d/d log P_w = -σ(-x)/(1 - P_w), d/d log P_l = +σ(-x)/(1 - P_l).
    g_w, g_l = torch.autograd.grad(orpo_odds_ratio_loss(chosen, rejected).sum(), [chosen, rejected])
    p_w, p_l = chosen.detach().exp(), rejected.detach().exp()
    s = torch.sigmoid(-(torch.log(p_w / (1 - p_w)) - torch.log(p_l / (1 - p_l))))
    torch.testing.assert_close(g_w, -s / (1 - p_w))
    torch.testing.assert_close(g_l, s / (1 - p_l))


def test_orpo_odds_ratio_is_symmetric_and_zero_gap_gives_ln2():
    # Equal likelihoods -> log odds ratio 0 -> -log σ(0) = ln 2; swapping chosen/rejected flips the sign of the
    # odds-ratio logit: L(w, l) - L(l, w) = -x for x = log odds ratio (since -log σ(x) + log σ(-x) = -x).
    a = t(-0.3, -1.7, -2.2)
    torch.testing.assert_close(orpo_odds_ratio_loss(a, a), torch.full((3,), LN2, dtype=F64))
    b = t(-1.1, -0.2, -3.0)
    x = (a - torch.log1p(-a.exp())) - (b - torch.log1p(-b.exp()))
    torch.testing.assert_close(orpo_odds_ratio_loss(a, b) - orpo_odds_ratio_loss(b, a), -x)
