"""Real DeepSpeed ZeRO-2 (+ optimizer CPU offload) and ZeRO-3 on CPU, with 1 and 2 processes."""

import json
import logging

import pytest
import torch
from conftest import base_args, load_weights, metric_series, read_metrics, run_cli, run_cli_subprocess, write_jsonl
from transformers import AutoModelForCausalLM


def strategy_args(stage: int, offload: bool = False, devices: int = 1) -> list[str]:
    return ["--trainer.devices", str(devices), "--trainer.strategy.init_args.stage", str(stage),
            "--trainer.strategy.init_args.offload_optimizer", str(offload).lower()]


@pytest.fixture(scope="module")
def fixed_length_data(tmp_path_factory):
    """Every sample tokenizes to the same length, so per-rank token means equal the global token mean."""
    rows = [{"input": f"What is {10 + i % 40} + {10 + (7 * i) % 40}?", "output": str(20 + i % 40 + (7 * i) % 40)}
            for i in range(64)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "fixed.jsonl", rows)


def sgd_args(lr: float = 0.5) -> list[str]:
    return ["--model.init_args.optimizer", json.dumps({"class_path": "torch.optim.SGD", "init_args": {"lr": lr}}),
            "--model.init_args.lr_scheduler", "constant", "--data.init_args.shuffle", "false"]


def test_zero2_two_ranks_match_single_process_gradients(tmp_path, tiny_model_dir, fixed_length_data):
    """2 ranks x batch 4 under ZeRO-2 must take the same SGD steps as 1 plain process with batch 8."""
    single, double = tmp_path / "single", tmp_path / "double"
    common = sgd_args() + ["--trainer.max_steps", "3"]
    run_cli(base_args(single, tiny_model_dir, data=fixed_length_data) + common
            + ["--trainer.strategy", "auto", "--data.init_args.batch_size", "8"])
    run_cli_subprocess(base_args(double, tiny_model_dir, data=fixed_length_data) + common
                       + strategy_args(2, devices=2) + ["--data.init_args.batch_size", "4"])
    start, a, b = load_weights(tiny_model_dir), load_weights(single / "hf"), load_weights(double / "hf")
    for name in a:
        assert not torch.equal(a[name], start[name]) or "norm" in name
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_one_process_zero2_trains_as_stage_0_with_the_same_adamw_steps(tmp_path, tiny_model_dir, capsys, caplog):
    """One process, ZeRO-2 config, no offload: DeepSpeed stage 0 (no partitioning overhead), with the same AdamW
    steps (clipped at norm 1) as real ZeRO-2 (``zero_on_one_process: true``); the log says which one ran."""
    runs = {"stage0": [], "zero2": ["--trainer.strategy.init_args.zero_on_one_process", "true"]}
    clip = ["--trainer.gradient_clip_val", "1.0", "--trainer.max_steps", "5", "--data.init_args.shuffle", "false"]
    for name, extra in runs.items():
        caplog.clear()
        with caplog.at_level(logging.INFO):
            run_cli(base_args(tmp_path / name, tiny_model_dir) + strategy_args(2) + clip + extra)
        assert ("training as stage 0" in caplog.text) == (name == "stage0")
    a, b = load_weights(tmp_path / "stage0/hf"), load_weights(tmp_path / "zero2/hf")
    start = load_weights(tiny_model_dir)
    assert not torch.equal(a["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # the optimizer state lives in the stage-0 model states file, not in ZeRO partitions
    assert not list((tmp_path / "stage0/checkpoints/last.ckpt/checkpoint").glob("*optim_states.pt"))
    assert list((tmp_path / "zero2/checkpoints/last.ckpt/checkpoint").glob("*optim_states.pt"))
    # Resuming one layout in the other mode is refused with the option to change, before any step runs.
    refusals = {"stage0": "was written by a one-process DeepSpeed stage-0 run",
                "zero2": "holds ZeRO-partitioned optimizer state"}
    for name in runs:
        other = runs["zero2" if name == "stage0" else "stage0"]
        capsys.readouterr()
        with pytest.raises(SystemExit):
            run_cli(base_args(tmp_path / name, tiny_model_dir) + strategy_args(2) + clip + other
                    + ["--trainer.max_steps", "7", "--ckpt_path", "last"])
        assert refusals[name] in capsys.readouterr().err


def test_zero2_offload_single_process(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "z2"
    run_cli(base_args(run_dir, tiny_model_dir) + strategy_args(2, offload=True) + ["--trainer.max_steps", "6"])
    losses = metric_series(read_metrics(run_dir), "train/loss")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert not torch.equal(load_weights(run_dir / "hf")["lm_head.weight" if False else "model.embed_tokens.weight"],
                           load_weights(tiny_model_dir)["model.embed_tokens.weight"])


@pytest.mark.parametrize(("stage", "offload"), [(2, True), (3, False), (3, True)])
def test_two_ranks_train_and_export(tmp_path, tiny_model_dir, stage, offload):
    run_dir = tmp_path / f"z{stage}"
    run_cli_subprocess(base_args(run_dir, tiny_model_dir) + strategy_args(stage, offload, devices=2)
                       + ["--trainer.max_steps", "6"])
    losses = metric_series(read_metrics(run_dir), "train/loss")
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    exported, start = load_weights(run_dir / "hf"), load_weights(tiny_model_dir)
    assert exported.keys() == start.keys()  # consolidated from ZeRO shards, full shapes
    assert all(exported[k].shape == start[k].shape for k in start)
    assert not torch.equal(exported["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    AutoModelForCausalLM.from_pretrained(run_dir / "hf")  # loads with plain transformers
    if stage == 3:
        assert any((run_dir / "checkpoints" / "last.ckpt" / "checkpoint").glob("*zero_pp_rank_1*"))


def test_zero3_loads_pretrained_weights_into_partitions(tmp_path, tiny_model_dir):
    """With lr=0, a ZeRO-3 run must export exactly the weights it loaded (partitioned load + gathered export)."""
    run_dir = tmp_path / "z3"
    lr0 = json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.0}})
    run_cli(base_args(run_dir, tiny_model_dir) + strategy_args(3) + ["--trainer.max_steps", "1",
                                                                     "--model.init_args.optimizer", lr0])
    exported, start = load_weights(run_dir / "hf"), load_weights(tiny_model_dir)
    for name in start:
        torch.testing.assert_close(exported[name], start[name], atol=0, rtol=0, msg=name)
