"""Preference data, reward model and the DPO family end to end on the tiny model."""


import json

import pytest
import torch
from conftest import (
    REPO,
    base_args,
    load_weights,
    metric_series,
    read_metrics,
    run_cli,
    run_cli_subprocess,
    write_jsonl,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_lightning.algorithms.preference import sequence_logps
from rlhf_lightning.data import PreferenceDataModule, UnpairedPreferenceDataModule
from rlhf_lightning.data.collate import IGNORE_INDEX
from rlhf_lightning.errors import ConfigError, DataError

CONFIGS = REPO / "configs" / "tiny"


@pytest.fixture(scope="module")
def easy_pairs(tmp_path_factory):
    """A preference a tiny model learns in a few dozen steps: the correct sum over a refusal."""
    rows = [{"prompt": f"What is {i % 50} + {i % 7}?", "chosen": str(i % 50 + i % 7), "rejected": "no idea",
             "margin": 0.5} for i in range(160)]
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def easy_unpaired(tmp_path_factory):
    rows = [{"prompt": f"What is {i % 50} + {i % 7}?", "completion": str(i % 50 + i % 7) if i % 2 else "no idea",
             "label": bool(i % 2)} for i in range(160)]
    return write_jsonl(tmp_path_factory.mktemp("kto") / "unpaired.jsonl", rows)


def datamodule(path, cls=PreferenceDataModule, **kwargs):
    dm = cls(path=str(path), tokenizer="tiny-llama", **kwargs)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------------------ data
def test_pair_batch_layout_and_response_only_labels(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 2?", "chosen": "3", "rejected": "4"}])
    dm = datamodule(path, shuffle=False)
    row = dm.train_dataset[0]
    tok = dm.tokenizer
    assert tok.decode(row["prompt_ids"]) == "<|bos|><|user|>What is 1 + 2?<|end|><|assistant|>"
    assert tok.decode(row["chosen_ids"]) == "3<|end|>" and tok.decode(row["rejected_ids"]) == "4<|end|>"
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2  # chosen row, then rejected row
    labelled = [tok.decode(ids[labels != IGNORE_INDEX]) for ids, labels in zip(batch["input_ids"], batch["labels"],
                                                                                 strict=True)]
    assert labelled == ["3<|end|>", "4<|end|>"]


def test_full_chats_without_prompt_column(tmp_path):
    user = {"role": "user", "content": "What is 1 + 2?"}
    path = write_jsonl(tmp_path / "c.jsonl", [{"chosen": [user, {"role": "assistant", "content": "3"}],
                                                "rejected": [user, {"role": "assistant", "content": "5"}]}])
    row = datamodule(path).train_dataset[0]
    assert datamodule(path).tokenizer.decode(row["chosen_ids"]) == "3<|end|>"


def test_prompt_is_left_truncated_and_responses_never_cut(tmp_path):
    rows = [{"prompt": "word " * 40 + "What is 1 + 2?", "chosen": "3", "rejected": "4"},
            {"prompt": "Hi", "chosen": "x " * 40, "rejected": "4"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.warns(UserWarning, match=r"2/2 samples exceed max_len=16.*1 dropped"):
        dm = datamodule(path, max_len=16)
    assert len(dm.train_dataset) == 1
    row = dm.train_dataset[0]
    assert len(row["prompt_ids"]) + len(row["chosen_ids"]) <= 16
    assert dm.tokenizer.decode(row["prompt_ids"]).endswith("What is 1 + 2?<|end|><|assistant|>")


def test_bad_rows_are_reported_by_row_number(tmp_path):
    rows = [{"prompt": "a", "chosen": "1", "rejected": "2"}, {"prompt": "b", "chosen": "7", "rejected": "7"},
            {"prompt": "c", "chosen": "", "rejected": "2"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl: 2 bad row\(s\) of 3: line 2: chosen is identical.*line 3: empty"):
        datamodule(path)
    with pytest.warns(UserWarning, match="2 bad row.*Skipped"):
        dm = datamodule(path, on_bad_rows="skip")
    assert len(dm.train_dataset) == 1
    with pytest.raises(DataError, match=r"chosen_key='better'"):
        datamodule(path, chosen_key="better")


def test_unpaired_data_and_mismatched_pairs(tmp_path):
    rows = [{"prompt": "What is 1 + 2?", "completion": "3", "label": True},
            {"prompt": "What is 2 + 2?", "completion": "5", "label": False}]
    dm = datamodule(write_jsonl(tmp_path / "u.jsonl", rows), cls=UnpairedPreferenceDataModule, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    texts = [tok.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"],
                                                               strict=True)]
    assert texts[2].startswith("<|bos|><|user|>What is 1 + 2?") and texts[2].endswith("5<|end|>")  # mismatched
    assert batch["desirable"].tolist() == [True, False]
    bad = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "a", "completion": "1", "label": "yes"}])
    with pytest.raises(DataError, match="line 1: label must be a boolean"):
        datamodule(bad, cls=UnpairedPreferenceDataModule)


def test_sequence_logps_sum_only_response_tokens(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 2?", "chosen": "3", "rejected": "45"}])
    dm = datamodule(path, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    got = sequence_logps(model, batch)
    row = dm.train_dataset[0]
    for i, response in enumerate([row["chosen_ids"], row["rejected_ids"]]):
        ids = torch.tensor([row["prompt_ids"] + response])
        logps = torch.log_softmax(model(ids).logits[0], -1)
        start = len(row["prompt_ids"])  # token t is predicted by the logits at t - 1
        expected = sum(logps[t - 1, ids[0, t]] for t in range(start, ids.shape[1]))
        torch.testing.assert_close(got["sum"][i], expected, atol=1e-4, rtol=1e-4)
        assert got["count"][i] == len(response)


# ------------------------------------------------------------------------------------------- reward model
def test_reward_model_learns_preference_and_exports_stats(tmp_path, tiny_model_dir, easy_pairs):
    run_dir = tmp_path / "rm"
    run_cli(base_args(run_dir, tiny_model_dir, data=easy_pairs, config=CONFIGS / "rm.yaml")
            + ["--trainer.max_epochs", "3", "--model.init_args.optimizer.init_args.lr", "3e-3"])
    assert all(torch.isfinite(torch.tensor(metric_series(read_metrics(run_dir), "train/loss"))))
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "hf").eval()
    assert model.config.num_labels == 1 and model.config.reward_std > 0
    dm = datamodule(easy_pairs, shuffle=False, batch_size=32)
    correct = total = 0
    with torch.no_grad():
        for batch in dm.train_dataloader():
            rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
            chosen, rejected = rewards.chunk(2)
            correct, total = correct + (chosen > rejected).sum().item(), total + len(chosen)
    assert correct / total >= 0.9, correct / total  # plain transformers pooling agrees with ours (dedicated pad)


# --------------------------------------------------------------------------------------------- DPO family
def policy_and_reference_checks(cli, run_dir, tiny_model_dir):
    start, trained = load_weights(tiny_model_dir), load_weights(run_dir / "hf")
    assert not torch.equal(start["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])
    if getattr(cli.model, "reference", None) is not None:
        reference = cli.model.reference.state_dict()
        assert all(torch.equal(reference[k], start[k]) for k in start)


@pytest.mark.parametrize(("config", "extra"), [  # β = 0.1: what these runs were tuned with (the demo uses 0.5)
    ("dpo", ["--model.init_args.beta", "0.1"]),
    ("dpo", ["--model.init_args.loss_type", "ipo", "--model.init_args.precompute_reference", "false",
             "--model.init_args.beta", "0.1"]),
    ("simpo", []),
    ("orpo", []),
])
def test_pairwise_algorithms_learn(tmp_path, tiny_model_dir, easy_pairs, config, extra):
    from rlhf_lightning.__main__ import main

    run_dir = tmp_path / config
    cli = main(base_args(run_dir, tiny_model_dir, data=easy_pairs, config=CONFIGS / f"{config}.yaml")
               + ["--trainer.max_epochs", "2", "--model.init_args.optimizer.init_args.lr", "3e-3", *extra])
    rows = read_metrics(run_dir)
    losses, margins = metric_series(rows, "train/loss"), metric_series(rows, "train/margin")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.05, margins
    assert metric_series(rows, "val/accuracy")[-1] >= 0.9
    policy_and_reference_checks(cli, run_dir, tiny_model_dir)


def test_kto_learns(tmp_path, tiny_model_dir, easy_unpaired):
    from rlhf_lightning.__main__ import main

    run_dir = tmp_path / "kto"
    cli = main(base_args(run_dir, tiny_model_dir, data=easy_unpaired, config=CONFIGS / "kto.yaml")
               + ["--trainer.max_epochs", "2", "--model.init_args.optimizer.init_args.lr", "3e-3"])
    rows = read_metrics(run_dir)
    assert all(torch.isfinite(torch.tensor(metric_series(rows, "train/loss"))))
    good, bad = metric_series(rows, "val/desirable_reward"), metric_series(rows, "val/undesirable_reward")
    assert good[-1] - bad[-1] > 0.1 and metric_series(rows, "val/kl")
    policy_and_reference_checks(cli, run_dir, tiny_model_dir)


def test_precomputed_reference_equals_live_reference(tmp_path, tiny_model_dir, easy_pairs):
    """Cached reference log-probs give the same first-step loss and metrics as a live reference forward."""
    first = {}
    for precompute in ("true", "false"):
        run_dir = tmp_path / precompute
        run_cli(base_args(run_dir, tiny_model_dir, data=easy_pairs, config=CONFIGS / "dpo.yaml")
                + ["--trainer.max_steps", "2", "--data.init_args.shuffle", "false",
                   "--model.init_args.precompute_reference", precompute])
        first[precompute] = read_metrics(run_dir)[0]
    for key in ("train/loss", "train/margin", "train/chosen_reward"):
        assert abs(float(first["true"][key]) - float(first["false"][key])) < 1e-4, key


def test_precomputed_reference_survives_resume(tmp_path, tiny_model_dir, easy_pairs):
    run_dir = tmp_path / "resume"
    run_cli(base_args(run_dir, tiny_model_dir, data=easy_pairs, config=CONFIGS / "dpo.yaml")
            + ["--trainer.max_steps", "5"])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt",
                       weights_only=False)
    assert state["reference_cache"]["train"].shape == (144, 2)
    run_cli(base_args(run_dir, tiny_model_dir, data=easy_pairs, config=CONFIGS / "dpo.yaml")
            + ["--trainer.max_steps", "8", "--ckpt_path", "last"])
    assert [int(r["step"]) for r in read_metrics(run_dir) if r.get("train/loss")] == [5, 6, 7]


@pytest.mark.parametrize(("stage", "offload", "precompute"), [(2, "true", "true"), (3, "false", "false")])
def test_dpo_two_ranks(tmp_path, tiny_model_dir, easy_pairs, stage, offload, precompute):
    """ZeRO-2 + CPU Adam with cached reference; ZeRO-3 with a live, partitioned reference model."""
    run_dir = tmp_path / "dpo2"
    run_cli_subprocess(base_args(run_dir, tiny_model_dir, data=easy_pairs, config=CONFIGS / "dpo.yaml")
                       + ["--trainer.devices", "2", "--trainer.strategy.init_args.offload_optimizer", offload,
                          "--trainer.strategy.init_args.stage", str(stage),
                          "--model.init_args.precompute_reference", precompute,
                          "--trainer.max_epochs", "2", "--model.init_args.optimizer.init_args.lr", "3e-3",
                          "--data.init_args.batch_size", "8"])
    rows = read_metrics(run_dir)
    margins = metric_series(rows, "train/margin")
    assert all(torch.isfinite(torch.tensor(metric_series(rows, "train/loss"))))
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.05, margins
    start, trained = load_weights(tiny_model_dir), load_weights(run_dir / "hf")
    assert not torch.equal(start["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])


def test_custom_dpo_variant_example(tmp_path, tiny_model_dir, easy_pairs, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    run_dir = tmp_path / "exo"
    run_cli(base_args(run_dir, tiny_model_dir, data=easy_pairs, config=CONFIGS / "dpo.yaml")
            + ["--model", "custom_dpo_loss.ExponentialDPO", "--trainer.max_steps", "6",
               "--model.init_args.optimizer.init_args.lr", "3e-3"])
    rows = read_metrics(run_dir)
    losses = metric_series(rows, "train/loss")
    assert abs(losses[0] - 1.0) < 1e-3  # exp(-β·0) at the start, where policy == reference
    assert losses[-1] < losses[0] and metric_series(rows, "train/margin")[-1] > 0


# ------------------------------------------------------------------------- layouts without a prompt column
HH_DATA = REPO / "examples" / "data" / "hh_tiny.jsonl"


def test_hh_transcripts_take_the_shared_prefix_as_raw_text_prompt(tmp_path, caplog):
    """HH strings: prompt = shared prefix cut back to the last '\\n\\nAssistant:', no chat template around it."""
    caplog.set_level("INFO")
    dm = datamodule(HH_DATA, shuffle=False)
    tok = dm.tokenizer
    assert len(dm.train_dataset) == 32
    first = dm.train_dataset[0]  # "... 25 + 27?\n\nAssistant: 52" vs "... Assistant: 53": not cut inside "5"
    assert tok.decode(first["prompt_ids"]) == "\n\nHuman: What is 25 + 27?\n\nAssistant:"
    assert tok.decode(first["chosen_ids"]) == " 52<|end|>" and tok.decode(first["rejected_ids"]) == " 53<|end|>"
    two_turns = tok.decode(dm.train_dataset[3]["prompt_ids"])
    assert two_turns.startswith("\n\nHuman: What is 5 + 9?\n\nAssistant: 14.\n\nHuman: And 9 + 19?")
    assert two_turns.endswith("\n\nAssistant:") and "<|user|>" not in two_turns
    summary = [r.getMessage() for r in caplog.records if "hh_tiny.jsonl (training): 32 pairs" in r.getMessage()]
    assert len(summary) == 1 and "shared prefix of chosen/rejected (HH layout" in summary[0], summary
    assert "example prompt '\\n\\nHuman: What is 25 + 27?\\n\\nAssistant:' / response ' 52<|end|>'" in summary[0]


def test_hh_bad_rows_are_skipped_not_every_row(tmp_path):
    rows = [json.loads(line) for line in HH_DATA.read_text().splitlines()[:4]]
    rows.append({"chosen": rows[0]["chosen"], "rejected": rows[0]["chosen"]})  # identical: the only bad row
    rows.append({"chosen": "Yes.", "rejected": "No."})  # nothing shared: no prompt
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.warns(UserWarning, match=r"2 bad row\(s\) of 6: line 5: chosen is identical.*line 6: .*share no "
                                         r"prompt.*Skipped"):
        dm = datamodule(path, on_bad_rows="skip")
    assert len(dm.train_dataset) == 4


def test_chat_pairs_take_the_shared_leading_messages(tmp_path):
    user, hello = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    ask = {"role": "user", "content": "1 + 2?"}
    path = write_jsonl(tmp_path / "c.jsonl", [{"chosen": [user, hello, ask, {"role": "assistant", "content": "3"}],
                                                "rejected": [user, hello, ask, {"role": "assistant", "content": "4"}]}])
    dm = datamodule(path)
    row = dm.train_dataset[0]
    assert dm.tokenizer.decode(row["prompt_ids"]).endswith("<|user|>1 + 2?<|end|><|assistant|>")
    assert dm.tokenizer.decode(row["chosen_ids"]) == "3<|end|>"


# ------------------------------------------------------------------------------------------ KTO data
def test_paired_file_is_unpaired_for_kto(tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": "no idea"} for i in range(3)]
    dm = datamodule(write_jsonl(tmp_path / "p.jsonl", rows), cls=UnpairedPreferenceDataModule, shuffle=False)
    data, tok = dm.train_dataset, dm.tokenizer
    assert data["label"] == [True, True, True, False, False, False]  # a block of chosen rows, then rejected ones
    assert [tok.decode(ids) for ids in data["completion_ids"]] == ["1<|end|>", "2<|end|>", "3<|end|>"] + [
        "no idea<|end|>"] * 3
    assert data["prompt_ids"][0] == data["prompt_ids"][3] and data["source_line"] == [1, 2, 3, 1, 2, 3]
    hh = datamodule(HH_DATA, cls=UnpairedPreferenceDataModule, shuffle=False)
    assert len(hh.train_dataset) == 64 and tok.decode(hh.train_dataset[0]["completion_ids"]) == " 52<|end|>"


def test_unpaired_hh_transcript_is_split_at_its_last_assistant_turn(tmp_path):
    rows = [{"completion": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: 1 + 2?\n\nAssistant: 3", "label": True}]
    dm = datamodule(write_jsonl(tmp_path / "u.jsonl", rows), cls=UnpairedPreferenceDataModule)
    row = dm.train_dataset[0]
    assert dm.tokenizer.decode(row["prompt_ids"]).endswith("1 + 2?\n\nAssistant:")
    assert dm.tokenizer.decode(row["completion_ids"]) == " 3<|end|>"


def test_kto_check_config_names_the_datamodule_and_refuses_batches_of_one(tmp_path, tiny_model_dir, easy_pairs):
    from rlhf_lightning.algorithms import KTO

    kto = KTO(model=str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"KTO needs data\.class_path: rlhf_lightning\.data\."
                                          r"UnpairedPreferenceDataModule"):
        kto.check_config(PreferenceDataModule(path=str(easy_pairs)))
    with pytest.raises(ConfigError, match=r"data\.init_args\.batch_size=1: KTO's KL reference point"):
        kto.check_config(UnpairedPreferenceDataModule(path=str(easy_pairs), batch_size=1))
    kto.check_config(UnpairedPreferenceDataModule(path=str(easy_pairs), batch_size=2))


def test_kto_reference_point_is_clamped_after_averaging_over_ranks():
    from rlhf_lightning.algorithms.kto import kto_reference_point_across_ranks

    # Rank 0: mean log-ratio -0.4 over 2 pairs; rank 1: +0.2 over 2. Mean -0.1 -> z0 = 0 (clamping each rank
    # first gave (0 + 0.2) / 2 = 0.1).
    z0 = kto_reference_point_across_ranks(torch.tensor([-0.8, 0.4]), torch.tensor([2.0, 2.0]))
    assert z0.item() == 0.0
    z0 = kto_reference_point_across_ranks(torch.tensor([1.0, -0.2]), torch.tensor([2.0, 2.0]))
    assert z0.item() == pytest.approx(0.2)
    z0 = kto_reference_point_across_ranks(torch.tensor([0.9, -0.3]), torch.tensor([3.0, 1.0]))  # pair-weighted
    assert z0.item() == pytest.approx(0.15)


# ------------------------------------------------------------------------------ rows keyed after filtering
def test_dense_index_after_dropping_pairs(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "1", "rejected": "2"} for i in range(6)]
    rows[2]["chosen"] = "x " * 300  # too long: dropped
    rows[4]["rejected"] = "1"  # identical: bad, skipped
    dm = datamodule(write_jsonl(tmp_path / "p.jsonl", rows), on_bad_rows="skip", max_len=32, val_split=0.25)
    for dataset in (dm.train_dataset, dm.val_dataset):
        assert dataset["index"] == list(range(len(dataset)))
    assert sorted([*dm.train_dataset["source_line"], *dm.val_dataset["source_line"]]) == [1, 2, 4, 6]


def test_dpo_precomputed_reference_with_dropped_pairs_on_hh_data(tmp_path, tiny_model_dir):
    """One over-long and one identical pair dropped (on_bad_rows=skip): the reference cache is indexed by the rows
    left, not by file position (this was an IndexError), and DPO trains on HH transcripts."""
    from rlhf_lightning.__main__ import main

    rows = [json.loads(line) for line in HH_DATA.read_text().splitlines()]
    rows.insert(5, {"chosen": rows[0]["chosen"] + " no" * 300, "rejected": rows[0]["rejected"]})
    rows.insert(9, {"chosen": rows[1]["chosen"], "rejected": rows[1]["chosen"]})
    data = write_jsonl(tmp_path / "hh.jsonl", rows)
    run_dir = tmp_path / "dpo"
    cli = main(base_args(run_dir, tiny_model_dir, data=data, config=CONFIGS / "dpo.yaml")
               + ["--trainer.max_steps", "2", "--data.init_args.on_bad_rows", "skip",
                  "--data.init_args.batch_size", "8", "--model.init_args.precompute_reference", "true"])
    cache, train = cli.model.reference_cache["train"], cli.datamodule.train_dataset
    assert cache.shape == (len(train), 2) and len(train) + len(cli.datamodule.val_dataset) == 32
    assert torch.isfinite(cache).all() and (cache < 0).all()
    assert all(torch.isfinite(torch.tensor(metric_series(read_metrics(run_dir), "train/loss"))))
