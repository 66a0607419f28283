"""Shared fixtures: offline hub, a saved tiny model, small data files and helpers to run the CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SFT_DATA = REPO / "examples" / "data" / "sft_tiny.jsonl"
CHAT_DATA = REPO / "examples" / "data" / "chat_tiny.jsonl"
TINY_SFT_CONFIG = REPO / "configs" / "tiny" / "sft.yaml"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled tiny Llama, randomly initialised once and saved with ``save_pretrained`` (weights + tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhf_lightning.models import TINY_PRESET_DIR

    out = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_PRESET_DIR)).save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY_PRESET_DIR).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model after a short SFT (the PPO-family tests start from it): it answers with numbers, so
    number-shaped rewards are learnable."""
    run_dir = tmp_path_factory.mktemp("sft-for-ppo")
    run_cli(base_args(run_dir, tiny_model_dir, data=SFT_DATA) + ["--trainer.max_epochs", "2"])
    return run_dir / "hf"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Epochs the tests were tuned with; the tiny configs themselves are tuned for the demo (scripts/pipeline.py).
TEST_EPOCHS = {"sft.yaml": 3, "rm.yaml": 2}


def base_args(run_dir: Path, model: Path | str, data: Path = SFT_DATA, config: Path = TINY_SFT_CONFIG) -> list[str]:
    """CLI args for a short run writing logs, checkpoints and the HF export under ``run_dir``."""
    epochs = ["--trainer.max_epochs", str(TEST_EPOCHS[config.name])] if config.name in TEST_EPOCHS else []
    return [
        "fit", "--config", str(config), *epochs,
        "--model.init_args.model", str(model),
        "--data.init_args.path", str(data),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.logger.init_args.name", "csv",
        "--trainer.logger.init_args.version", "0",
        "--trainer.callbacks", json.dumps([
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(run_dir / "checkpoints"), "save_last": True, "every_n_train_steps": 5}},
            {"class_path": "rlhf_lightning.callbacks.HFExport", "init_args": {"dirpath": str(run_dir / "hf")}},
        ]),
        "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1",
    ]


def run_cli(args: list[str]) -> None:
    """Run ``python -m rlhf_lightning`` in this process (one trainer rank)."""
    from rlhf_lightning.__main__ import main

    main(args)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process. An earlier in-process run leaves Lightning's rendezvous variables
    (MASTER_PORT, still bound by this process...) behind: they are dropped."""
    leaked = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE",
              "RAY_ADDRESS"}
    return {k: v for k, v in os.environ.items() if k not in leaked} | {"PYTHONPATH": str(REPO)} | (extra or {})


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s whole process group (it was started as a session leader): Lightning's extra ranks, Ray and
    anything else it started die with it, whatever ended the test (its own timeout, pytest-timeout, Ctrl-C)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_child(cmd: list[str], timeout: float = 600, env: dict[str, str] | None = None, cwd: Path = REPO,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a child process with :func:`child_env` and stdin closed (nothing can wait for keyboard
    input); fail the test with what it printed if it exits non-zero (unless ``check`` is off) or is still running
    after ``timeout``.

    The child leads its own process group, which is killed when the call ends for any reason, so a timed-out
    test leaves no grandchildren (trainer ranks, Ray workers) running behind it."""
    name = " ".join(cmd[1:3])
    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, errs = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc)
        out, errs = proc.communicate()
        pytest.fail(f"{name} did not finish within {timeout:.0f} s:\n{out[-3000:]}\n{errs[-6000:]}")
    finally:
        kill_process_group(proc)
    assert proc.returncode == 0 or not check, f"{name} failed ({proc.returncode}):\n{out[-3000:]}\n{errs[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, errs)


def run_cli_subprocess(args: list[str], timeout: float = 600, env: dict[str, str] | None = None
                       ) -> subprocess.CompletedProcess:
    """Run the CLI in a child process (needed for several ranks: Lightning re-launches the command per rank)."""
    return run_child([sys.executable, "-m", "rlhf_lightning", *args], timeout, env)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def metric_series(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(file))
    return state
