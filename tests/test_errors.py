"""User mistakes end in one readable line (``error: ...``, exit status 2) before any model loads or DeepSpeed
starts; bugs keep their traceback. Each test here is a row of docs/bad_inputs.md."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO, SFT_DATA, base_args, child_env, run_cli

from rlhf_lightning.__main__ import find_user_error
from rlhf_lightning.cli import short_parse_error
from rlhf_lightning.errors import ConfigError, MissingPathError, UserError

PROMPTS = REPO / "examples" / "data" / "prompts_tiny.jsonl"
GRPO_CONFIG = REPO / "configs" / "tiny" / "grpo.yaml"
EVEN = f"{REPO}/examples/reward_fns.py:even_answer"


def cli_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI in-process; assert it exits with status 2 and return its one-line error message."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err[-5:]
    return err[-1]


def grpo_args(run_dir: Path, model: Path, *extra: str) -> list[str]:
    return base_args(run_dir, model, data=PROMPTS, config=GRPO_CONFIG) + [
        "--model.init_args.reward_functions", json.dumps([EVEN]), "--data.init_args.batch_size", "4",
        "--model.init_args.n_samples_per_prompt", "4", "--model.init_args.micro_batch_size", "8", *extra]


# ------------------------------------------------------------------------------------------- data and paths
def test_missing_column_is_one_line_in_seconds_without_deepspeed(tmp_path):
    """The whole output a user sees, from a child process: the error line last, no traceback, and nothing from
    DeepSpeed or the model (the pre-flight check runs the data set-up before ``trainer.fit``)."""
    import subprocess

    args = base_args(tmp_path / "run", "tiny-llama") + ["--data.init_args.input_key", "question"]
    proc = subprocess.run([sys.executable, "-m", "rlhf_lightning", *args], cwd=REPO, env=child_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "data.init_args.input_key='question'" in last and "'input'" in last
    assert "Traceback" not in output and "deepspeed" not in output.lower() and "[rank0]" not in output
    assert len(output.strip().splitlines()) <= 8, output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_file(tmp_path, capsys):
    message = cli_error(base_args(tmp_path, "tiny-llama", data=tmp_path / "nope.jsonl"), capsys)
    assert "data.init_args.path=" in message and "nope.jsonl" in message and "does not exist" in message


def test_missing_model_directory(tmp_path, capsys):
    message = cli_error(base_args(tmp_path, tmp_path / "no-model"), capsys)
    assert "model.init_args.model=" in message and "does not exist" in message


def test_model_directory_without_weights_is_refused_unless_random_init(tmp_path, tiny_model_dir, capsys):
    """An interrupted export (config and tokenizer, no weights) must not silently train from random weights."""
    broken = tmp_path / "interrupted-export"
    broken.mkdir()
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
    message = cli_error(base_args(tmp_path / "a", broken), capsys)
    assert "model.init_args.model=" in message and "has no weights" in message and "random_init" in message
    # Asking for random weights passes the check (the run then stops at the next check: a bad column).
    message = cli_error(base_args(tmp_path / "b", broken) + ["--model.init_args.random_init", "true",
                                                             "--data.init_args.input_key", "question"], capsys)
    assert "data.init_args.input_key='question'" in message


def test_reference_model_without_weights_names_its_option(tmp_path, tiny_model_dir):
    from rlhf_lightning.algorithms import DPO

    empty = tmp_path / "empty-ref"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(MissingPathError, match=r"model\.init_args\.reference_model=.*has no weights"):
        DPO(model=str(tiny_model_dir), reference_model=str(empty)).check_config(None)


# -------------------------------------------------------------------------------------------------- options
def test_wrong_option_type_is_one_short_line(tmp_path, capsys):
    message = cli_error(base_args(tmp_path, "tiny-llama") + ["--model.init_args.warmup_steps", "abc"], capsys)
    assert message.startswith("error: model.init_args.warmup_steps: ") and "abc" in message
    assert "Union" not in message and "NoneType" not in message


def test_unknown_option_is_one_short_line(tmp_path, capsys):
    message = cli_error(base_args(tmp_path, "tiny-llama") + ["--model.init_args.warmup_step", "3"], capsys)
    assert "warmup_step" in message and "not accepted" in message and "Union" not in message


def test_short_parse_error_keeps_unknown_shapes():
    assert short_parse_error("Unrecognized arguments: --foo 1") == "Unrecognized arguments: --foo 1"
    nested = ('Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [a, b]\n'
              "  Errors:\n    - Problem with given class_path 'pkg.PPO':\n        Parser key \"top_k\":\n"
              "          Expected a <class 'int'>. Got value: x\n    - Expected a <class 'NoneType'>\n"
              "  Given value type: <class 'str'>\n  Given value: x")
    assert short_parse_error(nested) == "model.init_args.top_k: Expected a <class 'int'>. Got value: x (class pkg.PPO)"


def test_grpo_with_one_sample_per_prompt(tmp_path, tiny_model_dir, capsys):
    message = cli_error(grpo_args(tmp_path, tiny_model_dir, "--model.init_args.n_samples_per_prompt", "1"), capsys)
    assert "model.init_args.advantage_estimator=grpo" in message and "n_samples_per_prompt >= 2" in message


@pytest.mark.parametrize("option", ["micro_batch_size", "mini_batch_size"])
def test_batch_larger_than_the_rollout(tmp_path, tiny_model_dir, capsys, option):
    message = cli_error(grpo_args(tmp_path, tiny_model_dir, f"--model.init_args.{option}", "32"), capsys)
    assert f"model.init_args.{option}=32 is larger than the rollout" in message and "= 16" in message


def test_bad_learning_rate_fails_before_the_model_loads(tmp_path, capsys):
    message = cli_error(base_args(tmp_path, "tiny-llama") + ["--model.init_args.optimizer.init_args.lr", "-0.1"],
                        capsys)
    assert "model.init_args.optimizer" in message and "learning rate" in message


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("micro_batch_size", 0, ">= 1"), ("mini_batch_size", 0, ">= 1"), ("ppo_epochs", 0, ">= 1"),
    ("temperature", -0.5, ">= 0"), ("top_p", 0.0, "in (0, 1]"), ("clip_low", 0.0, "in (0, 1)"),
    ("clip_high", -0.2, "> 0"), ("dual_clip", 0.5, "> 1"), ("value_clip", 0.0, "> 0"), ("kl_coef", -0.1, ">= 0"),
    ("gamma", 1.5, "in [0, 1]"), ("max_new_tokens", 0, ">= 1"), ("max_grad_norm", 0.0, "> 0"),
])
def test_impossible_ppo_values_name_the_option(option, value, expected):
    from rlhf_lightning.algorithms import PPO

    with pytest.raises(ConfigError) as info:
        PPO(model="tiny-llama", reward_functions=[EVEN], **{option: value})
    assert str(info.value).startswith(f"model.init_args.{option}={value!r} is invalid: it must be {expected}")


@pytest.mark.parametrize(("module", "options", "match"), [
    ("RewardModel", {"reward_stats_samples": 0}, r"reward_stats_samples=0 is invalid"),
    ("SimPO", {"beta": 0.0}, r"model\.init_args\.beta=0\.0 is invalid"),
    ("ORPO", {"lambda_or": -1.0}, r"model\.init_args\.lambda_or=-1\.0 is invalid"),
    ("SFT", {"lr_scheduler": "cosin"}, r"model\.init_args\.lr_scheduler='cosin' is invalid: it must be one of"),
    ("SFT", {"warmup_steps": -1}, r"model\.init_args\.warmup_steps=-1 is invalid"),
    ("SFT", {"min_lr_ratio": 2.0}, r"model\.init_args\.min_lr_ratio=2\.0 is invalid"),
])
def test_impossible_values_of_other_algorithms(module, options, match):
    import rlhf_lightning.algorithms as algorithms

    with pytest.raises(ConfigError, match=match):
        getattr(algorithms, module)(model="tiny-llama", **options)


def test_reward_weights_must_match_the_reward_sources():
    from rlhf_lightning.algorithms import PPO

    with pytest.raises(ConfigError, match=r"model\.init_args\.reward_weights has 2 entries for 1 reward sources"):
        PPO(model="tiny-llama", reward_functions=[EVEN], reward_weights=[1.0, 0.5])
    with pytest.raises(ConfigError, match="PPO needs a reward"):
        PPO(model="tiny-llama")


@pytest.mark.parametrize(("spec", "match"), [
    ("nofile.py:fn", r"nofile\.py.*does not exist"),
    (f"{REPO}/examples/reward_fns.py:missing", "no callable 'missing'"),
    ("no_such_module_xyz:fn", "No module named 'no_such_module_xyz'"),
])
def test_unknown_reward_function_is_one_line(tmp_path, tiny_model_dir, capsys, spec, match):
    args = grpo_args(tmp_path, tiny_model_dir)
    args[args.index("--model.init_args.reward_functions") + 1] = json.dumps([spec])
    message = cli_error(args, capsys)
    assert "model.init_args.reward_functions" in message
    assert re.search(match, message), message


# ---------------------------------------------------------------------------------------- run directories
def test_second_run_into_a_used_directory_is_refused(tmp_path, capsys):
    """A run's HFExport and ModelCheckpoint directories must be empty unless resuming or ``--overwrite true``."""
    run_dir = tmp_path / "run"
    for used in ("hf", "checkpoints"):
        (run_dir / used).mkdir(parents=True, exist_ok=True)
        (run_dir / used / "from-an-earlier-run").write_text("x")
        message = cli_error(base_args(run_dir, "tiny-llama"), capsys)
        assert f"'{run_dir / used}' already holds files from an earlier run" in message
        assert "--overwrite true" in message and "--ckpt_path last" in message
        (run_dir / used / "from-an-earlier-run").unlink()
    # --overwrite true passes the check (the run then stops at the next check: a bad column).
    (run_dir / "hf" / "from-an-earlier-run").write_text("x")
    message = cli_error(base_args(run_dir, "tiny-llama") + ["--overwrite", "true", "--data.init_args.input_key", "q"],
                        capsys)
    assert "data.init_args.input_key='q'" in message


def test_resume_may_reuse_the_directory_but_needs_a_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "hf").mkdir(parents=True)
    (run_dir / "hf" / "model.safetensors").write_text("x")
    message = cli_error(base_args(run_dir, "tiny-llama") + ["--ckpt_path", "last"], capsys)
    assert message.startswith("error: --ckpt_path last: no last checkpoint") and str(run_dir / "checkpoints") in message
    message = cli_error(base_args(run_dir, "tiny-llama") + ["--ckpt_path", str(tmp_path / "typo.ckpt")], capsys)
    assert "--ckpt_path" in message and "typo.ckpt' does not exist" in message
    # With a last checkpoint present, resuming passes both checks (then stops at the next one: a bad column).
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").mkdir()
    message = cli_error(base_args(run_dir, "tiny-llama") + ["--ckpt_path", "last", "--data.init_args.input_key", "q"],
                        capsys)
    assert "data.init_args.input_key='q'" in message


def test_hf_export_refuses_a_used_directory_in_python_runs(tmp_path):
    """Runs built in Python (no CLI pre-flight) get the same protection when training starts."""
    from lightning.pytorch import Trainer

    from rlhf_lightning.callbacks import HFExport

    (tmp_path / "config.json").write_text("{}")
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match="HFExport dirpath .* already holds files"):
        HFExport(dirpath=str(tmp_path)).on_train_start(trainer, None)
    HFExport(dirpath=str(tmp_path), overwrite=True).on_train_start(trainer, None)
    HFExport(dirpath=str(tmp_path / "new")).on_train_start(trainer, None)


# ------------------------------------------------------------------------------------ verbose, bugs, set-up
def test_verbose_shows_the_traceback(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RLHF_VERBOSE", "0")  # restored afterwards: --verbose sets it for the ranks it launches
    with pytest.raises(ValueError) as info:
        run_cli(grpo_args(tmp_path, tiny_model_dir, "--model.init_args.n_samples_per_prompt", "1", "--verbose"))
    assert isinstance(find_user_error(info.value), ConfigError)


def test_only_user_errors_are_shortened():
    try:
        try:
            raise ConfigError("model.init_args.x is bad")
        except ConfigError as err:
            raise ValueError("Does not validate against any of the Union subtypes") from err
    except ValueError as wrapped:
        assert str(find_user_error(wrapped)) == "model.init_args.x is bad"
    assert find_user_error(KeyError("a bug")) is None
    assert issubclass(MissingPathError, UserError) and issubclass(MissingPathError, FileNotFoundError)


def test_data_setup_is_idempotent(tiny_model_dir):
    """The pre-flight check sets the data up; Lightning's own ``setup`` call must then be free."""
    from rlhf_lightning.data import SFTDataModule

    data = SFTDataModule(path=str(SFT_DATA), tokenizer=str(tiny_model_dir), max_samples=8)
    data.setup("fit")
    first = data.train_dataset
    data.setup("fit")
    assert data.train_dataset is first
