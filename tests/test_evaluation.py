"""``python -m rlhf_lightning evaluate``: the statistics against hand-computed values, the bad inputs it refuses
before loading a model, and one run on two tiny policies judged by a tiny reward model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_cli, write_jsonl

from rlhf_lightning import eval_stats
from rlhf_lightning.errors import ConfigError, DataError, MissingPathError
from rlhf_lightning.eval_steps import PromptSet, Sampling
from rlhf_lightning.evaluation import EvalConfig, ModelSpec, PassAtK, parse_config, run_evaluation
from rlhf_lightning.tasks import reverse

HELDOUT = REPO / "examples" / "data" / "reverse" / "heldout.jsonl"
EXACT = "rlhf_lightning.tasks.reverse:exact_match"


# ------------------------------------------------------------------------------------------------- statistics
def test_pass_at_k_by_hand():
    assert eval_stats.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert eval_stats.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert eval_stats.pass_at_k(4, 0, 2) == 0.0  # c = 0
    assert eval_stats.pass_at_k(4, 4, 2) == 1.0  # c = n
    assert eval_stats.pass_at_k(4, 1, 4) == 1.0 and eval_stats.pass_at_k(4, 0, 4) == 0.0  # n = k
    assert eval_stats.pass_at_k(5, 3, 3) == 1.0  # n - c < k: every draw holds a pass
    for n, c, k in [(200, 10, 100), (200, 1, 1), (50, 25, 10)]:  # the product form against exact binomials
        assert eval_stats.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    assert eval_stats.mean_pass_at_k([[True, False], [False, False]], 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        eval_stats.pass_at_k(4, 1, 5)


def test_outcomes_count_ties_within_the_margin():
    a, b = [1.0, 0.2, 0.5, 0.3], [0.0, 0.2, 0.6, 0.35]
    assert eval_stats.outcomes(a, b) == [1.0, 0.5, 0.0, 0.0]
    assert eval_stats.outcomes(a, b, tie_margin=0.05) == [1.0, 0.5, 0.0, 0.5]


def test_win_rate_intervals_by_hand():
    per_prompt = [1.0] * 6 + [0.5] * 2 + [0.0] * 2  # 6 wins, 2 ties, 2 losses: (6 + 1) / 10
    result = eval_stats.win_rate(per_prompt)
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (6, 2, 2, 10)
    assert result["win_rate"] == pytest.approx(0.7)
    # Wilson, 7 of 10, z = 1.96: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n) = 0.3968, 0.8922
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((0.3968, 0.8922), abs=1e-4)
    # normal approximation: s^2 = (6 * 0.3^2 + 2 * 0.2^2 + 2 * 0.7^2) / 9 = 1.6 / 9; 0.7 -+ 1.96 * sqrt(s^2 / 10)
    normal = eval_stats.win_rate(per_prompt, method="normal")
    assert (normal["ci_low"], normal["ci_high"]) == pytest.approx((0.4387, 0.9613), abs=1e-4)
    all_wins = eval_stats.win_rate([1.0] * 10)  # Wilson does not collapse at 100%: lower = n / (n + z^2)
    assert all_wins["ci_high"] == 1.0 and all_wins["ci_low"] == pytest.approx(10 / (10 + 1.959964**2), abs=1e-6)
    all_ties = eval_stats.win_rate([0.5] * 4)
    assert all_ties["win_rate"] == 0.5 and all_ties["ci_low"] < 0.5 < all_ties["ci_high"]


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_policies_and_rm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model, a copy with perturbed weights, and a tiny reward model (a real sequence-classification
    model with one output, randomly initialised), each saved with ``save_pretrained``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("eval-models")
    torch.manual_seed(1)
    perturbed = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    perturbed.save_pretrained(root / "perturbed")
    rm = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(tiny_model_dir, num_labels=1))
    rm.save_pretrained(root / "rm")
    for name in ("perturbed", "rm"):
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / name)
    return {"base": tiny_model_dir, "perturbed": root / "perturbed", "rm": root / "rm"}


def eval_yaml(tmp_path: Path, models: dict[str, Path], rm: Path, **extra: object) -> Path:
    rule = tmp_path / "rules.py"  # a rule a random model passes sometimes, so pass@k is not trivially 0
    rule.write_text("def even_length(prompts, responses, labels):\n"
                    "    return [float(len(r) % 2 == 0) for r in responses]\n")
    write_jsonl(tmp_path / "prompts.jsonl", [json.loads(line) for line in HELDOUT.read_text().splitlines()[:6]])
    config = {"models": [{"name": n, "path": str(p)} for n, p in models.items()], "baseline": "base",
              "prompts": {"path": str(tmp_path / "prompts.jsonl"), "label_key": "answer"},
              "generation": {"max_new_tokens": 8}, "pass_at_k": {"n": 4, "k": [1, 2, 4], "temperature": 1.0},
              "reward_model": str(rm), "reward_functions": [EXACT, f"{rule}:even_length"],
              "reward_weights": [1.0, 2.0, 0.5], "output_dir": str(tmp_path / "out"), **extra}
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_evaluate_end_to_end(tmp_path, tiny_policies_and_rm, capsys):
    """Identical models tie on every prompt (win rate exactly 0.5); the outputs are written; pass@k, the mean
    rewards and the combined reward agree with direct computations from the saved answers and scores."""
    m = tiny_policies_and_rm
    models = {"base": m["base"], "same": m["base"], "perturbed": m["perturbed"]}
    run_cli(["evaluate", "--config", str(eval_yaml(tmp_path, models, m["rm"])), "--pass_at_k.k", "[1, 2, 4]"])
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    same = results["win_rate"]["same"]
    assert (same["win_rate"], same["ties"], same["wins"], same["losses"]) == (0.5, 6, 0, 0)
    other = results["win_rate"]["perturbed"]
    assert other["wins"] + other["ties"] + other["losses"] == 6 and other["ci_low"] <= other["win_rate"]
    rows = results["per_prompt"]
    assert [r["outcomes"]["perturbed"] for r in rows] == eval_stats.outcomes(
        [r["scores"]["perturbed"]["rm"] for r in rows], [r["scores"]["base"]["rm"] for r in rows])
    assert any(r["answers"]["perturbed"] != r["answers"]["base"] for r in rows)  # really a different policy
    for name in models:
        samples = [r["samples"][name] for r in rows]
        assert all(len(s) == 4 for s in samples)
        for fn, spec in [("exact_match", reverse.exact_match), ("even_length", None)]:
            passed = [[(spec([r["prompt"]] * 4, s, [r["label"]] * 4) if spec else [float(len(x) % 2 == 0) for x in s])
                       [i] >= 1.0 for i in range(4)] for r, s in zip(rows, samples, strict=True)]
            for k in (1, 2, 4):
                assert results["pass_at_k"][name][fn][str(k)] == pytest.approx(eval_stats.mean_pass_at_k(passed, k))
        means = results["mean_reward"][name]
        lengths = [float(len(r["answers"][name]) % 2 == 0) for r in rows]
        assert means["even_length"] == pytest.approx(sum(lengths) / 6)
        combined = [r["scores"][name]["rm"] + 2 * r["scores"][name]["exact_match"] + 0.5 * e
                    for r, e in zip(rows, lengths, strict=True)]
        assert means["combined"] == pytest.approx(sum(combined) / 6)
    assert 0 < results["pass_at_k"]["base"]["even_length"]["4"] <= 1
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = (out / "results.md").read_text()
    assert "| same | 50.0% |" in tables and "pass@4" in tables and "| model | rm | exact_match |" in tables
    assert tables in capsys.readouterr().out


def test_reverse_evaluate_answers_as_the_former_greedy_path(tmp_path, tiny_policies_and_rm):
    """``reverse.evaluate`` now generates through the evaluation steps: its greedy answers are exactly those of the
    former ``models.greedy_answers`` path (labels set to those answers on half the prompts give accuracy 0.5), and
    its reward-model score is the former one-batch scoring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_lightning.data.collate import pad_sequences
    from rlhf_lightning.data.formatting import encode_prompt_response
    from rlhf_lightning.models import greedy_answers
    from rlhf_lightning.rollout.workers import RewardModelWorker

    model_dir, rm = tiny_policies_and_rm["perturbed"], tiny_policies_and_rm["rm"]
    prompts = [json.loads(line)["prompt"] for line in HELDOUT.read_text().splitlines()[:8]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    before = greedy_answers(AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer, prompts, 20)
    assert len(set(before)) > 1
    labels = [" ".join(a.split()) + ("" if i % 2 == 0 else " x") for i, a in enumerate(before)]  # as exact_match
    heldout = write_jsonl(tmp_path / "heldout.jsonl",
                          [{"prompt": p, "answer": a} for p, a in zip(prompts, labels, strict=True)])
    result = reverse.evaluate(model_dir, heldout, reward_model=rm)
    assert result["accuracy"] == 0.5
    sequences = [sum(encode_prompt_response(tokenizer, p, r), []) for p, r in zip(prompts, before, strict=True)]
    former = RewardModelWorker(str(rm), device="cpu").score(pad_sequences(sequences, tokenizer.pad_token_id),
                                                             pad_sequences([[1] * len(s) for s in sequences], 0))
    assert result["reward_model_score"] == pytest.approx(former.mean().item(), abs=1e-6)


def test_sampled_answers_do_not_depend_on_the_batch_size(tiny_model_dir):
    from rlhf_lightning.eval_steps import encode_prompts, generate_texts
    from rlhf_lightning.models import load_tokenizer
    from rlhf_lightning.rollout.workers import GenerationWorker

    records = [{"prompt": json.loads(line)["prompt"], "source_file": "h.jsonl", "source_line": i}
               for i, line in enumerate(HELDOUT.read_text().splitlines()[:5], start=1)]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt_ids, _ = encode_prompts(records, tokenizer, PromptSet(path="h.jsonl"))
    worker = GenerationWorker(str(tiny_model_dir), device="cpu")
    sampling = Sampling(max_new_tokens=6, temperature=1.0)
    whole = generate_texts(worker, tokenizer, prompt_ids, sampling, 3, batch_size=0, prompt_seeds=[7, 8, 9, 10, 11])
    pieces = generate_texts(worker, tokenizer, prompt_ids, sampling, 3, batch_size=2, prompt_seeds=[7, 8, 9, 10, 11])
    assert whole == pieces and len({a for row in whole for a in row}) > 1


# ------------------------------------------------------------------------------------------------- bad inputs
def config_for(tmp_path: Path, model: Path, rm: Path | None, **changes: object) -> EvalConfig:
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "reverse: a b", "answer": "b a"}])
    config = EvalConfig(models=[ModelSpec("a", str(model)), ModelSpec("b", str(model))],
                        prompts=PromptSet(path=str(tmp_path / "p.jsonl"), label_key="answer"),
                        generation=Sampling(max_new_tokens=4), reward_model=str(rm) if rm else None,
                        reward_functions=[EXACT], output_dir=str(tmp_path / "out"))
    for key, value in changes.items():
        setattr(config, key, value)
    return config


BAD = {  # option changed -> (error class, words the one-line message must contain)
    "missing model": ({"models": [ModelSpec("a", "./no/such/model")]}, MissingPathError, "models[0].path"),
    "missing prompts": ({"prompts": PromptSet(path="./no/prompts.jsonl")}, MissingPathError, "prompts.path"),
    "missing column": ({"prompts": PromptSet(path="{tmp}/p.jsonl", prompt_key="question")}, DataError,
                       "prompts.prompt_key='question'"),
    "unknown reward fn": ({"reward_functions": ["rlhf_lightning.tasks.reverse:nope"]}, ConfigError,
                          "reward_functions[0]"),
    "k > n": ({"pass_at_k": PassAtK(n=2, k=[1, 4])}, ConfigError, "pass_at_k.k"),
    "greedy samples": ({"pass_at_k": PassAtK(n=2, k=[1], temperature=0.0)}, ConfigError, "pass_at_k.temperature"),
    "win rate without RM": ({"reward_model": None, "win_rate": True}, ConfigError, "reward_model"),
    "baseline not a model": ({"baseline": "ppo"}, ConfigError, "baseline='ppo'"),
    "weights vs sources": ({"reward_weights": [1.0]}, ConfigError, "reward_weights"),
    "nothing to measure": ({"reward_model": None, "reward_functions": []}, ConfigError, "Nothing to measure"),
    "RM without score head": ({"reward_model": "{model}"}, ConfigError, "has no score head"),
    "duplicate names": ({"models": [ModelSpec("a", "tiny-llama")] * 2}, ConfigError, "models[*].name"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_fails_before_a_model_loads(case, tmp_path, tiny_policies_and_rm, monkeypatch):
    from rlhf_lightning.rollout import workers

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(workers.ModelWorker, "__init__", no_model)
    changes, error, words = BAD[case]
    if "prompts" in changes:  # the prompt file of config_for, in this test's directory
        changes = {"prompts": PromptSet(**{**vars(changes["prompts"]), "path": changes["prompts"].path.format(
            tmp=tmp_path)})}
    if changes.get("reward_model") == "{model}":  # the policy (a causal LM) given as the judge
        changes = {"reward_model": str(tiny_policies_and_rm["base"])}
    with pytest.raises(error) as info:
        run_evaluation(config_for(tmp_path, tiny_policies_and_rm["base"], tiny_policies_and_rm["rm"], **changes))
    assert words in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_cli_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["evaluate", "--models", '[{name: a, path: ./missing/model}]', "--prompts.path", str(HELDOUT),
                 "--reward_functions", f"[{EXACT}]"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: models[0].path='./missing/model' does not exist")


@pytest.mark.parametrize("name", ["tiny/evaluate.yaml", "evaluate.yaml"])
def test_evaluate_configs_parse_and_start_with_their_command(name):
    path = REPO / "configs" / name
    assert path.read_text().splitlines()[0] == f"# python -m rlhf_lightning evaluate --config configs/{name}"
    config = parse_config(["--config", str(path)])
    assert config.models[0].name == "sft" and config.baseline == "sft" and config.reward_model
