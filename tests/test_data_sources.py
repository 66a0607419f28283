"""Data sources: file/line provenance in errors, unreadable files, dataset mixtures, the tokenisation cache key and
the shared base DataModule."""

import importlib
import json
import sys
from collections import Counter

import datasets
import pytest
from conftest import write_jsonl

from rlhf_lightning.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from rlhf_lightning.data.base import BaseDataModule
from rlhf_lightning.data.sources import load_records
from rlhf_lightning.errors import ConfigError, DataError, MissingPathError


def sft_rows(n: int, tag: str = "") -> list[dict]:
    return [{"input": f"{tag}What is {i} + 1?", "output": str(i + 1)} for i in range(n)]


def setup_dm(cls=SFTDataModule, **kwargs):
    dm = cls(tokenizer="tiny-llama", **kwargs)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------- file and line numbers
def test_bad_row_error_names_the_file_line_even_after_hold_out_and_blank_lines(tmp_path):
    lines = [json.dumps(r) for r in sft_rows(12)]
    lines[8] = json.dumps({"input": "What is 8 + 1?", "output": None})
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + "\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:]) + "\n")  # blank lines 1 and 6
    with pytest.raises(DataError, match=r"d\.jsonl: 1 bad row\(s\) of \d+: line 11: 'output' must be text.*"
                                        r"data\.init_args\.on_bad_rows=skip"):
        setup_dm(path=str(path), val_split=0.25)
    dm = setup_dm(path=str(path), val_split=0.25, on_bad_rows="skip")
    lines_kept = sorted([*dm.train_dataset["source_line"], *dm.val_dataset["source_line"]])
    assert lines_kept == [2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14]  # file lines, blank ones and line 11 excluded


def test_csv_rows_are_reported_by_record_number(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt\nWhat is 1 + 1?\n\"  \"\n")
    with pytest.raises(DataError, match=r"d\.csv: 1 bad row\(s\) of 2: record 2: 'prompt' is empty"):
        setup_dm(PromptDataModule, path=str(path))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("broken.jsonl", b'{"input": "a", "output": "b"}\n\n{"input": "a", "output": \n', r"line 3: not valid JSON"),
    ("blank.jsonl", b"\n\n  \n", r"it has only blank lines"),
    ("types.jsonl", b'\n{"input": "a", "output": "b"}\n{"input": "a", "output": ["b"]}\n',
     r"line 3: 'output' is a list, but on line 2 it is text; a column must have one type"),
    ("latin1.jsonl", b'{"input": "a", "output": "b"}\n{"input": "caf\xe9", "output": "b"}\n', r"line 2: not UTF-8"),
    ("list.jsonl", b'{"input": "a", "output": "b"}\n[1, 2]\n', r"line 2: a record must be a JSON object"),
    ("doc.json", b'[\n  {"input": "a", "output": "b"},\n  {"input": "a" "output": "b"}\n]\n',
     r"line 3: not valid JSON"),
])
def test_unreadable_files_are_one_data_error_with_option_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"data\.init_args\.path='.*{name}' cannot be read: {message}") as err:
        setup_dm(path=str(path))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ mixtures
def test_mixture_realises_the_sampling_probabilities(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows(200, "A: "))
    b = write_jsonl(tmp_path / "b.jsonl", sft_rows(200, "B: "))
    dm = setup_dm(path=[str(a), str(b)], path_probs=[3.0, 1.0], mixture_stopping="first_exhausted")
    counts = Counter(dm.train_dataset["source_file"])
    assert counts[str(a)] == 200 and abs(counts[str(b)] / len(dm.train_dataset) - 0.25) < 0.06, counts
    assert dm.train_dataset["index"] == list(range(len(dm.train_dataset)))
    # all_exhausted (default): every row of both files is used at least once, the small share is repeated.
    dm = setup_dm(path=[str(a), str(b)], path_probs=[3.0, 1.0], val_split=0.1)
    files = Counter(dm.train_dataset["source_file"])
    assert files[str(a)] > 2.5 * files[str(b)] and files[str(b)] >= 180, files
    assert len(set(zip(dm.train_dataset["source_file"], dm.train_dataset["source_line"], strict=True))) == 360
    assert Counter(dm.val_dataset["source_file"]) == {str(a): 20, str(b): 20}  # each source's own hold-out


def test_mixture_without_probs_concatenates_and_works_for_pairs_and_prompts(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"q{i}", "chosen": "1", "rejected": "2"} for i in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"r{i}", "chosen": "1", "rejected": "2"} for i in range(5)])
    pairs = setup_dm(PreferenceDataModule, path=[str(a), str(b)])
    assert len(pairs.train_dataset) == 8 and pairs.train_dataset["index"] == list(range(8))
    prompts = setup_dm(PromptDataModule, path=[str(a), str(b)], path_probs=[0.5, 0.5])
    assert set(prompts.train_dataset["source_file"]) == {str(a), str(b)}


def test_mixture_errors_name_the_option_and_the_bad_path(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows(3))
    with pytest.raises(ConfigError, match=r"path_probs has 1 value.*names 2 source"):
        SFTDataModule(path=[str(a), str(a)], path_probs=[1.0])
    with pytest.raises(ConfigError, match=r"path_probs=\[0.0, 0.0\]"):
        SFTDataModule(path=[str(a), str(a)], path_probs=[0.0, 0.0])
    with pytest.raises(MissingPathError, match=r"data\.init_args\.path\[1\]='.*nope\.jsonl' does not exist"):
        setup_dm(path=[str(a), str(tmp_path / "nope.jsonl")])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"b\.jsonl: column\(s\) not found for data\.init_args\.input_key"):
        setup_dm(path=[str(a), str(b)])


# ------------------------------------------------------------------------------------ tokenisation cache key
ENCODER_MODULE = '''
from rlhf_lightning.data import SFTDataModule


class Encoder(SFTDataModule):
    def encode_row(self, row):
        sample = super().encode_row(row)
        return {**sample, "input_ids": sample["input_ids"][:MARK], "labels": sample["labels"][:MARK]}
'''


def import_encoder(directory, mark: int) -> type:
    """Write (or rewrite) ``sft_encoder.py`` and import it afresh: the same module and class name, edited code."""
    (directory / "sft_encoder.py").write_text(ENCODER_MODULE.replace("MARK", str(mark)))
    sys.modules.pop("sft_encoder", None)
    importlib.invalidate_caches()
    return importlib.import_module("sft_encoder").Encoder


def test_edited_encoder_code_retokenizes_instead_of_reusing_the_cache(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows(4))
    first = setup_dm(import_encoder(tmp_path, 3), path=str(path), shuffle=False)
    assert {len(ids) for ids in first.train_dataset["input_ids"]} == {3}
    again = setup_dm(import_encoder(tmp_path, 3), path=str(path), shuffle=False)
    assert again.train_dataset.cache_files == first.train_dataset.cache_files  # unchanged code: cached
    edited = setup_dm(import_encoder(tmp_path, 5), path=str(path), shuffle=False)
    assert {len(ids) for ids in edited.train_dataset["input_ids"]} == {5}


def test_hparams_and_tokenizer_are_part_of_the_cache_key(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows(4))
    plain = setup_dm(path=str(path), shuffle=False)
    templated = setup_dm(path=str(path), shuffle=False, input_template="Q: {} A: ")
    assert plain.train_dataset["input_ids"] != templated.train_dataset["input_ids"]


# ----------------------------------------------------------------------------------------- shared base class
def test_every_datamodule_shares_the_base_arguments():
    import inspect

    common = set(inspect.signature(BaseDataModule.__init__).parameters) - {"self"}
    assert {"path", "path_probs", "val_path", "val_split", "tokenizer", "batch_size", "shuffle", "num_workers",
            "max_samples", "split", "seed", "trust_remote_code"} <= common
    for cls in (SFTDataModule, PreferenceDataModule, PromptDataModule):
        assert issubclass(cls, BaseDataModule)
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
        assert not own & common, (cls, own & common)  # written once, in the base
        assert "setup" not in vars(cls)


def test_hub_style_split_directory_keeps_record_numbers(tmp_path):
    datasets.Dataset.from_list(sft_rows(3)).save_to_disk(str(tmp_path / "saved"))
    records = load_records(str(tmp_path / "saved"))
    assert records["source_line"] == [1, 2, 3]
