"""Reward-conditioned SFT: score normalisation and levels against hand-computed values, condition rendering, the
exported chat template (best condition by default, explicit conditions override it), the data module's errors and
a short ``fit`` on the tiny model."""

import json
import math

import pytest
import torch
from conftest import REPO, base_args, load_weights, metric_series, read_metrics, run_cli, write_jsonl
from transformers import AutoConfig, AutoTokenizer

from rlhf_lightning.algorithms.conditional_sft import read_settings, retarget_export
from rlhf_lightning.conditioning import (
    PLAIN_CHAT_TEMPLATE,
    ScoreQuantizer,
    condition_settings,
    conditioned_chat_template,
    prepare_tokenizer,
    render_conditions,
)
from rlhf_lightning.data.conditional import ConditionalSFTDataModule
from rlhf_lightning.errors import ConfigError, DataError
from rlhf_lightning.models import load_tokenizer

CONFIG = REPO / "configs" / "tiny" / "conditional_sft.yaml"


# ------------------------------------------------------------------------------------- normalise, quantise
def test_rank_levels_are_equal_frequency_and_ties_share_a_level():
    q = ScoreQuantizer.fit([5.0, 1.0, 4.0, 2.0, 3.0], "rank", 5)  # mid-ranks (i + 0.5) / 5 = .1 .3 .5 .7 .9
    assert [q.level(s) for s in (1, 2, 3, 4, 5)] == [1, 2, 3, 4, 5]
    assert q.normalized(3.0) == pytest.approx(0.5) and q.normalized(2.5) == pytest.approx(0.4)  # unseen: 2 below
    tied = ScoreQuantizer.fit([0.0, 0.0, 0.0, 1.0], "rank", 5)  # u(0) = 1.5/4 = .375, u(1) = 3.5/4 = .875
    assert (tied.level(0.0), tied.level(1.0)) == (2, 5)
    assert tied.level_counts() == [0, 3, 0, 0, 1] and tied.level_ranges() == [None, [0.0, 0.0], None, None, [1.0, 1.0]]
    settings = condition_settings(tied)
    assert (settings.best_level, settings.worst_level) == (5, 2)  # the levels present, not the nominal ends
    assert settings.best_condition == "<quality: 5/5> " and settings.worst_condition == "<quality: 2/5> "


def test_zscore_levels_follow_the_normal_cdf():
    q = ScoreQuantizer.fit([0.0, 2.0], "zscore", 5)  # mean 1, population std 1
    assert (q.mean, q.std) == (1.0, 1.0)
    assert q.normalized(0.0) == pytest.approx(0.158655, abs=1e-6)  # Φ(-1)
    assert [q.level(s) for s in (0.0, 1.0, 2.0)] == [1, 3, 5]  # ⌊5·.1587⌋, ⌊5·.5⌋, ⌊5·.8413⌋ (+1)
    assert q.level(100.0) == 5 and q.level(-100.0) == 1


@pytest.mark.parametrize(("scores", "levels", "message"), [
    ([0.7, 0.7, 0.7], 5, "all 3 scores are equal"),
    ([0.1, float("nan")], 5, "not a finite number"),
    ([0.1, 0.2], 1, "at least 2"),
])
def test_unusable_scores_are_refused(scores, levels, message):
    with pytest.raises(ValueError, match=message):
        ScoreQuantizer.fit(scores, "rank", levels)


# ------------------------------------------------------------------------------------------- rendering
def test_condition_rendering_in_both_styles():
    assert render_conditions(3) == ["<quality: 1/3> ", "<quality: 2/3> ", "<quality: 3/3> "]
    assert render_conditions(2, "special_tokens") == ["<|reward_1|>", "<|reward_2|>"]
    assert render_conditions(2, template="[r={level}] ") == ["[r=1] ", "[r=2] "]
    bad_templates = [("<quality> ", "must contain"), ("{level} {score}", "may use only"),
                     ("x{level!s:.0} ", "different")]
    for bad, why in bad_templates:
        with pytest.raises(ValueError, match=why):
            render_conditions(3, template=bad)


def chat(tokenizer, content, **kwargs):
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True, **kwargs)


def test_exported_template_applies_the_best_condition_unless_told_otherwise():
    tokenizer = load_tokenizer("tiny-llama")
    conditions = render_conditions(3)
    tokenizer.chat_template = conditioned_chat_template(tokenizer.chat_template, conditions, conditions[2])
    assert chat(tokenizer, "reverse: a b") == "<|bos|><|user|><quality: 3/3> reverse: a b<|end|><|assistant|>"
    assert chat(tokenizer, "<quality: 1/3> reverse: a b") == \
        "<|bos|><|user|><quality: 1/3> reverse: a b<|end|><|assistant|>"  # a condition in the message is kept
    assert "<|user|><quality: 1/3> reverse" in chat(tokenizer, "reverse: a b", condition=1)  # a level
    assert "<|user|><quality: 2/3> reverse" in chat(tokenizer, "reverse: a b", condition="<quality: 2/3> ")
    assert "<|user|>reverse" in chat(tokenizer, "reverse: a b", condition="")  # none
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    assert text == "<|bos|><|user|><quality: 3/3> x<|end|><|assistant|>y<|end|><|user|><quality: 3/3> z<|end|>"
    rewrapped = conditioned_chat_template(tokenizer.chat_template, conditions, conditions[0])  # unwraps first
    assert rewrapped.count("reward_conditions = ") == 1
    assert conditioned_chat_template(None, conditions, conditions[0]).endswith(PLAIN_CHAT_TEMPLATE)


def test_special_tokens_are_single_tokens():
    tokenizer = load_tokenizer("tiny-llama")
    settings = condition_settings(ScoreQuantizer.fit([0.0, 1.0, 2.0], "rank", 3), "special_tokens")
    assert prepare_tokenizer(tokenizer, settings) == 3 and prepare_tokenizer(tokenizer, settings) == 0  # idempotent
    ids = tokenizer(chat(tokenizer, "reverse: a"), add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["<|bos|>", "<|user|>", "<|reward_3|>"]


# ---------------------------------------------------------------------------------------------- data
SCORED = [{"prompt": "reverse: a b", "responses": ["b a", "a b"], "scores": [1.0, 0.0]},
          {"prompt": "reverse: c d e", "responses": ["e d c", "e c d"], "scores": [1.0, 0.5]}]


def data_module(path, **kwargs):
    return ConditionalSFTDataModule(path=str(path), tokenizer="tiny-llama", max_len=64, **kwargs)


def test_each_response_is_trained_with_its_scores_condition(tmp_path):
    dm = data_module(write_jsonl(tmp_path / "scored.jsonl", SCORED), levels=3)
    dm.setup("fit")  # scores 0, .5, 1, 1: mid-ranks .125, .375, .75, .75 -> levels 1, 2, 3, 3
    texts = {dm.tokenizer.decode(s["input_ids"]) for s in dm.train_dataset}
    assert texts == {"<|bos|><|user|><quality: 3/3> reverse: a b<|end|><|assistant|>b a<|end|>",
                     "<|bos|><|user|><quality: 1/3> reverse: a b<|end|><|assistant|>a b<|end|>",
                     "<|bos|><|user|><quality: 3/3> reverse: c d e<|end|><|assistant|>e d c<|end|>",
                     "<|bos|><|user|><quality: 2/3> reverse: c d e<|end|><|assistant|>e c d<|end|>"}
    sample = dm.train_dataset[0]
    trained = dm.tokenizer.decode([t for t in sample["labels"] if t != -100])
    assert trained.endswith("<|end|>") and "quality" not in trained  # loss on the response only
    assert dm.condition_settings.level_counts == [1, 1, 2] and dm.condition_settings.best_level == 3


def test_one_response_per_row_layout(tmp_path):
    rows = [{"q": "reverse: a b", "a": "b a", "r": 0.9}, {"q": "reverse: a b", "a": "a b", "r": 0.1}]
    dm = data_module(write_jsonl(tmp_path / "rows.jsonl", rows), prompt_key="q", response_key="a", score_key="r",
                     levels=2, condition_style="special_tokens")
    dm.setup("fit")
    assert sorted(dm.tokenizer.decode(s["input_ids"][2]) for s in dm.train_dataset) == ["<|reward_1|>",
                                                                                       "<|reward_2|>"]


@pytest.mark.parametrize(("row", "why"), [
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0, math.nan]}, "'scores' is nan"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}, "one score per response"),
    ({"prompt": "p", "responses": ["a"], "scores": ["high"]}, "must be a number"),
])
def test_bad_scores_name_file_and_line(tmp_path, row, why):
    path = tmp_path / "scored.jsonl"
    path.write_text(json.dumps(SCORED[0]) + "\n" + json.dumps(row, allow_nan=True) + "\n")
    with pytest.raises(DataError, match=f"scored.jsonl line 2: .*{why}.*on_bad_rows=skip"):
        data_module(path).setup("fit")


def test_rows_with_bad_scores_can_be_skipped(tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_text(json.dumps(SCORED[0]) + "\n" + '{"prompt": "p", "responses": ["a"], "scores": [NaN]}\n')
    dm = data_module(path, on_bad_rows="skip")
    dm.setup("fit")
    assert len(dm.train_dataset) == 2 and dm.condition_settings.stats["count"] == 2  # NaN left out of the stats


def test_constant_scores_and_bad_options_are_one_clear_error(tmp_path):
    rows = [{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 1.0]}]
    with pytest.raises(DataError, match="all 2 scores are equal.*reward that tells them apart"):
        data_module(write_jsonl(tmp_path / "flat.jsonl", rows)).setup("fit")
    with pytest.raises(ConfigError, match="data.init_args.levels=1"):
        data_module(tmp_path / "flat.jsonl", levels=1)
    with pytest.raises(ConfigError, match="data.init_args.condition_template"):
        data_module(tmp_path / "flat.jsonl", condition_template="<quality> ")
    with pytest.raises(DataError, match="data.init_args.scores_key='score_list'"):
        data_module(tmp_path / "flat.jsonl", scores_key="score_list").setup("fit")


# ----------------------------------------------------------------------------------------- end to end
def test_fit_exports_a_model_that_carries_its_condition(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"reverse: {a} {b}", "responses": [f"{b} {a}", f"{a} {b}"], "scores": [1.0, 0.0]}
            for a, b in zip("abcdefgh", "ijklmnop", strict=True)]
    run_dir = tmp_path / "run"
    run_cli(base_args(run_dir, tiny_model_dir, data=write_jsonl(tmp_path / "scored.jsonl", rows), config=CONFIG)
            + ["--trainer.max_epochs", "1", "--data.init_args.val_split", "0", "--data.init_args.batch_size", "4",
               "--data.init_args.condition_style", "special_tokens", "--data.init_args.condition_template", "null"])
    losses = metric_series(read_metrics(run_dir), "train/loss")
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    export = run_dir / "hf"
    before, after = load_weights(tiny_model_dir), load_weights(export)
    embeddings = "model.embed_tokens.weight"
    assert after[embeddings].shape[0] == before[embeddings].shape[0] + 5  # one new token per level
    assert any(not torch.equal(before[k], after[k]) for k in before if k != embeddings)

    settings = read_settings(export)  # reward_condition.json
    assert settings.best_condition == "<|reward_4|>" and settings.level_counts == [0, 8, 0, 8, 0]
    assert AutoConfig.from_pretrained(export).reward_condition["best_level"] == 4 == settings.best_level
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert "<|user|><|reward_4|>reverse: a b" in chat(tokenizer, "reverse: a b")  # the best level present
    worst = AutoTokenizer.from_pretrained(retarget_export(export, tmp_path / "worst", settings.worst_level))
    assert "<|user|><|reward_2|>reverse: a b" in chat(worst, "reverse: a b")


def test_the_module_refuses_data_without_conditions():
    from rlhf_lightning.algorithms import ConditionalSFT
    from rlhf_lightning.data import SFTDataModule

    with pytest.raises(ConfigError, match="needs data.class_path: rlhf_lightning.data.ConditionalSFTDataModule"):
        ConditionalSFT(model="tiny-llama").check_config(SFTDataModule(path="examples/data/sft_tiny.jsonl"))
