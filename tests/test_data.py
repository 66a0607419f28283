"""Response-only masking, truncation policy and clear errors for bad data."""

import pytest
from conftest import write_jsonl

from rlhf_lightning.data import SFTDataModule
from rlhf_lightning.data.collate import IGNORE_INDEX
from rlhf_lightning.data.formatting import render_chat, render_prompt_response, tokenize_with_spans
from rlhf_lightning.data.sources import load_records
from rlhf_lightning.errors import DataError
from rlhf_lightning.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def labelled_text(tokenizer, sample) -> list[str]:
    """The labelled tokens, as strings, in order."""
    return [tokenizer.decode([t]) for t in sample["labels"] if t != IGNORE_INDEX]


def test_single_turn_chat_labels_only_the_answer_and_its_end_token(tokenizer):
    text, spans = render_prompt_response(tokenizer, "What is 1 + 2?", "3")
    assert text == "<|bos|><|user|>What is 1 + 2?<|end|><|assistant|>3<|end|>"
    sample = tokenize_with_spans(tokenizer, text, spans, chat_formatted=True)
    assert tokenizer.decode(sample["input_ids"]) == text  # no duplicated BOS
    assert labelled_text(tokenizer, sample) == ["3", "<|end|>"]


def test_multi_turn_chat_labels_every_assistant_turn_and_no_user_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Add."},
        {"role": "user", "content": "1 + 2"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "4 + 5"},
        {"role": "assistant", "content": "9"},
    ]
    text, spans = render_chat(tokenizer, messages)
    sample = tokenize_with_spans(tokenizer, text, spans, chat_formatted=True)
    assert labelled_text(tokenizer, sample) == ["3", "<|end|>", "9", "<|end|>"]
    # The tokens right before each answer are the (unlabelled) assistant role tokens.
    ids, labels = sample["input_ids"], sample["labels"]
    first = labels.index(ids[labels.index(next(t for t in labels if t != IGNORE_INDEX))])
    assert tokenizer.decode([ids[first - 1]]) == "<|assistant|>" and labels[first - 1] == IGNORE_INDEX


def test_input_template_labels_response_and_eos(tokenizer):
    text, spans = render_prompt_response(tokenizer, "1 + 2", "3", input_template="Q: {} A: ")
    assert text == "Q: 1 + 2 A: 3<|end|>"
    sample = tokenize_with_spans(tokenizer, text, spans, chat_formatted=False)
    assert labelled_text(tokenizer, sample) == ["3", "<|end|>"]


def make_datamodule(path, **kwargs) -> SFTDataModule:
    dm = SFTDataModule(path=str(path), tokenizer="tiny-llama", **kwargs)
    dm.setup("fit")
    return dm


def test_datamodule_chat_messages_and_batches(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "1 + 2"}, {"role": "assistant", "content": "3"}]},
        {"messages": [{"role": "user", "content": "1 + 1"}, {"role": "assistant", "content": "2"},
                      {"role": "user", "content": "2 + 2"}, {"role": "assistant", "content": "4"}]},
    ])
    dm = make_datamodule(path, messages_key="messages", batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert sorted((batch["labels"] != IGNORE_INDEX).sum(1).tolist()) == [2, 4]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_truncation_right_cuts_and_drop_drops(tmp_path):
    rows = [{"input": "What is 1 + 2?", "output": "3"}, {"input": "word " * 50, "output": "4"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.warns(UserWarning, match="1/2 samples exceed max_len=20"):
        right = make_datamodule(path, max_len=20, truncation="right")
    # The long sample lost its answer when cut, so it is dropped even under "right".
    assert len(right.train_dataset) == 1
    rows[1] = {"input": "1 + 1", "output": "2 " * 30}
    path = write_jsonl(tmp_path / "d2.jsonl", rows)
    with pytest.warns(UserWarning):
        right = make_datamodule(path, max_len=20, truncation="right")
    assert len(right.train_dataset) == 2 and max(len(x) for x in right.train_dataset["input_ids"]) == 20
    with pytest.warns(UserWarning):
        drop = make_datamodule(path, max_len=20, truncation="drop")
    assert len(drop.train_dataset) == 1


def test_all_samples_truncated_is_an_error_naming_file_and_option(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"input": "word " * 50, "output": "1"}])
    with pytest.raises(ValueError, match=r"long\.jsonl.*max_len=8.*data\.init_args\.max_len"):
        make_datamodule(path, max_len=8)


def test_missing_key_error_names_file_option_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "1 + 2", "answer": "3"}])
    with pytest.raises(DataError, match=r"q\.jsonl.*input_key='input'.*'question'"):
        make_datamodule(path)


def test_empty_file_and_missing_file_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl' is an empty file"):
        load_records(str(empty))
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl' does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_validation_split_and_other_formats(tmp_path):
    import datasets

    rows = [{"prompt": f"What is {i} + 1?", "completion": str(i + 1)} for i in range(20)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
    for name in ("d.parquet", "d.csv"):
        dm = make_datamodule(tmp_path / name, input_key="prompt", output_key="completion", val_split=0.25)
        assert len(dm.train_dataset) == 15 and len(dm.val_dataset) == 5
