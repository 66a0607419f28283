r"""Synchronous against asynchronous (one-step-off) rollouts on the demo task's GRPO stage: speed and learning.

    python benchmarks/bench_async.py --seeds 42 43 --sides sync-local async-local sync-ray async-ray
    python benchmarks/bench_async.py --seeds 42 --sides sync-local async-local --strategy auto   # a GPU (no Ray)

Every side runs the demo's own command, ``python -m rlhf_lightning fit --config configs/tiny/grpo.yaml`` (GRPO, 32
prompts × 8 samples per step, 120 steps, the exact-match reversal reward), from the demo's SFT model (made first
with ``configs/tiny/sft.yaml`` if ``--sft-model`` is not given), in a fresh process, changing only:

- ``sync-*`` / ``async-*``: ``rollout.asynchronous`` false / true;
- ``*-local`` / ``*-ray``: ``rollout.backend`` local (asynchronous: the generation worker on a thread of its own,
  holding its own copy of the policy; synchronous: the trained module generates itself, ``share_policy`` auto) or
  ray (the generation and reference workers as Ray actors, half a core each as the config asks).

Speed: a callback records when each training step ends; samples/s is the samples trained per second between the
end of step ``--warmup`` and the last step (start-up, model loading and the first steps excluded). The asynchronous
run's first step only starts sampling, so both sides train the same number of samples per measured step. The time
split is the mean of what the module logs per step (``time/generate_s``: weight push and sampling, for an
asynchronous run the wait for the sampling started one step earlier; ``time/score_s``; ``time/train_s``).

Learning: the exported policy answers the demo's 200 held-out prompts greedily (``rlhf_lightning.evaluation``, as
``scripts/pipeline.py`` evaluates): exact-match accuracy against the SFT model's, plus the mean training reward of
the last 10 steps. Results: ``<out>/async_grpo_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
SIDES = {
    "sync-local": ["--model.init_args.rollout.asynchronous", "false"],
    "async-local": ["--model.init_args.rollout.asynchronous", "true"],
    "sync-ray": ["--model.init_args.rollout.asynchronous", "false", "--model.init_args.rollout.backend", "ray"],
    "async-ray": ["--model.init_args.rollout.asynchronous", "true", "--model.init_args.rollout.backend", "ray"],
}
STEP_TIMER = "fit_timer.StepEndTimes"


def run(cmd: list[str], log: Path) -> float:
    """Run a CLI call (output to ``log``); its wall seconds."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"[bench_async] failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def metrics(run_dir: Path) -> dict[str, list[float]]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = {k for row in rows for k in row}
    return {k: [float(r[k]) for r in rows if r.get(k) not in (None, "")] for k in keys}


def side_run(side: str, seed: int, sft_model: Path, work: Path, strategy: str | None, steps: int | None) -> dict:
    run_dir = work / f"{side}-seed{seed}"
    cmd = [sys.executable, "-m", "rlhf_lightning", "fit", "--config", "configs/tiny/grpo.yaml", "--seed_everything",
           str(seed), "--model.init_args.model", str(sft_model), "--trainer.default_root_dir", str(run_dir),
           "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir",
           str(run_dir), "--trainer.logger.init_args.name", "csv", "--trainer.logger.init_args.version", "0",
           "--trainer.callbacks", json.dumps([
               {"class_path": "rlhf_lightning.callbacks.HFExport", "init_args": {"dirpath": str(run_dir / "hf")}},
               {"class_path": STEP_TIMER, "init_args": {"path": str(run_dir / "step_ends.json")}}]),
           "--trainer.enable_progress_bar", "false", *SIDES[side]]
    cmd += ["--trainer.strategy", strategy] if strategy else []
    cmd += ["--trainer.max_steps", str(steps)] if steps else []
    wall = run(cmd, work / f"{side}-seed{seed}.log")
    return {"side": side, "seed": seed, "process_s": wall, "run_dir": str(run_dir),
            "step_ends": json.loads((run_dir / "step_ends.json").read_text()), "metrics": metrics(run_dir)}


def throughput(result: dict, warmup: int, rollout_size: int) -> dict[str, float]:
    """Samples trained per second between the end of step ``warmup`` and the last step, and the time split."""
    ends, m = result["step_ends"], result["metrics"]
    trained_steps = len(ends) - 1 - warmup
    seconds = ends[-1] - ends[warmup]
    return {"samples_per_s": trained_steps * rollout_size / seconds, "s_per_step": seconds / trained_steps,
            **{f"{k}_s": statistics.mean(m[f"time/{k}_s"][warmup:]) for k in ("generate", "score", "train")},
            "last10_reward": statistics.mean(m["train/reward"][-10:]),
            "max_policy_lag": max(m.get("train/policy_lag", [0.0]))}


def held_out_accuracy(models: dict[str, str], out: Path) -> dict[str, float]:
    from pipeline import HELDOUT, TASK

    from rlhf_lightning.evaluation import EvalConfig, ModelSpec, PromptSet, Sampling, run_evaluation

    report = run_evaluation(EvalConfig(
        models=[ModelSpec(name, path) for name, path in models.items()], baseline=next(iter(models)),
        prompts=PromptSet(str(HELDOUT), label_key="answer"), generation=Sampling(max_new_tokens=20),
        reward_functions=[f"{TASK}:exact_match"], batch_size=200, output_dir=str(out)))
    return {name: report["mean_reward"][name]["exact_match"] for name in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--sft-model", type=Path, help="the demo's SFT export (default: trained first)")
    parser.add_argument("--strategy", help="override the config's strategy (e.g. auto where DeepSpeed is absent)")
    parser.add_argument("--steps", type=int, help="override max_steps (default: the config's 120)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_async"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sft_model = args.sft_model
    if sft_model is None:
        sft_dir = args.workdir / "sft"
        cmd = [sys.executable, "-m", "rlhf_lightning", "fit", "--config", "configs/tiny/sft.yaml",
               "--trainer.default_root_dir", str(sft_dir), "--trainer.enable_progress_bar", "false",
               "--trainer.callbacks", json.dumps([{"class_path": "rlhf_lightning.callbacks.HFExport",
                                                   "init_args": {"dirpath": str(sft_dir / "hf")}}])]
        cmd += ["--trainer.strategy", args.strategy] if args.strategy else []
        print(f"[bench_async] SFT model: {' '.join(cmd)}", flush=True)
        run(cmd, args.workdir / "sft.log")
        sft_model = sft_dir / "hf"
    import yaml

    config = yaml.safe_load((REPO / "configs/tiny/grpo.yaml").read_text())["model"]["init_args"]
    rollout_size = 32 * config["n_samples_per_prompt"]
    results = []
    for seed in args.seeds:
        for side in args.sides:  # sides interleaved per seed
            result = side_run(side, seed, sft_model, args.workdir, args.strategy, args.steps)
            result["speed"] = throughput(result, args.warmup, rollout_size)
            print(f"[bench_async] {side} seed {seed}: {result['speed']}", flush=True)
            results.append(result)
    models = {"sft": str(sft_model), **{f"{r['side']}-seed{r['seed']}": f"{r['run_dir']}/hf" for r in results}}
    accuracy = held_out_accuracy(models, args.workdir / "eval")
    for r in results:
        r["accuracy"] = accuracy[f"{r['side']}-seed{r['seed']}"]
    write_report(args, results, accuracy["sft"])


def write_report(args: argparse.Namespace, results: list[dict], sft_accuracy: float) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else (
        next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
        + f", {os.cpu_count()} cores")
    lines = [f"### Demo GRPO, synchronous vs asynchronous rollouts ({device}: {name})", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {args.seeds}; warm-up {args.warmup} "
             f"steps; SFT model's held-out exact match: {sft_accuracy:.1%}.", "",
             "| side | samples/s (mean, min-max) | s/step | generate / score / train s | held-out exact match "
             "(per seed) | last-10 reward | max lag |", "|---|---:|---:|---|---|---:|---:|"]
    for side in args.sides:
        rows = [r for r in results if r["side"] == side]
        speed = [r["speed"]["samples_per_s"] for r in rows]
        accuracy = ", ".join(f"{r['accuracy']:.1%}" for r in rows)
        split = " / ".join(f"{statistics.mean(r['speed'][f'{k}_s'] for r in rows):.3f}"
                           for k in ("generate", "score", "train"))
        lines.append(f"| {side} | {statistics.mean(speed):.1f} ({min(speed):.1f}-{max(speed):.1f}) | "
                     f"{statistics.mean(r['speed']['s_per_step'] for r in rows):.3f} | {split} | "
                     f"{accuracy} | "
                     f"{statistics.mean(r['speed']['last10_reward'] for r in rows):.3f} | "
                     f"{max(r['speed']['max_policy_lag'] for r in rows):.0f} |")
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"async_grpo_{device}"
    stem.with_suffix(".md").write_text(table + "\n")
    slim = [{k: v for k, v in r.items() if k != "metrics"} for r in results]
    stem.with_suffix(".json").write_text(json.dumps({"sft_accuracy": sft_accuracy, "runs": slim}, indent=1))
    print("\n" + table)


if __name__ == "__main__":
    main()
