import math

import torch

from rlhf_lightning.losses import IGNORE_INDEX, masked_mean, sft_nll, shift_labels, token_log_probs


def test_masked_mean_matches_hand_computation():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert masked_mean(values, mask).item() == (1 + 2 + 6) / 3
    assert torch.allclose(masked_mean(values, mask, dim=1), torch.tensor([1.5, 6.0]))


def test_shift_labels_aligns_targets_with_next_token_logits():
    labels = torch.tensor([[IGNORE_INDEX, 7, 8, 9]])
    assert shift_labels(labels).tolist() == [[7, 8, 9, IGNORE_INDEX]]


def test_token_log_probs_equals_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = IGNORE_INDEX
    expected = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = expected.masked_fill(labels == IGNORE_INDEX, 0.0)
    assert torch.allclose(token_log_probs(logits, labels), expected, atol=1e-6)


def test_sft_nll_is_mean_negative_log_likelihood_over_labelled_tokens():
    # Two labelled tokens with hand-computable probabilities: p = softmax([ln 3, 0])[0] = 3/4, and 1/2.
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[0, 1, IGNORE_INDEX]])
    expected = -(math.log(3 / 4) + math.log(1 / 2)) / 2
    assert abs(sft_nll(logits, labels).item() - expected) < 1e-6


def test_sft_nll_gradient_flows_only_through_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 5]])
    sft_nll(logits, labels).backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 2].abs().sum() == 0
    assert logits.grad[0, 1].abs().sum() > 0 and logits.grad[0, 3].abs().sum() > 0


def test_float64_inputs_keep_float64_precision_and_half_inputs_are_upcast():
    # 1e-12 differences survive in float64 and vanish in float32: the losses must not cast float64 down.
    logits = torch.tensor([[[0.0, 1e-12], [1e-12, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[1, 0]])
    logps = token_log_probs(logits, labels)
    assert logps.dtype == torch.float64
    assert torch.allclose(logps, torch.log_softmax(logits, -1)[0, [0, 1], [1, 0]].unsqueeze(0), atol=0, rtol=1e-15)
    assert (logps - math.log(0.5)).abs().max() > 1e-14  # float32 would round both to exactly log(1/2)
    nll = sft_nll(logits, labels)
    assert nll.dtype == torch.float64 and abs(nll.item() + logps.mean().item()) < 1e-15
    for half in (torch.float16, torch.bfloat16):
        assert token_log_probs(logits.to(half), labels).dtype == torch.float32
        assert sft_nll(logits.to(half), labels).dtype == torch.float32
