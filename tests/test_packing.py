"""Padding-free packing (``data.init_args.packing``) and token-budget micro-batches: packed and padded batches give
the same losses and gradients (SFT, DPO, reward model, KTO's log-probs), samples never attend to each other, the
micro-batch plan is deterministic, resumable and equal across ranks, and a packed ``fit`` learns."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, base_args, metric_series, read_metrics, run_cli, write_jsonl

from rlhf_lightning.algorithms import DPO, SFT, RewardModel
from rlhf_lightning.data import PreferenceDataModule, SFTDataModule, UnpairedPreferenceDataModule
from rlhf_lightning.data.collate import IGNORE_INDEX, SFTCollator
from rlhf_lightning.data.packing import PackedBatchSampler, plan_micro_batches
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.logprobs import count_tokens, label_log_probs, num_sequences, sequence_logps
from rlhf_lightning.losses import sft_nll, shift_labels

REVERSE = REPO / "examples" / "data" / "reverse"


def setup_dm(cls, path, shuffle=False, **kwargs):
    dm = cls(path=str(path), tokenizer="tiny-llama", shuffle=shuffle, **kwargs)
    dm.setup("fit")
    return dm


def padded_and_packed(dm, n: int) -> tuple[dict, dict]:
    """The first ``n`` training samples as one padded and one packed batch."""
    rows = [dm.train_dataset[i] for i in range(n)]
    return dm.collate_fn()(rows), dm.collate_fn(packing=True)(rows)


def loss_and_grads(module, loss_fn, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad()
    loss = loss_fn(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict]) -> None:
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ batch layout
def test_packed_row_restarts_positions_and_never_predicts_across_samples():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = SFTCollator(pad_token_id=0, packing=True)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1]]
    # the second sample's first token (8) is nobody's target: sample 1's last token must not predict it
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert shift_labels(batch["labels"]).tolist() == [[6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]
    padded = SFTCollator(pad_token_id=0)(rows)
    assert count_tokens(batch) == count_tokens(padded) == 5  # throughput counts real tokens, not padding
    assert num_sequences(batch) == num_sequences(padded) == 2


def test_no_attention_across_packed_samples(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    collate = SFTCollator(pad_token_id=0, packing=True)
    a, b = list(range(10, 22)), list(range(40, 49))
    logps = [sequence_logps(model, collate([{"input_ids": x, "labels": x}, {"input_ids": b, "labels": b}]))["sum"]
             for x in (a, list(range(60, 75)))]
    assert (logps[0][0] - logps[1][0]).abs() > 1e-3  # sample A changed...
    torch.testing.assert_close(logps[0][1], logps[1][1], atol=1e-6, rtol=1e-6)  # ...sample B did not notice
    alone = sequence_logps(model, collate([{"input_ids": b, "labels": b}]))["sum"]
    torch.testing.assert_close(logps[0][1], alone[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------- packed == padded (fp32)
def test_sft_packed_and_padded_losses_and_gradients_agree(tiny_model_dir):
    dm = setup_dm(SFTDataModule, REVERSE / "sft.jsonl", max_samples=6, packing=True)
    padded, packed = padded_and_packed(dm, 6)
    assert padded["attention_mask"].eq(0).any()  # the padded batch really has padding
    torch.manual_seed(0)
    module = SFT(model=str(tiny_model_dir))
    module.configure_model()

    def full_logits_nll(batch):  # the reference: the original loss on full padded logits
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sft_nll(logits, shift_labels(batch["labels"]))

    reference = loss_and_grads(module, full_logits_nll, padded)
    assert_same(reference, loss_and_grads(module, lambda b: module._common_step(b)[0], padded))
    assert_same(reference, loss_and_grads(module, lambda b: module._common_step(b)[0], packed))

    class FullLogitsSFT(SFT):  # an overridden compute_loss still gets full logits, packed or not
        def compute_loss(self, logits, labels):
            return sft_nll(logits, labels)

    custom = FullLogitsSFT(model=str(tiny_model_dir))
    custom.model = module.model
    assert_same(reference, loss_and_grads(module, lambda b: custom._common_step(b)[0], packed))


def test_dpo_packed_and_padded_losses_and_gradients_agree(tiny_model_dir):
    dm = setup_dm(PreferenceDataModule, REVERSE / "preference.jsonl", max_samples=4, packing=True)
    padded, packed = padded_and_packed(dm, 4)
    assert num_sequences(packed) == 8  # chosen and rejected of each pair are separate segments
    module = DPO(model=str(tiny_model_dir), beta=0.5)
    module.configure_model()
    with torch.no_grad():  # move the policy away from the reference so the loss is not at its symmetric point
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    padded_result = loss_and_grads(module, lambda b: module.compute_loss(b, "train")[0], padded)
    assert_same(padded_result, loss_and_grads(module, lambda b: module.compute_loss(b, "train")[0], packed))
    assert padded_result[0] != torch.tensor(0.5).log().neg()


def test_reward_model_packed_and_padded_losses_and_gradients_agree(tiny_model_dir):
    dm = setup_dm(PreferenceDataModule, REVERSE / "preference.jsonl", max_samples=4, packing=True)
    padded, packed = padded_and_packed(dm, 4)
    torch.manual_seed(0)
    module = RewardModel(model=str(tiny_model_dir))
    module.configure_model()
    result = loss_and_grads(module, lambda b: module.compute_loss(b, "train")[0], padded)
    assert_same(result, loss_and_grads(module, lambda b: module.compute_loss(b, "train")[0], packed))
    assert any("score" in name for name in result[1])  # the head got gradient from the last-token rewards


def test_kto_packed_batch_scores_matched_and_mismatched_like_padded(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    dm = setup_dm(UnpairedPreferenceDataModule, REVERSE / "unpaired.jsonl", max_samples=3, packing=True)
    padded, packed = padded_and_packed(dm, 3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.testing.assert_close(sequence_logps(model, packed)["sum"], sequence_logps(model, padded)["sum"],
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(packed["desirable"], padded["desirable"])


# ------------------------------------------------------------------------------------ token-budget batches
def test_token_budget_plan_respects_budget_and_covers_every_sample_once():
    lengths = [5, 9, 3, 7, 7, 2, 10, 1]
    batches = plan_micro_batches(list(range(8)), lengths, batch_size=4, max_tokens=12)
    assert batches == [[0], [1, 2], [3], [4, 5], [6, 7]]
    assert plan_micro_batches(list(range(8)), lengths, batch_size=3, max_tokens=None) == [[0, 1, 2], [3, 4, 5],
                                                                                          [6, 7]]
    dataset = list(range(40))
    lengths = [1 + (7 * i) % 11 for i in range(40)]
    one = PackedBatchSampler(dataset, lengths, 4, max_tokens=20, shuffle=True, seed=3)
    epoch0 = list(one)
    assert sorted(i for b in epoch0 for i in b) == dataset
    assert all(sum(lengths[i] for i in b) <= 20 for b in epoch0)
    assert epoch0 == list(PackedBatchSampler(dataset, lengths, 4, max_tokens=20, shuffle=True, seed=3))
    one.set_epoch(1)
    assert list(one) != epoch0 and len(one) == len(list(one))
    ranks = [list(PackedBatchSampler(dataset, lengths, 4, 20, None, num_replicas=3, rank=r, seed=3))
             for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # every rank steps the same number of times
    assert {i for r in ranks for b in r for i in b} == set(dataset)


def test_packed_loader_resumes_mid_epoch():
    dm = setup_dm(SFTDataModule, REVERSE / "sft.jsonl", shuffle=True, max_samples=40, packing=True,
                  max_tokens_per_batch=100, val_split=0.2)
    full = [b["input_ids"] for b in dm.train_dataloader()]
    assert all(ids.shape[0] == 1 and ids.shape[1] <= 100 for ids in full) and len(full) > 4
    assert sum(ids.shape[1] for ids in full) == sum(len(ids) for ids in dm.train_dataset["input_ids"])
    assert "segment_ids" in next(iter(dm.val_dataloader()))  # validation is packed too...
    assert "attention_mask" in next(iter(dm.predict_dataloader()))  # ...predict keeps one padded row per sample
    first = dm.train_dataloader()
    it = iter(first)
    for _ in range(2):
        next(it)
    state = first.state_dict()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:], strict=True))


def test_packing_option_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"max_tokens_per_batch=64 needs data.init_args.packing=true"):
        SFTDataModule(path="x.jsonl", max_tokens_per_batch=64)
    with pytest.raises(ConfigError, match=r"max_tokens_per_batch=0 must be >= 1"):
        PreferenceDataModule(path="x.jsonl", packing=True, max_tokens_per_batch=0)
    with pytest.raises(ConfigError, match=r"max_tokens_per_batch is not supported by UnpairedPreferenceDataModule"):
        UnpairedPreferenceDataModule(path="x.jsonl", packing=True, max_tokens_per_batch=64)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"input": "hi", "output": "ho"},
                                                {"input": "a " * 40, "output": "b " * 40}])
    dm = setup_dm(SFTDataModule, path, packing=True, max_tokens_per_batch=32)
    with pytest.raises(ConfigError, match=r"max_tokens_per_batch=32 is smaller than the sample at .*sft.jsonl line 2 "
                                          r"\(\d+ tokens\): raise it to at least \d+"):
        dm.train_dataloader()


# ------------------------------------------------------------------------------------------------ end to end
def test_packed_sft_fit_learns(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "packed"
    config = REPO / "configs" / "tiny" / "sft_packed.yaml"
    run_cli(base_args(run_dir, tiny_model_dir, data=REVERSE / "sft.jsonl", config=config)
            + ["--trainer.max_epochs", "2", "--data.init_args.max_samples", "600"])
    rows = read_metrics(run_dir)
    losses = metric_series(rows, "train/loss")
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert metric_series(rows, "train/tokens_per_sec")[-1] > 0
    samples = metric_series(rows, "train/samples_per_sec")
    assert samples and metric_series(rows, "val/loss")


def test_label_log_probs_equal_full_logits_path(tiny_model_dir):
    """The response-only path (LM head on labelled positions, chunked) equals log-softmax of the full logits."""
    from transformers import AutoModelForCausalLM

    from rlhf_lightning.losses import token_log_probs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    dm = setup_dm(SFTDataModule, REVERSE / "sft.jsonl", max_samples=4)
    batch = dm.collate_fn()([dm.train_dataset[i] for i in range(4)])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = token_log_probs(logits, shift_labels(batch["labels"]), temperature=0.7)
    got = label_log_probs(model, batch, temperature=0.7, chunk_size=5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_label_log_probs_and_entropy_equal_full_logits_path_values_and_gradients(tiny_model_dir):
    """The PPO update's path (log-probs and entropy from one chunked pass of the head over the response) equals
    token_log_probs and entropy_from_logits on the full logits at the sampling temperature, gradients included."""
    from transformers import AutoModelForCausalLM

    from rlhf_lightning.logprobs import label_log_probs_and_entropy
    from rlhf_lightning.losses import entropy_from_logits, token_log_probs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dm = setup_dm(SFTDataModule, REVERSE / "sft.jsonl", max_samples=4)
    batch = dm.collate_fn()([dm.train_dataset[i] for i in range(4)])
    mask = shift_labels(batch["labels"]) != IGNORE_INDEX
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))

    def run(full: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        if full:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits / 0.7
            logps, entropy = token_log_probs(logits, shift_labels(batch["labels"])), entropy_from_logits(logits) * mask
        else:
            logps, entropy = label_log_probs_and_entropy(model, batch, temperature=0.7, chunk_size=5)
        ((logps - 0.1 * entropy) * weights).sum().backward()
        return logps.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]

    (logps, entropy, grads), (want_logps, want_entropy, want_grads) = run(full=False), run(full=True)
    torch.testing.assert_close(logps, want_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
    assert entropy[mask].min() > 0 and (entropy[~mask] == 0).all()
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_pack_rows_of_a_padded_batch_give_the_padded_log_probs(tiny_model_dir):
    """PPO's update packs its right-padded micro-batches on the fly (``pack_rows``); unpacked, the log-probs equal
    the padded forward's at every position, and padding gets 0."""
    from transformers import AutoModelForCausalLM

    from rlhf_lightning.data.collate import pad_sequences
    from rlhf_lightning.logprobs import pack_rows, unpack_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = [(list(range(10, 22)), 5), (list(range(40, 47)), 3), (list(range(60, 69)), 4)]  # (tokens, prompt length)
    batch = {"input_ids": pad_sequences([ids for ids, _ in rows], 0),
             "attention_mask": pad_sequences([[1] * len(ids) for ids, _ in rows], 0),
             "labels": pad_sequences([[IGNORE_INDEX] * n + ids[n:] for ids, n in rows], IGNORE_INDEX)}
    packed = pack_rows(batch)
    assert packed["input_ids"].shape == (1, sum(len(ids) for ids, _ in rows))
    got = unpack_rows(label_log_probs(model, packed), batch["attention_mask"])
    torch.testing.assert_close(got, label_log_probs(model, batch), atol=1e-5, rtol=1e-5)
    assert (got[batch["attention_mask"] == 0] == 0).all()
    assert (got != 0).sum() == sum(len(ids) - n for ids, n in rows)  # every response token, nothing else


def test_packed_dpo_fit_with_cached_reference_rises_margin(tmp_path, tiny_model_dir):
    """DPO on packed token-budget batches, reference log-probs precomputed (the cache is keyed by pair index, so
    packed rows read it in their chosen-then-rejected segment order): the loss falls, the reward margin rises."""
    run_dir = tmp_path / "dpo"
    run_cli(base_args(run_dir, tiny_model_dir, data=REVERSE / "preference.jsonl",
                      config=REPO / "configs" / "tiny" / "dpo.yaml")
            + ["--trainer.max_epochs", "2", "--data.init_args.max_samples", "160", "--data.init_args.packing", "true",
               "--data.init_args.max_tokens_per_batch", "640", "--model.init_args.optimizer.init_args.lr", "1e-3"])
    rows = read_metrics(run_dir)
    losses, margins = metric_series(rows, "train/loss"), metric_series(rows, "train/margin")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 and sum(margins[-3:]) > sum(margins[:3]), (losses, margins)


def test_loss_and_score_forwards_build_no_kv_cache(tiny_model_dir, monkeypatch):
    """A loss or scoring forward must not build transformers' KV cache (its default): the cache copies every
    layer's keys and values and, per layer, creates a device tensor from the host, which stalls a GPU's queue
    (SFT ran at 0.82x TRL on an H200 with it)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.cache_utils import Cache

    from rlhf_lightning.models import last_token_rewards

    def refuse(*args, **kwargs):
        raise AssertionError("a KV cache was built in a loss/scoring forward")

    monkeypatch.setattr(Cache, "update", refuse)
    collate = SFTCollator(pad_token_id=0)
    batch = collate([{"input_ids": list(range(10, 22)), "labels": [-100] * 4 + list(range(14, 22))},
                     {"input_ids": list(range(40, 49)), "labels": list(range(40, 49))}])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    label_log_probs(model, batch).sum().backward()  # the SFT/DPO path: backbone + chunked head
    sequence_logps(model, collate([{"input_ids": list(range(5, 15)), "labels": list(range(5, 15))}]))
    scorer = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    last_token_rewards(scorer, batch["input_ids"], batch["attention_mask"])
    with pytest.raises(AssertionError, match="KV cache"):  # the check itself bites on a default forward
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
