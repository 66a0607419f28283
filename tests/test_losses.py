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


# ------------------------------------------------------------------------- response-only, chunked log-probs
def test_selective_log_probs_equal_full_log_softmax_values_and_gradients():
    from rlhf_lightning.losses import selective_log_probs

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    weights = torch.randn(37)  # a non-uniform upstream gradient, as from a DPO loss

    def grads(logps):
        hidden.grad, head.weight.grad = None, None
        (weights * logps).sum().backward()
        return hidden.grad.clone(), head.weight.grad.clone()

    expected = torch.log_softmax(head(hidden) / 0.8, -1).gather(-1, labels[:, None]).squeeze(-1)
    expected_grads = grads(expected)
    for chunk_size in (5, 37, 100):  # several chunks (recomputed in backward), exactly one, and more than needed
        got = selective_log_probs(hidden, head, labels, chunk_size=chunk_size, temperature=0.8)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for g, e in zip(grads(got), expected_grads, strict=True):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_selective_log_probs_never_hold_the_full_logits():
    """On a long sequence with a big vocabulary, the head only ever produces (chunk, V) blocks, and what autograd
    keeps for backward is a small fraction of the (tokens, V) logits that the unchunked computation keeps."""
    from rlhf_lightning.losses import selective_log_probs

    tokens, vocab, chunk = 2048, 8192, 128
    head = torch.nn.Linear(32, vocab, bias=False)
    shapes = []
    head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    hidden = torch.randn(tokens, 32, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))

    def saved_elements(chunk_size):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logps = selective_log_probs(hidden, head, labels, chunk_size=chunk_size)
        logps.sum().backward()
        return sum(saved)

    chunked = saved_elements(chunk)
    assert max(rows for rows, _ in shapes) == chunk and all(v == vocab for _, v in shapes)
    full = saved_elements(tokens)
    assert full >= tokens * vocab  # the plain computation keeps (at least) the whole logits tensor
    assert chunked < tokens * vocab / 50, (chunked, full)
