"""Every config parses; the CLI's subcommands, help and loggers work."""

import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, base_args, run_cli, run_cli_subprocess

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_real_and_tiny_configs():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert {"sft.yaml", "tiny/sft.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_config_parses_and_starts_with_its_command(config: Path, capsys):
    """Every config names the command that runs it on its first line, and that command parses it."""
    from rlhf_lightning.__main__ import COMMANDS

    first_line = config.read_text().splitlines()[0]
    match = re.fullmatch(r"# python -m rlhf_lightning (\S+) --config (\S+)( .*)?", first_line)
    assert match, first_line
    command, path = match.group(1), match.group(2)
    assert command in ("fit", "predict", *COMMANDS), first_line
    assert path == config.relative_to(REPO).as_posix(), first_line
    with pytest.raises(SystemExit) as exit_info:
        run_cli([command, "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    if command in ("fit", "predict"):
        assert "class_path: rlhf_lightning" in capsys.readouterr().out


def test_help_lists_model_options(capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--model", "rlhf_lightning.algorithms.SFT", "--model.help", "rlhf_lightning.algorithms.SFT"])
    out = capsys.readouterr().out
    assert "--model.gradient_checkpointing" in out and "--model.optimizer" in out and "DeepSpeedCPUAdam" in out


def test_several_config_files_and_dotted_overrides(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    warmup_steps: 7\n")
    with pytest.raises(SystemExit):
        run_cli(["fit", "-c", str(REPO / "configs/tiny/sft.yaml"), "-c", str(extra),
                 "--data.init_args.max_len", "64", "--print_config"])
    out = capsys.readouterr().out
    assert "warmup_steps: 7" in out and "max_len: 64" in out


def test_null_for_an_option_nested_in_a_dataclass(tmp_path, capsys):
    """``null`` two levels under ``model`` (a ``bool | None`` and a ``str | None`` field of ``rollout``, an optimizer
    argument) reaches the config as null, and the other keys set for ``rollout`` are kept (jsonargparse alone turns
    these into the string ``None``: see ``nested_nulls_as_dicts``)."""
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    rollout: {share_policy: true, ray_address: 'h:1', backend: ray}\n")
    with pytest.raises(SystemExit):
        run_cli(["fit", "-c", str(REPO / "configs/tiny/grpo.yaml"), "-c", str(extra),
                 "--model.init_args.rollout.share_policy", "null", "--model.init_args.rollout.ray_address=null",
                 "--model.init_args.optimizer.init_args.weight_decay", "null", "--print_config"])
    out = capsys.readouterr().out
    assert "share_policy: null" in out and "ray_address: null" in out and "weight_decay: null" in out
    assert "backend: ray" in out


def test_nested_nulls_as_dicts_leaves_other_options_alone():
    from rlhf_lightning.cli import nested_nulls_as_dicts

    args = ["fit", "--model.init_args.lr", "null", "--trainer.logger.init_args.x", "null",
            "--model.init_args.rollout.generation.num_gpus", "1", "--data.init_args.a.b.c=null"]
    assert nested_nulls_as_dicts(args) == args[:-1] + ["--data.init_args.a", '{"b": {"c": null}}']


def test_wandb_logger_offline(tmp_path, tiny_model_dir):
    """WandbLogger through ``--trainer.logger`` writes an offline run. In a child process with every wandb directory
    under ``tmp_path`` and its optional probes (system stats, git, code) off, so a machine without network or a
    writable home cannot make it hang the suite."""
    run_dir = tmp_path / "wandb"
    wandb_env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
                 "WANDB_DISABLE_CODE": "true", "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_MACHINE_INFO": "true"}
    wandb_env |= {f"WANDB_{d}_DIR": str(tmp_path / f"wandb-{d.lower()}") for d in ("CONFIG", "CACHE", "DATA")}
    args = base_args(run_dir, tiny_model_dir) + [
        "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.offline", "true",
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.logger.init_args.project", "rlhf-lightning-test",
        "--trainer.max_steps", "3",
    ]
    run_cli_subprocess(args, timeout=300, env=wandb_env)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb"))


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_subcommands(tmp_path, tiny_model_dir, subcommand):
    from rlhf_lightning.__main__ import main

    run_dir = tmp_path / subcommand
    args = base_args(run_dir, tiny_model_dir) + ["--data.init_args.val_split", "0.1", "--data.init_args.max_samples",
                                                 "64"]
    args[0] = subcommand
    cli = main(args)
    if subcommand == "predict":  # per-sample mean NLL of the 57 training samples (64 minus the hold-out)
        scores = torch.cat(cli.trainer.predict_loop.predictions)
        assert scores.shape == (57,) and torch.isfinite(scores).all() and (scores > 0).all()
    else:
        metrics = cli.trainer.callback_metrics
        assert torch.isfinite(metrics[f"{'val' if subcommand == 'validate' else 'test'}/loss"])
