"""examples/python_api.py: the Python API run of a custom DPO variant, a custom reward and a custom callback."""

import csv
import sys

import torch
from conftest import REPO, base_args, load_weights, run_child, run_cli


def test_python_api_example_trains_dpo_variant_then_grpo_with_custom_reward(tmp_path, tiny_model_dir):
    # A short SFT on the demo task first: from random weights every reward is 0 and GRPO has nothing to learn from.
    run_cli(base_args(tmp_path / "sft", tiny_model_dir, data=REPO / "examples/data/reverse/sft.jsonl")
            + ["--trainer.max_steps", "100"])
    sft_model = tmp_path / "sft/hf"
    out = tmp_path / "api"
    proc = run_child([sys.executable, str(REPO / "examples/python_api.py"), "--model", str(sft_model), "--out",
                      str(out), "--dpo-steps", "4", "--grpo-steps", "3", "--max-pairs", "128"], cwd=tmp_path)
    assert "grpo   held-out exact match" in proc.stdout
    start, dpo, grpo = (load_weights(d) for d in (sft_model, out / "dpo/hf", out / "grpo/hf"))
    key = "model.embed_tokens.weight"
    assert not torch.equal(start[key], dpo[key]) and not torch.equal(dpo[key], grpo[key])
    for stage, steps in (("dpo", 4), ("grpo", 3)):
        rows = list(csv.DictReader(open(out / stage / "csv/version_0/generations.csv")))
        assert {int(r["step"]) for r in rows} == {steps} and len(rows) == 2  # the callback logged at the end
    grpo_rewards = [float(r["train/reward"]) for r in csv.DictReader(open(out / "grpo/csv/version_0/metrics.csv"))
                    if r.get("train/reward")]
    assert len(grpo_rewards) == 3 and all(0.0 <= r <= 1.0 for r in grpo_rewards)  # reversal_prefix's range
    assert max(grpo_rewards) > 0


def test_reversal_prefix_reward_by_hand():
    sys.path.insert(0, str(REPO / "examples"))
    from reward_fns import reversal_prefix

    prompts = ["reverse: a b c"] * 5
    got = reversal_prefix(prompts + ["reverse: a b"], ["c b a", "c b x", "c a b", "c b a d", "x", "x y z"], [None] * 6)
    assert got == [1.0, 2 / 3, 1 / 3, 2 / 3, 0.0, 0.0]  # never below 0, even with extra letters
