"""Rejection sampling: best-of-n selection against hand-made rows, and the driver end to end on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, load_weights, run_cli, write_jsonl

from rlhf_lightning.errors import ConfigError, DataError
from rlhf_lightning.rejection_sampling import RejectionSamplingConfig, finished, main, printable, run_step
from rlhf_lightning.selection import best_index, select_responses, select_rows, selection_stats


def test_best_index_takes_the_first_of_equal_scores():
    assert best_index([0.1, 0.7, 0.3]) == 1
    assert best_index([0.5, 0.9, 0.9, 0.2]) == 1
    assert best_index([-1.0, -1.0]) == 0
    assert best_index([3.0]) == 0


def test_best_selection_keeps_one_response_and_honours_the_threshold():
    responses, scores = ["a", "b", "c"], [0.2, 0.8, 0.8]
    assert select_responses(responses, scores) == [("b", 0.8)]
    assert select_responses(responses, scores, threshold=0.8) == [("b", 0.8)]  # >= keeps equality
    assert select_responses(responses, scores, threshold=0.81) == []
    assert select_responses([], []) == []


def test_threshold_selection_keeps_every_response_above_it_best_first_deduplicated():
    responses, scores = ["x", "y", "x", "z", "w"], [0.5, 0.9, 0.6, 0.1, 0.5]
    assert select_responses(responses, scores, "threshold", 0.5) == [("y", 0.9), ("x", 0.6), ("w", 0.5)]
    assert select_responses(responses, scores, "threshold", 0.5, dedup=False) == [
        ("y", 0.9), ("x", 0.6), ("x", 0.5), ("w", 0.5)]
    assert select_responses(responses, scores, "threshold", 1.0) == []
    with pytest.raises(ConfigError, match="threshold"):
        select_responses(responses, scores, "threshold")
    with pytest.raises(ValueError, match="3 responses but 2 scores"):
        select_responses(["a", "b", "c"], [1.0, 2.0])


def test_select_rows_writes_sft_rows_text_and_chat():
    chat = [{"role": "user", "content": "hi"}]
    rows = [{"prompt": "reverse: a b", "responses": ["a b", "b a", "b a"], "scores": [0, 1, 1], "label": None},
            {"prompt": chat, "responses": ["yo", "hello"], "scores": [0.3, -0.2]}]
    assert select_rows(rows) == [
        {"input": "reverse: a b", "output": "b a", "score": 1.0},
        {"messages": [*chat, {"role": "assistant", "content": "yo"}], "score": 0.3}]
    assert select_rows(rows, threshold=0.5) == [{"input": "reverse: a b", "output": "b a", "score": 1.0}]


def test_select_rows_names_the_line_of_a_row_without_scores():
    rows = [{"prompt": "p", "responses": ["a"], "scores": [1.0]}, {"prompt": "q", "responses": ["a", "b"]}]
    with pytest.raises(DataError, match=r"scores.jsonl:2: .*'responses' and 'scores'"):
        select_rows(rows, source="scores.jsonl")


def test_selection_stats_by_hand():
    rows = [{"prompt": "p", "responses": ["a", "b"], "scores": [0.0, 1.0]},
            {"prompt": "q", "responses": ["c", "d", "e"], "scores": [0.5, 0.2, 0.2]}]
    selected = select_rows(rows)
    stats = selection_stats(rows, selected)
    assert stats["prompts"] == 2 and stats["samples"] == 5 and stats["selected"] == 2
    assert stats["mean_score_all"] == pytest.approx((0 + 1 + 0.5 + 0.2 + 0.2) / 5)
    assert stats["mean_score_best"] == pytest.approx((1.0 + 0.5) / 2)
    assert stats["mean_score_selected"] == pytest.approx(0.75)
    assert json.dumps(stats)  # written as selection.json


# ------------------------------------------------------------------------------------------------------- the driver
def test_run_step_stops_with_the_command_line_of_a_failing_call(tmp_path):
    cmd = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with pytest.raises(SystemExit) as info:
        run_step("round 1/1 score", cmd, tmp_path / ".score.done", [tmp_path / "scores.jsonl"])
    assert "round 1/1 score failed (exit status 3)" in str(info.value.code)
    assert printable(cmd) in str(info.value.code) and printable(cmd).startswith("python -c ")
    assert not (tmp_path / ".score.done").exists()  # not recorded as done: a rerun runs it again


def test_a_step_is_finished_when_its_record_matches_and_its_outputs_exist(tmp_path, capsys):
    cmd, done, output = [sys.executable, "-c", "open('out.txt', 'w')"], tmp_path / ".x.done", tmp_path / "out.txt"
    assert not finished("x", cmd, done, [output])
    with pytest.raises(SystemExit, match="x ended without writing .*out.txt"):  # exit status 0, yet no output
        run_step("x", cmd, done, [output], in_process=lambda: None)
    assert not done.exists()
    run_step("x", cmd, done, [output], in_process=lambda: output.write_text("y"))
    assert done.read_text() == printable(cmd) + "\n"
    assert finished("x", cmd, done, [output]) and "x: done, skipped" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="made by a different command"):
        finished("x", [*cmd, "--more"], done, [output])
    output.unlink()  # a lost output: the step runs again
    assert not finished("x", cmd, done, [output])


@pytest.mark.parametrize("config", ["configs/tiny/rejection_sampling.yaml", "configs/rejection_sampling.yaml"])
def test_configs_parse_and_start_with_their_command(config, capsys):
    assert (REPO / config).read_text().splitlines()[0] == (
        f"# python -m rlhf_lightning rejection-sampling --config {config}")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(REPO / config), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(printed) - {"config"} == {f.name for f in dataclasses.fields(RejectionSamplingConfig)}
    assert Path(REPO / printed["sft_config"]).is_file() and printed["rounds"] >= 1


REWARD = '''
def distinct_words(prompts, responses, labels):
    """A reward a random model's samples differ in (ties included): the number of distinct words."""
    return [float(len(set(r.split()))) for r in responses]
'''
LEAKED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def test_one_round_end_to_end_then_a_rerun_skips_every_step(tmp_path, tiny_model_dir, capfd, monkeypatch):
    """generate -> score -> select -> SFT on the tiny model, through the real CLI calls it prints."""
    for name in LEAKED_ENV:  # an earlier in-process run's rendezvous variables must not reach the children
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": f"reverse: {' '.join(word)}", "answer": " ".join(reversed(word))}
        for word in ("abc", "dog", "xyzw", "kite", "lamp", "quiet")])
    (tmp_path / "reward.py").write_text(REWARD)
    out = tmp_path / "rs"
    args = ["rejection-sampling", "--policy", str(tiny_model_dir), "--prompts", str(prompts), "--label_key", "answer",
            "--output_dir", str(out), "--n", "3", "--max_new_tokens", "6",
            "--reward_functions", json.dumps([f"{tmp_path / 'reward.py'}:distinct_words"]),
            "--generate_config", str(REPO / "configs/tiny/generate.yaml"),
            "--score_config", str(REPO / "configs/tiny/score.yaml"),
            "--sft_config", str(REPO / "configs/tiny/sft.yaml"),
            "--sft_args", json.dumps(["--trainer.max_epochs", "1", "--data.init_args.val_split", "0",
                                      "--data.init_args.batch_size", "4", "--trainer.enable_progress_bar", "false"])]
    run_cli(args)
    printed = capfd.readouterr().out
    round_dir = out / "round-1"

    # every step printed as a copy-pasteable command, the same that its done-record holds
    calls = dict(re.findall(r"^\[rejection-sampling\] round 1/1 (\w+): (python -m .*)$", printed, re.MULTILINE))
    assert list(calls) == ["generate", "score", "select", "sft"]
    for step, line in calls.items():
        assert (round_dir / f".{step}.done").read_text().strip() == line
    generate = shlex.split(calls["generate"])
    assert generate[:5] == ["python", "-m", "rlhf_lightning", "predict", "--config"]
    assert option(generate, "--model.init_args.model") == str(tiny_model_dir)
    assert option(generate, "--model.init_args.n") == "3"
    assert shlex.split(calls["score"])[3] == "predict" and shlex.split(calls["sft"])[3] == "fit"
    assert option(shlex.split(calls["sft"]), "--model.init_args.model") == str(tiny_model_dir)

    # the score file holds the rule's scores; the SFT data exactly each prompt's best (first of ties) response
    scored = read_jsonl(round_dir / "scores.jsonl")
    assert [r["prompt"] for r in scored] == [r["prompt"] for r in read_jsonl(prompts)]
    assert all(len(r["responses"]) == 3 and r["scores"] == [float(len(set(x.split()))) for x in r["responses"]]
               for r in scored)
    expected = []
    for row in scored:
        best = max(row["scores"])
        first = row["scores"].index(best)
        expected.append({"input": row["prompt"], "output": row["responses"][first], "score": best})
    assert read_jsonl(round_dir / "sft.jsonl") == expected
    stats = json.loads((round_dir / "selection.json").read_text())
    assert stats["selected"] == 6 and stats["mean_score_selected"] >= stats["mean_score_all"]

    # the fine-tuned export exists, differs from the start model, and is linked as the final policy
    export = round_dir / "sft" / "hf"
    tuned, start = load_weights(export), load_weights(tiny_model_dir)
    assert tuned.keys() == start.keys()
    assert any(not torch.equal(tuned[k], start[k]) for k in start)
    assert (out / "hf").resolve() == export.resolve()
    assert json.loads((out / "summary.json").read_text())[0]["export"] == str(export)

    # a rerun (e.g. after a kill) skips every finished step; changed options are refused, not mixed in
    mtime = (export / "model.safetensors").stat().st_mtime_ns
    run_cli(args)
    again = capfd.readouterr().out
    assert [s for s in ("generate", "score", "select", "sft") if f"round 1/1 {s}: done, skipped" in again] == [
        "generate", "score", "select", "sft"]
    assert "python -m rlhf_lightning" not in again
    assert (export / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(SystemExit):
        run_cli([*args, "--n", "2"])
    assert "was made by a different command (round 1/1 generate)" in capfd.readouterr().err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def option(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


TINY_CONFIG = str(REPO / "configs/tiny/rejection_sampling.yaml")


@pytest.mark.parametrize(("flags", "message"), [
    (["--selection", "top"], "error: selection: Expected a typing.Literal['best', 'threshold']. Got value: top"),
    (["--n", "0"], "n=0 must be at least 1."),
    (["--selection", "threshold", "--threshold", "null"], "selection: threshold needs a threshold value"),
    (["--reward_functions", "[]"], "No reward source: set reward_models and/or reward_functions."),
    (["--reward_weights", "[1, 2]"], "reward_weights has 2 value(s) for 1 reward sources"),
    (["--policy", "/no/such/model"], "policy='/no/such/model' does not exist"),
    (["--policy", "tiny-llama", "--reward_functions", "[no_such_module:fn]"], "reward_functions: "),
    (["--policy", "tiny-llama", "--prompts", "missing.jsonl"], "prompts='missing.jsonl' does not exist"),
    (["--policy", "tiny-llama", "--prompts", TINY_CONFIG, "--sft_config", "nope.yaml"],
     "sft_config='nope.yaml' does not exist"),
])
def test_bad_options_stop_with_one_line_before_anything_runs(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(["rejection-sampling", "--config", TINY_CONFIG, "--output_dir", str(tmp_path / "rs"), *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "rs").exists()


def test_select_command_refuses_an_empty_selection(tmp_path, capsys):
    scores = write_jsonl(tmp_path / "scores.jsonl", [{"prompt": "p", "responses": ["a", "b"], "scores": [0.1, 0.2]}])
    with pytest.raises(SystemExit):
        run_cli(["rejection-sampling", "select", "--scores", str(scores), "--output", str(tmp_path / "sft.jsonl"),
                 "--threshold", "0.5"])
    assert "no sample was selected (1 prompts, threshold=0.5): lower threshold" in capsys.readouterr().err
    run_cli(["rejection-sampling", "select", "--scores", str(scores), "--output", str(tmp_path / "sft.jsonl"),
             "--selection", "threshold", "--threshold", "0.1"])
    assert read_jsonl(tmp_path / "sft.jsonl") == [{"input": "p", "output": "b", "score": 0.2},
                                                  {"input": "p", "output": "a", "score": 0.1}]
    assert json.loads((tmp_path / "selection.json").read_text())["selected"] == 2
