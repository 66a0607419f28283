"""The embedded demo task: deterministic data, the rule, its rewards and preference pairs."""

import json
import random

from conftest import REPO

from rlhf_lightning.tasks import reverse


def test_rule_and_rewards_by_hand():
    assert reverse.answer_of("reverse: k e q b") == "b q e k"
    prompts = ["reverse: a b c"] * 4
    responses = ["c b a", " c  b a ", "c a b", "c b"]
    assert reverse.exact_match(prompts, responses, [None] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert reverse.letter_accuracy(prompts, responses, [None] * 4) == [1.0, 1.0, 1 / 3, 0.0]
    assert reverse.exact_match(["reverse: a b"], ["b a"], ["a b"]) == [0.0]  # a given label wins


def test_near_misses_are_always_wrong():
    rng = random.Random(0)
    for _ in range(500):
        prompt, answer = reverse.make_example(rng)
        assert reverse.answer_of(prompt) == answer
        assert reverse.near_miss(rng, answer) != answer


def test_write_data_is_deterministic_and_holds_out_its_test_prompts(tmp_path):
    a = reverse.write_data(tmp_path / "a", seed=3, n_sft=50, n_pairs=20, n_prompts=30, n_heldout=40)
    b = reverse.write_data(tmp_path / "b", seed=3, n_sft=50, n_pairs=20, n_prompts=30, n_heldout=40)
    for name in a:
        assert a[name].read_text() == b[name].read_text()
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in a.items()}
    heldout = {r["prompt"] for r in rows["heldout"]}
    assert len(heldout) == 40
    seen = {r["input"] for r in rows["sft"]} | {r["prompt"] for r in rows["preference"] + rows["prompts"]}
    assert not heldout & seen
    assert all(r["chosen"] != r["rejected"] for r in rows["preference"])


def test_sloppy_demonstrations_swap_the_last_two_letters_of_long_answers(tmp_path):
    files = reverse.write_data(tmp_path, n_sft=300, n_pairs=300, n_prompts=1, n_heldout=1, sft_error_rate=1.0)
    for row in map(json.loads, files["sft"].read_text().splitlines()):
        truth, given = reverse.answer_of(row["input"]).split(), row["output"].split()
        assert given == (truth[:-2] + truth[:-3:-1] if len(truth) >= 6 else truth)
    for row in map(json.loads, files["preference"].read_text().splitlines()):
        assert row["chosen"] == reverse.answer_of(row["prompt"]) != row["rejected"]


def test_bundled_demo_data_is_what_the_generator_writes(tmp_path):
    """examples/data/reverse is `python -m rlhf_lightning.tasks.reverse` output: regenerating it changes nothing."""
    files = reverse.write_data(tmp_path)
    for name, path in files.items():
        assert path.read_text() == (REPO / "examples/data/reverse" / path.name).read_text(), name


def test_demo_split_sft_demonstrations_slip_and_pairs_reject_the_slip():
    sft = [json.loads(line) for line in (REPO / "examples/data/reverse/sft.jsonl").read_text().splitlines()]
    long = [r for r in sft if len(r["output"].split()) >= 6]
    slipped = sum(r["output"] != reverse.answer_of(r["input"]) for r in long) / len(long)
    assert 0.55 < slipped < 0.65  # sft_error_rate 0.6
    assert all(r["output"] == reverse.answer_of(r["input"]) for r in sft if len(r["output"].split()) < 6)
    pairs = [json.loads(line) for line in (REPO / "examples/data/reverse/preference.jsonl").read_text().splitlines()]
    for row in pairs:
        slip = reverse.sloppy_answer(random.Random(0), row["chosen"], 1.0, 6)
        if slip != row["chosen"]:
            assert row["rejected"] == slip
