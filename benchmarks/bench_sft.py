"""SFT throughput: this project's ``SFT`` (DeepSpeed ZeRO-2 and plain ``auto`` strategy) against TRL's ``SFTTrainer``.

    python benchmarks/bench_sft.py --model tiny --steps 30 --warmup 5 --repeats 3 --out benchmarks/results

Both sides train the same Llama weights (built once at a fixed seed and saved with ``save_pretrained``), on the
same generated jsonl of prompt/completion pairs, with the same batch size, sequence length, dtype, optimizer
(``torch.optim.AdamW``), constant learning rate, gradient clipping (norm 1.0) and number of optimizer steps; the
loss is on the completion only; no chat template, validation, checkpointing, logging backend or progress bar.
Every sample is exactly ``--prompt-len + --completion-len + 1`` (EOS) tokens long (one token per word), so there is
no padding and tokens/step is exact; each child process checks it by counting the batches it trains on.

Every repeat of every side runs in a fresh child process (sides interleaved: ours-deepspeed, ours-auto, trl,
ours-deepspeed, ...), after one throwaway warm-up process. A child records the wall time of every optimizer step
(the time between the ends of consecutive steps: forward, backward, clipping, optimizer step, and the framework's
data loading, logging and callbacks between steps) and, separately, the time inside the step hooks. Throughput
is measured over the steps after ``--warmup``; start-up (imports, model loading, tokenization) is excluded.
Peak memory is the child's peak RSS (``VmHWM`` in ``/proc/self/status``) at the end of training.

Results: ``<out>/sft_<model>_<device>.json`` (everything, per-step times included) and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_SUBDIR = Path("rlhf_lightning") / "assets" / "tiny-llama"
SIDES = ("ours-deepspeed", "ours-auto", "trl")
SIDE_LABEL = {"ours-deepspeed": "rlhf_lightning SFT, DeepSpeed ZeRO-2",
              "ours-auto": "rlhf_lightning SFT, strategy auto", "trl": "TRL SFTTrainer"}
# Model presets: config overrides on top of the bundled tiny-llama config (vocab 1024, tied embeddings).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
              "head_dim": 64, "intermediate_size": 2560},
}
SEED = 42
ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
       "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


# ------------------------------------------------------------------------------------------------- child helpers
def peak_rss_mib() -> float:
    """This process's peak resident set size (``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
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


class StepLog:
    """Per-step wall-clock times and token counts, shared by the Lightning and TRL timers."""

    def __init__(self) -> None:
        self.begin: list[float] = []
        self.end: list[float] = []
        self.tokens: list[int] = []  # non-padding tokens per optimizer step
        self.label_tokens: list[int] = []  # tokens with a loss target per step (before the shift)
        self.samples: list[int] = []
        self.widths: list[int] = []  # padded sequence length of the batch
        self.own_cpu: list[float] = []  # this process's CPU seconds at each step end
        self.busy_cpu: list[float] = []  # the whole machine's busy CPU seconds at each step end
        self.info: dict[str, Any] = {}

    def step_begin(self) -> None:
        self.begin.append(time.perf_counter())
        if not self.own_cpu:
            self.own_cpu.append(time.process_time())
            self.busy_cpu.append(system_busy_s())

    def step_end(self) -> None:
        self.end.append(time.perf_counter())
        self.own_cpu.append(time.process_time())
        self.busy_cpu.append(system_busy_s())

    def count(self, batch: dict[str, Any]) -> None:
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.label_tokens.append(int((batch["labels"] != -100).sum()))
        self.samples.append(int(batch["input_ids"].shape[0]))
        self.widths.append(int(batch["input_ids"].shape[1]))

    def describe_model(self, model: Any) -> None:
        import torch

        self.info.update(param_checksum=param_checksum(model), torch_threads=torch.get_num_threads(),
                         param_dtype=str(next(model.parameters()).dtype),
                         gradient_checkpointing=bool(getattr(model, "is_gradient_checkpointing", False)),
                         attn_implementation=getattr(model.config, "_attn_implementation", None),
                         model_class=type(model).__name__)

    def result(self) -> dict[str, Any]:
        return {"step_begin": self.begin, "step_end": self.end, "own_cpu": self.own_cpu, "busy_cpu": self.busy_cpu,
                "tokens": self.tokens,
                "label_tokens": self.label_tokens, "samples": self.samples, "widths": self.widths, **self.info}


def precision_of(dtype: str) -> str:
    return {"fp32": "32-true", "bf16": "bf16-mixed"}[dtype]


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with ``rlhf_lightning``'s CLI (built in-process with ``run=False`` so a timing callback can be added)."""
    pin_threads(spec["threads"])
    import torch
    from lightning.pytorch.callbacks import Callback

    from rlhf_lightning.cli import RLHFCLI

    log = StepLog()

    class LightningStepTimer(Callback):
        """Wall time of each training batch (one optimizer step: no gradient accumulation)."""

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            log.describe_model(pl_module.model)
            log.info["strategy"] = type(trainer.strategy).__name__
            log.info["optimizer"] = type(trainer.optimizers[0]).__name__
            log.info["precision"] = str(trainer.precision)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            log.count(batch)
            log.step_begin()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            log.step_end()

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
        "--trainer.gradient_clip_val", "1.0",
        "--trainer.log_every_n_steps", "10",
        "--trainer.default_root_dir", spec["root_dir"],
        "--model.init_args.model", spec["model_dir"],
        "--model.init_args.dtype", "float32",
        "--model.init_args.gradient_checkpointing", "false",
        "--model.init_args.optimizer", json.dumps(optimizer),
        "--model.init_args.lr_scheduler", "constant",
        "--model.init_args.warmup_steps", "0",
        "--data.init_args.path", spec["data"],
        "--data.init_args.input_key", "prompt",
        "--data.init_args.output_key", "completion",
        "--data.init_args.val_split", "0",
        "--data.init_args.max_len", str(spec["max_len"]),
        "--data.init_args.batch_size", str(spec["batch_size"]),
        "--data.init_args.use_chat_template", "false",
        "--data.init_args.num_workers", "0",
    ]
    if spec["side"] == "ours-auto":
        args += ["--trainer.strategy", "auto"]
    else:
        args += ["--trainer.strategy", "rlhf_lightning.strategies.DeepSpeedStrategy",
                 "--trainer.strategy.init_args.stage", "2"]
    try:
        cli = RLHFCLI(args=args, run=False)
        cli.trainer.callbacks.append(LightningStepTimer())
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return log.result()


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL's ``SFTTrainer`` (prompt/completion data, completion-only loss, no packing)."""
    pin_threads(spec["threads"])
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    log = StepLog()

    class TRLStepTimer(TrainerCallback):
        """Wall time of each optimizer step (``gradient_accumulation_steps=1``)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            log.describe_model(model)
            optimizer = kwargs.get("optimizer")
            log.info["optimizer"] = type(getattr(optimizer, "optimizer", optimizer)).__name__
            log.info["precision"] = "bf16-mixed" if args.bf16 else "32-true"

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            log.step_begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            log.step_end()

    class CountingCollator:
        """Wraps TRL's collator to count the tokens of every batch it builds."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __call__(self, features: list[dict]) -> dict:
            batch = self.inner(features)
            log.count(batch)
            return batch

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    bf16 = spec["dtype"] == "bf16"
    config = SFTConfig(
        output_dir=spec["root_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim=spec["trl_optim"],
        max_grad_norm=1.0,
        bf16=bf16,
        fp16=False,
        activation_checkpointing=False,  # TRL 1.16 defaults to True (alias of gradient_checkpointing)
        use_cpu=spec["device"] == "cpu",
        report_to="none",
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        max_length=spec["max_len"],
        packing=False,
        padding_free=False,
        completion_only_loss=True,
        dataloader_num_workers=0,
        seed=SEED,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
    )
    trainer = SFTTrainer(model=spec["model_dir"], args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[TRLStepTimer()])
    trainer.data_collator = CountingCollator(trainer.data_collator)
    trainer.train()
    return log.result()


def run_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Build and save the model + tokenizer, write the data, and check the token counts of both formattings."""
    pin_threads(spec["threads"])
    import random

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhf_lightning.data.formatting import render_prompt_response, tokenize_with_spans

    model_dir, data = Path(spec["model_dir"]), Path(spec["data"])
    tokenizer_dir = str(Path(spec["project_root"]) / TOKENIZER_SUBDIR)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.from_pretrained(tokenizer_dir, **MODEL_PRESETS[spec["model"]])
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())

    # Words that are exactly one token after a space ("Ġword"), letters only, so "  w1 w2 ..." is one token per word.
    words = sorted(tok[1:] for tok in tokenizer.get_vocab() if tok.startswith("Ġ") and tok[1:].isascii()
                   and tok[1:].isalpha() and len(tok) > 2)
    words = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(SEED)
    n_samples = spec["steps"] * spec["batch_size"]
    with data.open("w") as f:
        for _ in range(n_samples):
            prompt = "".join(" " + rng.choice(words) for _ in range(spec["prompt_len"]))
            completion = "".join(" " + rng.choice(words) for _ in range(spec["completion_len"]))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")

    # Both formattings of the first rows: ours (plain concatenation + EOS) and TRL's (prompt + completion + EOS).
    expected = spec["prompt_len"] + spec["completion_len"] + 1
    with data.open() as f:
        rows = [json.loads(line) for line, _ in zip(f, range(32), strict=False)]
    for row in rows:
        text, spans = render_prompt_response(tokenizer, row["prompt"], row["completion"], use_chat_template=False)
        ours = tokenize_with_spans(tokenizer, text, spans, chat_formatted=False)
        trl_ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        trl_prompt = tokenizer(row["prompt"])["input_ids"]
        n_ours_labels = sum(t != -100 for t in ours["labels"])
        if not (len(ours["input_ids"]) == len(trl_ids) == expected and ours["input_ids"] == trl_ids
                and len(trl_prompt) == spec["prompt_len"] and n_ours_labels == expected - spec["prompt_len"]):
            raise RuntimeError(f"token counts differ: ours {len(ours['input_ids'])} ({n_ours_labels} labelled), "
                               f"TRL {len(trl_ids)} (prompt {len(trl_prompt)}), expected {expected}")
    return {"n_params": n_params, "n_words": len(words), "n_samples": n_samples, "tokens_per_sample": expected,
            "label_tokens_per_sample": expected - spec["prompt_len"], "model_config": config.to_diff_dict()}


def child_main(role: str, spec_path: str) -> None:
    """Entry point of a child process: run ``role`` with the spec in ``spec_path`` and write its result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    runner = {"prepare": run_prepare, "trl": run_trl, "ours-deepspeed": run_ours, "ours-auto": run_ours}[role]
    result = runner(spec)
    result["peak_rss_mib"] = peak_rss_mib()
    import rlhf_lightning

    result["rlhf_lightning_file"] = rlhf_lightning.__file__
    if not Path(rlhf_lightning.__file__).resolve().is_relative_to(Path(spec["project_root"]).resolve()):
        raise RuntimeError(f"imported {rlhf_lightning.__file__}, not the project under test {spec['project_root']}")
    if spec.get("device") == "cuda":
        import torch

        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ parent helpers
def git(*args: str) -> str:
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


def launch(role: str, spec: dict[str, Any], workdir: Path, tag: str) -> dict[str, Any]:
    """Run one child process (``role``) and return its result; raise with the log tail on failure."""
    spec = {**spec, "side": role, "result": str(workdir / f"{tag}.result.json"),
            "root_dir": str(workdir / f"{tag}.root")}
    spec_path = workdir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / f"{tag}.log"
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "HF_DATASETS_CACHE": str(workdir / "hf_datasets_cache"), "PYTHONPATH": spec["project_root"]}
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", role,
                               "--child-spec", str(spec_path)], cwd=spec["project_root"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, check=False)
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


def summarize_run(result: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Throughput of one child over the steps after ``warmup``."""
    begin, end = result["step_begin"], result["step_end"]
    intervals = [end[0] - begin[0]] + [b - a for a, b in zip(end, end[1:], strict=False)]
    inside = [b - a for a, b in zip(begin, end, strict=True)]
    keep = slice(warmup, None)
    wall, tokens, samples = sum(intervals[keep]), sum(result["tokens"][keep]), sum(result["samples"][keep])
    own, busy = result["own_cpu"], result["busy_cpu"]  # index i: begin of step 0 (i = 0) or end of step i - 1
    own_cores = (own[-1] - own[warmup]) / wall
    other_cores = max(0.0, (busy[-1] - busy[warmup]) / wall - own_cores)
    return {
        "measured_steps": len(intervals[keep]),
        "tokens_per_s": tokens / wall,
        "samples_per_s": samples / wall,
        "step_s_median": statistics.median(intervals[keep]),
        "step_s_mean": wall / len(intervals[keep]),
        "in_hooks_s_median": statistics.median(inside[keep]),
        "own_cpu_cores": own_cores,  # CPU cores this process kept busy, on average, while measured
        "other_cpu_cores": other_cores,  # cores busy with other processes meanwhile (noise from the machine)
        "tokens_per_step": sorted(set(result["tokens"])),
        "label_tokens_per_step": sorted(set(result["label_tokens"])),
        "batch_width": sorted(set(result["widths"])),
        "peak_rss_mib": result["peak_rss_mib"],
        "peak_cuda_mib": result.get("peak_cuda_mib"),
        "process_wall_s": result["process_wall_s"],
        "step_intervals_s": intervals,
    }


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


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "lightning", "transformers", "trl", "deepspeed", "datasets", "accelerate"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "-"
    return out


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def markdown(report: dict[str, Any]) -> str:
    """The results table (and the settings it was measured under) as markdown."""
    cfg, summary = report["config"], report["summary"]
    lines = [
        f"### SFT, model `{cfg['model']}` ({report['prepare']['n_params'] / 1e6:.2f}M params), {cfg['device']}, "
        f"{cfg['dtype']}",
        "",
        f"batch {cfg['batch_size']} x {report['prepare']['tokens_per_sample']} tokens "
        f"({report['prepare']['label_tokens_per_sample']} with loss), {cfg['steps']} optimizer steps of which the "
        f"first {cfg['warmup']} are warm-up, {cfg['repeats']} repeats per side (fresh process each), "
        f"{cfg['threads']} torch threads. {report['date']}; {report['machine']}. Project: "
        f"{report['project']['source']} at {str(report['project']['commit'])[:10]}"
        f"{' (uncommitted changes)' if report['project']['dirty'] else ''}.",
        "",
        "| side | tokens/s min | tokens/s median | tokens/s max | samples/s median | s/step median "
        "| peak RSS MiB median | ours/TRL tokens/s (median) | ours/TRL per repeat (min-max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in cfg["sides"]:
        s = summary[side]
        tps = s["tokens_per_s"]
        ratio = s.get("ratio_vs_trl")
        ratio_txt = f"{ratio['of_medians']:.2f}x" if ratio else "1.00x"
        paired = f"{ratio['paired']['min']:.2f}-{ratio['paired']['max']:.2f}x" if ratio else "-"
        lines.append(f"| {SIDE_LABEL[side]} | {tps['min']:,.0f} | {tps['median']:,.0f} | {tps['max']:,.0f} | "
                     f"{s['samples_per_s']['median']:.2f} | {s['step_s']['median']:.3f} | "
                     f"{s['peak_rss_mib']['median']:,.0f} | {ratio_txt} | {paired} |")
    kept = sum(r["contended"] for side in report["runs"].values() for r in side)
    worst = max(r["other_cpu_cores"] for side in report["runs"].values() for r in side)
    lines += ["", f"Other processes' CPU use during the kept runs: at most {worst:.2f} cores on average over a run; "
              f"{len(report['discarded_contended_runs'])} contended run(s) discarded and re-run, {kept} contended "
              f"run(s) kept after {cfg['retries']} retries."]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="tiny",
                        help="tiny: bundled tiny-llama (hidden 64, 2 layers); small: ~100M Llama, same vocab")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 mixed precision (both sides; for cuda)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps left out of the measurement")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, each in a fresh process")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sample")
    parser.add_argument("--completion-len", type=int, default=95,
                        help="completion tokens per sample, before the EOS token both sides append")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every child")
    parser.add_argument("--trl-optim", default="adamw_torch",
                        help="TRL `optim`; adamw_torch is torch.optim.AdamW, as on our side (TRL's default is "
                             "adamw_torch_fused)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--base-config", default="configs/tiny/sft.yaml",
                        help="our side's config; the benchmark overrides everything that matters")
    parser.add_argument("--project-ref", default=None,
                        help="benchmark this git commit/ref of the project (exported with git archive) instead of "
                             "the working tree as it is")
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown results")
    parser.add_argument("--workdir", default=None, help="keep model, data and child logs here (default: a temp dir)")
    parser.add_argument("--no-warmup-run", action="store_true", help="skip the throwaway first process")
    parser.add_argument("--max-other-cores", type=float, default=0.2,
                        help="a run during which other processes kept more CPU cores busy than this (on average) is "
                             "discarded and run again (cpu only)")
    parser.add_argument("--retries", type=int, default=5, help="re-runs of a contended run before keeping it")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="seconds to wait for an idle machine before each child process (cpu only)")
    parser.add_argument("--child", choices=["prepare", *SIDES], help=argparse.SUPPRESS)
    parser.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None and not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be >= 0 and below --steps")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.child_spec)
        return None
    if args.device == "cpu" and args.dtype != "fp32":
        print("note: bf16 on CPU runs, but the comparison this benchmark is meant for on CPU is fp32", flush=True)

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_sft_")
    workdir = Path(args.workdir or tmp.name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    project_root, project = project_under_test(args.project_ref, workdir)
    print(f"[bench_sft] project under test: {project_root} ({project})", flush=True)
    spec = {"project_root": str(project_root), "model": args.model, "device": args.device, "dtype": args.dtype,
            "steps": args.steps,
            "batch_size": args.batch_size, "prompt_len": args.prompt_len, "completion_len": args.completion_len,
            "max_len": args.prompt_len + args.completion_len + 1, "lr": args.lr, "threads": args.threads,
            "trl_optim": args.trl_optim, "base_config": args.base_config,
            "model_dir": str(workdir / "model"), "data": str(workdir / "data.jsonl")}
    try:
        print(f"[bench_sft] preparing model '{args.model}' and data in {workdir}", flush=True)
        prepared = launch("prepare", spec, workdir, "prepare")
        print(f"[bench_sft] {prepared['n_params'] / 1e6:.2f}M params, {prepared['n_samples']} samples x "
              f"{prepared['tokens_per_sample']} tokens", flush=True)
        if not args.no_warmup_run:
            print(f"[bench_sft] throwaway warm-up process ({args.sides[0]})", flush=True)
            launch(args.sides[0], {**spec, "steps": min(args.steps, args.warmup + 2)}, workdir, "warmup")
        raw: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
        discarded: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            for side in args.sides:
                for attempt in range(args.retries + 1):
                    waited = wait_for_quiet(args.max_wait) if args.device == "cpu" else 0.0
                    result = launch(side, spec, workdir, f"{side}.{rep}.{attempt}")
                    r = {**summarize_run(result, args.warmup), "waited_for_quiet_s": waited, "attempt": attempt}
                    contended = args.device == "cpu" and r["other_cpu_cores"] > args.max_other_cores
                    print(f"[bench_sft] repeat {rep} {side:15s} {r['tokens_per_s']:10,.0f} tokens/s "
                          f"{r['samples_per_s']:7.2f} samples/s  {r['step_s_median']:.4f} s/step  "
                          f"peak RSS {r['peak_rss_mib']:,.0f} MiB  cores own/other {r['own_cpu_cores']:.2f}/"
                          f"{r['other_cpu_cores']:.2f}  (process {r['process_wall_s']:.0f} s)"
                          + ("  CONTENDED: other processes were busy" if contended else ""), flush=True)
                    if not contended or attempt == args.retries:
                        break
                    discarded.append({"side": side, "repeat": rep, **r})
                raw[side].append(result)
                runs[side].append({**r, "contended": contended})
        check_same_work(runs, raw, args.steps)
    finally:
        if tmp is not None:
            tmp.cleanup()

    summary: dict[str, Any] = {}
    for side in args.sides:
        summary[side] = {key: mmm([r[key] for r in runs[side]])
                         for key in ("tokens_per_s", "samples_per_s", "peak_rss_mib", "process_wall_s",
                                     "own_cpu_cores", "other_cpu_cores")}
        summary[side]["step_s"] = mmm([r["step_s_median"] for r in runs[side]])
        summary[side]["in_hooks_s"] = mmm([r["in_hooks_s_median"] for r in runs[side]])
        info = raw[side][0]
        summary[side]["setup"] = {k: info.get(k) for k in ("strategy", "optimizer", "precision", "param_dtype",
                                                           "gradient_checkpointing", "attn_implementation",
                                                           "torch_threads", "model_class")}
    if "trl" in summary:
        trl = runs["trl"]
        for side in args.sides:
            if side == "trl":
                continue
            ours = runs[side]
            summary[side]["ratio_vs_trl"] = {
                "of_medians": summary[side]["tokens_per_s"]["median"] / summary["trl"]["tokens_per_s"]["median"],
                "paired": mmm([o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(ours, trl, strict=True)]),
            }
    report = {
        "benchmark": "sft",
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "versions": versions(),
        "command": "python benchmarks/bench_sft.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {**{k: v for k, v in vars(args).items() if not k.startswith("child")},
                   "max_len": spec["max_len"]},
        "project": project,
        "prepare": prepared,
        "summary": summary,
        "runs": runs,
        "discarded_contended_runs": discarded,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"sft_{args.model}_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"[bench_sft] wrote {stem}.json and {stem}.md", flush=True)
    return report


if __name__ == "__main__":
    main()
