"""The demo: SFT -> reward model -> PPO, and DPO and GRPO from the same SFT model, on the bundled task.

    python scripts/pipeline.py              # the whole demo, ~6 minutes on 2 CPU cores
    python scripts/pipeline.py --quick      # shorter RL/DPO stages (the test suite's variant)
    python scripts/pipeline.py --seeds 1 2 3 [--quick]   # the demo once per seed: mean and spread of each figure

The task (``rlhf_lightning/tasks/reverse.py``) is reversing 3-8 letters, learned by a tiny randomly initialised
Llama from demonstrations that often swap the last two letters. Each stage is one ordinary CLI call:

    python -m rlhf_lightning fit --config configs/tiny/<stage>.yaml

(printed before it runs, so any step can be copied). After each stage the exported model answers 200 held-out
prompts greedily; the script prints a table with exact-match accuracy (the rule reward), letter accuracy, the
trained reward model's mean score and the stage's wall time, and writes it with a plot of reward and KL over the
PPO and GRPO steps to ``runs/demo/`` (``results.md``, ``results.json``, ``reward_kl.png``).
Each stage's own output (logs, checkpoints, export) is ``runs/tiny-<stage>/``; the demo replaces it.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "examples/data/reverse/heldout.jsonl"
STAGES = ["sft", "rm", "ppo", "dpo", "grpo"]
EXTRA_STAGES = ["kto", "simpo", "orpo"]  # not in the default run: --stages kto simpo orpo (after sft)
# --quick: the same recipe with fewer updates, still enough for each stage to beat SFT (tests/test_pipeline.py).
QUICK_OVERRIDES = {
    "rm": ["--trainer.max_epochs", "4"],
    "ppo": ["--trainer.max_steps", "80"],
    "dpo": ["--trainer.max_epochs", "1"],
    "grpo": ["--trainer.max_steps", "60"],
}


def stage_command(stage: str, workdir: Path, quick: bool, seed: int | None = None) -> list[str]:
    """The CLI call of one stage; outside the repository the config's data path is made absolute. ``seed``
    replaces the config's ``seed_everything`` (initialisation, data order, dropout and sampling all follow it)."""
    config = REPO / "configs/tiny" / f"{stage}.yaml"
    cmd = [sys.executable, "-m", "rlhf_lightning", "fit", "--config", str(config.relative_to(REPO))]
    if workdir != REPO:
        data_path = yaml.safe_load(config.read_text())["data"]["init_args"]["path"]
        cmd[-1] = str(config)
        cmd += ["--data.init_args.path", str(REPO / data_path)]
    if seed is not None:
        cmd += ["--seed_everything", str(seed)]
    return cmd + (QUICK_OVERRIDES.get(stage, []) if quick else [])


def logged_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a stage's CSV log (``CSVLogger`` of its tiny config)."""
    return list(csv.DictReader((run_dir / "csv/version_0/metrics.csv").read_text().splitlines()))


def train_metrics(run_dir: Path) -> dict[str, list[float]]:
    """Per-step ``train/reward`` and ``train/kl`` of an RL stage."""
    rows = logged_rows(run_dir)
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in ("train/reward", "train/kl")}


def final_rm_accuracy(run_dir: Path) -> float:
    return float(next(r["val/accuracy"] for r in reversed(logged_rows(run_dir)) if r.get("val/accuracy")))


def moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot(curves: dict[str, dict[str, list[float]]], out: Path) -> None:
    """Reward and KL per training step of the RL stages, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = {"ppo": "PPO (reward model score)", "grpo": "GRPO (exact-match reward)"}
    for (stage, series), color in zip(curves.items(), ["tab:blue", "tab:orange"], strict=False):
        for ax, key, label in [(axes[0], "train/reward", labels[stage]), (axes[1], "train/kl", stage.upper())]:
            values = series[key]
            ax.plot(values, color=color, alpha=0.25)
            ax.plot(moving_average(values, 10), color=color, label=f"{label}, 10-step mean")
    for ax, title in zip(axes, ["reward per rollout", "KL to the SFT reference (nats per sequence)"], strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| stage | held-out exact match | letter accuracy | reward-model score | wall time |",
             "|---|---:|---:|---:|---:|"]
    for stage, r in results.items():
        if stage == "rm":
            lines.append(f"| rm | (validation pair accuracy {r['pair_accuracy']:.1%}) | | | {r['seconds']:.0f} s |")
            continue
        score = f"{r['reward_model_score']:+.2f}" if "reward_model_score" in r else "-"
        lines.append(f"| {stage} | {r['accuracy']:.1%} | {r['letter_accuracy']:.1%} | {score} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def seed_summary(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation, min and max over seeds of each stage's held-out accuracy, plus the smallest
    gain over SFT of the same seed (what tests/test_pipeline.py asserts)."""
    summary = {}
    for stage in next(iter(per_seed.values())):
        if stage == "rm":
            continue
        accuracy = [results[stage]["accuracy"] for results in per_seed.values()]
        mean = sum(accuracy) / len(accuracy)
        std = (sum((a - mean) ** 2 for a in accuracy) / max(len(accuracy) - 1, 1)) ** 0.5
        row = {"mean": mean, "std": std, "min": min(accuracy), "max": max(accuracy)}
        if stage != "sft":
            row["min_gain_over_sft"] = min(r[stage]["accuracy"] - r["sft"]["accuracy"] for r in per_seed.values())
        summary[stage] = row
    return summary


def seed_table(per_seed: dict[int, dict[str, dict]]) -> str:
    summary = seed_summary(per_seed)
    seeds = list(per_seed)
    lines = ["| stage | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | smallest gain over SFT |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for stage, row in summary.items():
        cells = [f"{per_seed[s][stage]['accuracy']:.1%}" for s in seeds]
        gain = f"{row['min_gain_over_sft'] * 100:+.1f} pts" if "min_gain_over_sft" in row else ""
        lines.append(f"| {stage} | {' | '.join(cells)} | {row['mean']:.1%} ± {row['std']:.1%} | {gain} |")
    return "\n".join(lines)


def run_seeds(seeds: list[int], stages: list[str], quick: bool, workdir: Path) -> dict[int, dict[str, dict]]:
    """The demo once per seed, each in its own ``runs/seeds/seed-<n>`` directory; table of mean and spread."""
    per_seed = {}
    for seed in seeds:
        seed_dir = workdir / "runs" / "seeds" / f"seed-{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        per_seed[seed] = run_demo(stages, quick, seed_dir, seed)
    out = workdir / "runs" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    table = seed_table(per_seed)
    (out / "seeds.md").write_text(table + "\n")
    (out / "seeds.json").write_text(json.dumps({"quick": quick, "per_seed": per_seed,
                                               "summary": seed_summary(per_seed)}, indent=1))
    print(f"\n{table}\n\n[demo] written: {out}/seeds.md, seeds.json")
    return per_seed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES + EXTRA_STAGES,
                        help="a subset; later stages need runs/tiny-sft/hf (and PPO runs/tiny-rm/hf)")
    parser.add_argument("--quick", action="store_true", help="fewer RM/PPO/DPO/GRPO updates (see QUICK_OVERRIDES)")
    parser.add_argument("--workdir", type=Path, default=REPO, help="where runs/ is written (default: the repo)")
    parser.add_argument("--seed", type=int, default=None, help="seed of every stage (default: each config's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run the demo once per seed and report mean and spread (runs/demo/seeds.md)")
    args = parser.parse_args(argv)
    if args.seeds:
        return run_seeds(args.seeds, args.stages, args.quick, args.workdir.resolve())
    return run_demo(args.stages, args.quick, args.workdir.resolve(), args.seed)


def run_demo(stages: list[str], quick: bool, workdir: Path, seed: int | None) -> dict[str, dict]:
    """Run ``stages`` in ``workdir`` and evaluate each exported model; returns the results per stage."""
    from rlhf_lightning.tasks.reverse import evaluate  # after --help: importing torch takes seconds

    runs, results, curves = workdir / "runs", {}, {}
    rm_dir = runs / "tiny-rm/hf"
    for stage in stages:
        run_dir = runs / f"tiny-{stage}"
        if run_dir.exists():
            print(f"[demo] replacing the previous demo output {run_dir}", flush=True)
            shutil.rmtree(run_dir)
        cmd = stage_command(stage, workdir, quick, seed)
        print(f"\n[demo] {stage}: {' '.join(['python', *cmd[1:]])}", flush=True)
        start = time.perf_counter()
        if subprocess.run(cmd, cwd=workdir).returncode != 0:
            sys.exit(f"[demo] stage '{stage}' failed (its output is above); rerun it alone from {workdir} with:\n"
                     f"  {' '.join(['python', *cmd[1:]])}")
        results[stage] = {"seconds": time.perf_counter() - start}
        if stage == "rm":
            results[stage]["pair_accuracy"] = final_rm_accuracy(run_dir)
        if stage in ("ppo", "grpo"):
            curves[stage] = train_metrics(run_dir)
    print("\n[demo] greedy answers to the held-out prompts", flush=True)
    for stage in (s for s in results if s != "rm"):  # after all stages: the reward model scores every policy
        results[stage] |= evaluate(runs / f"tiny-{stage}/hf", HELDOUT, reward_model=rm_dir if rm_dir.exists() else None)
    out = runs / "demo"
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (out / "results.md").write_text(table + "\n")
    report = {"quick": quick, "seed": seed, "stages": results, "curves": curves}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    if curves:
        plot(curves, out / "reward_kl.png")
    print("\n" + table + f"\n\n[demo] written: {out}/results.md, results.json" + (", reward_kl.png" if curves else ""))
    return results


if __name__ == "__main__":
    main()
