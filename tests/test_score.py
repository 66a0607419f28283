"""Batch scoring (``predict`` with ``rlhf_lightning.inference.Scorer``): statistics, score heads, scores and pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, write_jsonl

from rlhf_lightning.inference.score import pair_summary, quantile, summarize
from rlhf_lightning.models import has_score_head
from rlhf_lightning.tasks.reverse import exact_match, reward_model_scores

CONFIG = REPO / "configs" / "tiny" / "score.yaml"
DEMO_RM = REPO / "runs" / "tiny-rm" / "hf"  # made by scripts/pipeline.py --stages sft rm


def test_summary_statistics_by_hand():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert (s["count"], s["mean"], s["min"], s["max"]) == (4, 2.5, 1.0, 4.0)
    assert s["std"] == pytest.approx(1.25**0.5)  # population std: mean of squared deviations 1.25
    assert s["p50"] == 2.5 and s["p25"] == 1.75 and s["p5"] == pytest.approx(1.15)  # numpy's linear quantiles
    assert quantile([0.0, 10.0], 0.3) == 3.0
    pairs = pair_summary([1.0, 2.0, 0.0, 5.0], [0.0, 2.0, 1.0, 1.0])
    assert pairs == {"pairs": 4, "accuracy": (1 + 0.5 + 0 + 1) / 4, "mean_margin": (1 + 0 - 1 + 4) / 4}


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The demo reward model when it exists, else a tiny score-head model (random head, stored mean/std)."""
    if (DEMO_RM / "model.safetensors").exists():
        return DEMO_RM
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.reward_mean, model.config.reward_std = 0.1, 0.5
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_score_head_is_read_from_config_or_weights(reward_model, tiny_model_dir, tmp_path):
    assert has_score_head(str(reward_model)) is True and has_score_head(str(tiny_model_dir)) is False
    no_arch = tmp_path / "no-arch"  # a config without architectures: the weight names decide
    no_arch.mkdir()
    for f in Path(reward_model).iterdir():
        (no_arch / f.name).write_bytes(f.read_bytes())
    config = json.loads((no_arch / "config.json").read_text())
    config.pop("architectures", None)
    (no_arch / "config.json").write_text(json.dumps(config))
    assert has_score_head(str(no_arch)) is True


def score_args(data: Path, out: Path, reward_models: list[str], functions: list[str], *extra: str) -> list[str]:
    return ["predict", "--config", str(CONFIG), "--data.init_args.path", str(data),
            "--model.init_args.reward_models", json.dumps(reward_models),
            "--model.init_args.reward_functions", json.dumps(functions), "--model.init_args.reward_weights", "null",
            "--trainer.callbacks.init_args.output", str(out), "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--data.init_args.batch_size", "3", *extra]


def test_generation_rows_scored_by_model_and_rule_combined_with_weights(tmp_path, reward_model, capsys):
    rows = [{"prompt": "reverse: a b c", "responses": ["c b a", "c a b"], "label": "c b a", "source_line": 9},
            {"prompt": "reverse: d e", "responses": ["e d", "d e"], "label": None, "source_line": 4},
            {"prompt": "reverse: f g h i", "responses": ["i h g f", "i h g f"], "label": "i h g f", "source_line": 1}]
    data, out = write_jsonl(tmp_path / "samples.jsonl", rows), tmp_path / "scored.jsonl"
    run_cli(score_args(data, out, [str(reward_model)], ["rlhf_lightning.tasks.reverse:exact_match"],
                       "--model.init_args.reward_weights", "[0.5, 2.0]"))
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    responses = [x for r in rows for x in r["responses"]]
    labels = [r["label"] for r in rows for _ in r["responses"]]
    rm = reward_model_scores(reward_model, prompts, responses)  # RewardModelWorker.score, normalised
    rule = exact_match(prompts, responses, labels)
    got = [s for r in scored for s in r["scores"]]
    assert got == pytest.approx([0.5 * m + 2.0 * e for m, e in zip(rm, rule, strict=True)], abs=1e-5)
    assert [s for r in scored for s in r["source_scores"]["exact_match"]] == rule
    assert [{k: v for k, v in r.items() if k not in ("scores", "source_scores")} for r in scored] == rows
    summary = json.loads((tmp_path / "scored.jsonl.summary.json").read_text())
    assert summary["score"] == pytest.approx(summarize(got)) and summary["per_source"]["exact_match"]["mean"] == 4 / 6
    assert '"mean"' in capsys.readouterr().out  # the summary is printed too


def test_pair_accuracy_is_what_the_summary_says(tmp_path, reward_model):
    pairs = [json.loads(line) for line in (REPO / "examples/data/reverse/preference.jsonl").read_text().splitlines()]
    data, out = write_jsonl(tmp_path / "pairs.jsonl", pairs[:12]), tmp_path / "pairs.scored.jsonl"
    run_cli(score_args(data, out, [str(reward_model)], []))
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [p["prompt"] for p in pairs[:12]]
    chosen = reward_model_scores(reward_model, prompts, [p["chosen"] for p in pairs[:12]])
    rejected = reward_model_scores(reward_model, prompts, [p["rejected"] for p in pairs[:12]])
    assert [r["chosen_score"] for r in scored] == pytest.approx(chosen, abs=1e-5)
    assert [r["rejected_score"] for r in scored] == pytest.approx(rejected, abs=1e-5)
    summary = json.loads((tmp_path / "pairs.scored.jsonl.summary.json").read_text())
    expected = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / 12
    assert summary["accuracy"] == pytest.approx(expected) and summary["pairs"] == 12
    if reward_model == DEMO_RM:  # the trained demo reward model prefers the right reversal
        assert summary["accuracy"] > 0.75


def test_causal_lm_as_reward_model_is_refused_before_loading(tmp_path, tiny_model_dir, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "reverse: a b", "response": "b a"}])
    import rlhf_lightning.rollout.workers as workers

    monkeypatch.setattr(workers.ModelWorker, "__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(score_args(data, tmp_path / "out.jsonl", [str(tiny_model_dir)], []))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model.init_args.reward_models[0]=") and "has no score head" in err


def test_rows_without_a_response_column_are_refused(tmp_path, reward_model, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "reverse: a b", "answer": "b a"}])
    with pytest.raises(SystemExit):
        run_cli(score_args(data, tmp_path / "out.jsonl", [str(reward_model)], []))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "line 1: no column to score" in err and "data.init_args.response_key" in err
