"""Divergence guard (NaN/inf steps skipped, k in a row stop the run, loss spikes stop it), no NaN in exports, and
atomic DeepSpeed checkpoints (a crash while saving keeps the previous checkpoint)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SFT_DATA, TINY_SFT_CONFIG, base_args, metric_series, read_metrics, run_cli
from resume_helpers import NanSFT

from rlhf_lightning.checkpointing import partial_path
from rlhf_lightning.guards import TrainingDivergedError, is_spike

SMALL = ["--data.init_args.max_samples", "64", "--data.init_args.val_split", "0", "--data.init_args.batch_size", "8",
         "--model.init_args.lr_scheduler", "constant", "--model.init_args.warmup_steps", "0"]


def test_is_spike_needs_warmup_and_compares_to_the_median():
    assert not is_spike(100.0, [1.0, 1.0], factor=5, warmup=3)  # still warming up
    assert is_spike(100.0, [1.0, 1.0, 50.0], factor=5, warmup=3)  # the median (1.0) ignores one outlier
    assert not is_spike(4.0, [1.0, 1.0, 1.0], factor=5, warmup=3)


@pytest.mark.parametrize("strategy", ["deepspeed", "auto"])
def test_nonfinite_steps_are_skipped_and_three_in_a_row_stop_with_a_checkpoint(tmp_path, tiny_model_dir, capsys,
                                                                              strategy):
    """NaN loss at step 1 (skipped, training goes on), then at steps 3, 4, 5: the run stops after the third, with a
    checkpoint of the weights from before step 3 that resumes. Under DeepSpeed the engine owns the gradients: its
    own overflow check must skip the step and clear them (the next steps train normally)."""
    run_dir = tmp_path / strategy
    NanSFT.weight_sums.clear()
    args = base_args(run_dir, tiny_model_dir) + SMALL + [
        "--model", "resume_helpers.NanSFT", "--model.init_args.nan_steps", "[1, 3, 4, 5]",
        "--trainer.max_steps", "10"] + (["--trainer.strategy", "auto"] if strategy == "auto" else [])
    with pytest.raises(SystemExit):
        run_cli(args)
    message = capsys.readouterr().err
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in message, message
    sums = NanSFT.weight_sums
    assert len(sums) == 6, sums  # stopped after step 5
    assert sums[1] == sums[2] and sums[2] != sums[3] and sums[3] == sums[4] == sums[5], sums
    assert sums[0] != sums[1]
    assert max(metric_series(read_metrics(run_dir), "train/skipped_steps")) >= 2
    checkpoint = run_dir / "checkpoints" / "diverged-step=6.ckpt"
    assert checkpoint.exists() and checkpoint.as_posix() in message
    if strategy == "deepspeed":  # the checkpoint resumes
        resumed = [a if a != "[1, 3, 4, 5]" else "[]" for a in args]
        resumed[resumed.index("--trainer.max_steps") + 1] = "7"
        resumed[resumed.index("--trainer.logger.init_args.version") + 1] = "1"
        run_cli([*resumed, "--ckpt_path", str(checkpoint)])
        with open(run_dir / "csv" / "version_1" / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
        assert [int(r["step"]) for r in rows] == [6] and math.isfinite(float(rows[0]["train/loss"]))


def test_huge_learning_rate_stops_on_a_loss_spike(tmp_path, tiny_model_dir, capsys):
    run_dir = tmp_path / "spike"
    lr = json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": 10.0}})
    with pytest.raises(SystemExit):
        run_cli(base_args(run_dir, tiny_model_dir) + SMALL + [
            "--model.init_args.optimizer", lr, "--model.init_args.loss_spike_factor", "3",
            "--model.init_args.loss_spike_warmup", "1", "--trainer.max_steps", "8"])
    message = capsys.readouterr().err
    assert "model.init_args.loss_spike_factor=3" in message and "lower" in message, message
    assert not (run_dir / "hf").exists()  # nothing exported


def test_export_refuses_non_finite_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rlhf_lightning.callbacks import export_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
        model.lm_head.weight[1, 1] = float("inf")
    with pytest.raises(TrainingDivergedError, match=r"2 weight tensors hold NaN or inf.*up_proj.weight"):
        export_hf(model, None, tmp_path / "hf", rank=0)
    assert not (tmp_path / "hf").exists()


def test_crash_while_saving_a_deepspeed_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, monkeypatch):
    """The engine dies after writing part of the new checkpoint: ``last.ckpt`` must still be the old, loadable one."""
    import deepspeed

    run_dir = tmp_path / "atomic"
    args = base_args(run_dir, tiny_model_dir, data=SFT_DATA, config=TINY_SFT_CONFIG) + SMALL
    run_cli([*args, "--trainer.max_steps", "5"])
    last = run_dir / "checkpoints" / "last.ckpt"
    states = last / "checkpoint" / "mp_rank_00_model_states.pt"
    assert torch.load(states, weights_only=False)["global_step"] == 5

    real_save = deepspeed.DeepSpeedEngine.save_checkpoint

    def dies_half_way(self, save_dir, *a, **kw):
        real_save(self, save_dir, *a, **kw)
        states = next(Path(save_dir).glob("checkpoint/*_states.pt"))  # model (and, at stage 0, optimizer) states
        states.write_bytes(states.read_bytes()[:100])  # a torn write
        raise OSError("No space left on device")

    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "save_checkpoint", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        run_cli([*args, "--trainer.max_steps", "10", "--ckpt_path", "last"])
    monkeypatch.undo()
    assert torch.load(states, weights_only=False)["global_step"] == 5  # untouched
    run_cli([*args, "--trainer.max_steps", "7", "--ckpt_path", "last", "--trainer.logger.init_args.version", "2"])
    assert torch.load(states, weights_only=False)["global_step"] == 7  # resumed from it; a new save swapped in
    assert not partial_path(last).exists() and not list(last.parent.glob("*.old"))
