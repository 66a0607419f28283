"""The demo: SFT -> reward model -> PPO, and DPO, GRPO, rejection sampling and reward-conditioned SFT from the same
SFT model, on the bundled task.

    python scripts/pipeline.py              # the whole demo, ~10 minutes on 2 CPU cores
    python scripts/pipeline.py --quick      # shorter RM/PPO/GRPO stages (the test suite's variant)
    python scripts/pipeline.py --seeds 1 2 3 [--quick]   # the demo once per seed: mean and spread of each figure
    python scripts/pipeline.py --stages rejection_sampling   # one stage, from the runs/tiny-sft/hf of an earlier run

The task (``rlhf_lightning/tasks/reverse.py``) is reversing 3-8 letters, learned by a tiny randomly initialised
Llama from demonstrations that often swap the last two letters. Each stage is ordinary CLI calls:

    python -m rlhf_lightning fit --config configs/tiny/<stage>.yaml
    python -m rlhf_lightning rejection-sampling --config configs/tiny/rejection_sampling.yaml
    python -m rlhf_lightning predict --config configs/tiny/generate.yaml ...   # conditional SFT's data: samples,
    python -m rlhf_lightning predict --config configs/tiny/score.yaml ...      # scored by the exact-match rule

(printed before they run, so any step can be copied). After the stages every exported model answers 200 held-out
prompts greedily through the ``evaluate`` command's code (``rlhf_lightning.evaluation``); the script prints a
table with exact-match accuracy (the rule reward), letter accuracy, the trained reward model's mean score, its win
rate against SFT with a 95% interval, and the stage's wall time; reward-conditioned SFT is also measured at its
lowest reward condition (``conditional_sft_worst``, the control). It writes the table with a plot of reward and
KL over the PPO and GRPO steps to ``runs/demo/`` (``results.md``, ``results.json``, ``reward_kl.png``; the full
evaluation report in ``eval/``). Each stage's own output (logs, checkpoints, export) is ``runs/tiny-<stage>/``;
the demo replaces it.
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
PROMPTS = REPO / "examples/data/reverse/prompts.jsonl"
TASK = "rlhf_lightning.tasks.reverse"
WORST = "conditional_sft_worst"  # conditional SFT asked for the lowest reward level (the demo's control)
STAGES = ["sft", "rm", "ppo", "dpo", "grpo", "rejection_sampling", "conditional_sft"]
EXTRA_STAGES = ["kto", "simpo", "orpo"]  # not in the default run: --stages kto simpo orpo (after sft)
# --quick: the same recipe with fewer updates, still enough for each stage to beat SFT (tests/test_pipeline.py).
QUICK_OVERRIDES = {
    "rm": ["--trainer.max_epochs", "6"],
    "ppo": ["--trainer.max_steps", "80"],
    "grpo": ["--trainer.max_steps", "60"],
}


def config_path(stage: str, workdir: Path) -> str:
    """A stage's tiny config, relative inside the repository (as users type it), absolute outside."""
    config = REPO / "configs/tiny" / f"{stage}.yaml"
    return str(config.relative_to(REPO)) if workdir == REPO else str(config)


def data_path(relative: str, workdir: Path) -> str:
    return relative if workdir == REPO else str(REPO / relative)


def stage_commands(stage: str, workdir: Path, quick: bool, seed: int | None = None) -> list[list[str]]:
    """The CLI calls of one stage; outside the repository the configs' data paths are made absolute. ``seed``
    replaces the configs' seeds (initialisation, data order, dropout and sampling all follow it)."""
    cli = [sys.executable, "-m", "rlhf_lightning"]
    seeding = ["--seed_everything", str(seed)] if seed is not None else []
    quick_args = QUICK_OVERRIDES.get(stage, []) if quick else []
    if stage == "rejection_sampling":  # one command that prints and runs its generate/score/select/fit calls
        cmd = [*cli, "rejection-sampling", "--config", config_path(stage, workdir)]
        if workdir != REPO:
            cmd += ["--prompts", str(PROMPTS)] + [arg for step in ("generate", "score", "sft") for arg in (
                f"--{step}_config", config_path(step, workdir))]
        return [cmd + (["--seed", str(seed)] if seed is not None else []) + quick_args]
    if stage == "conditional_sft":  # its data: the SFT model's own samples, scored by the rule
        samples = "runs/tiny-conditional_sft/samples.jsonl"
        return [
            [*cli, "predict", "--config", config_path("generate", workdir), "--data.init_args.path",
             data_path("examples/data/reverse/prompts.jsonl", workdir), "--trainer.callbacks.init_args.output",
             samples, *seeding],
            [*cli, "predict", "--config", config_path("score", workdir), "--model.init_args.reward_models", "[]",
             "--data.init_args.path", samples, "--trainer.callbacks.init_args.output",
             samples.replace(".jsonl", ".scored.jsonl")],
            [*cli, "fit", "--config", config_path(stage, workdir), *seeding, *quick_args]]
    cmd = [*cli, "fit", "--config", config_path(stage, workdir)]
    if workdir != REPO:
        config = REPO / "configs/tiny" / f"{stage}.yaml"
        cmd += ["--data.init_args.path", data_path(yaml.safe_load(config.read_text())["data"]["init_args"]["path"],
                                                   workdir)]
    return [cmd + seeding + quick_args]


def shown(cmd: list[str]) -> str:
    """A command line as users would type it."""
    return " ".join(["python", *cmd[1:]])


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
    lines = ["| stage | held-out exact match | letter accuracy | reward-model score | RM win rate vs SFT (95% CI) "
             "| wall time |", "|---|---:|---:|---:|---:|---:|"]
    for stage, r in results.items():
        seconds = f"{r['seconds']:.0f} s" if "seconds" in r else "(same model)" if stage == WORST else "(earlier run)"
        if stage == "rm":
            lines.append(f"| rm | (validation pair accuracy {r['pair_accuracy']:.1%}) | | | | {seconds} |")
            continue
        score = f"{r['reward_model_score']:+.2f}" if "reward_model_score" in r else "-"
        win = r.get("win_rate_vs_sft")
        win = f"{win['win_rate']:.1%} ({win['ci_low']:.1%}–{win['ci_high']:.1%})" if win else "-"
        lines.append(f"| {stage} | {r['accuracy']:.1%} | {r['letter_accuracy']:.1%} | {score} | {win} | {seconds} |")
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


def evaluate_stages(results: dict[str, dict], runs: Path, rm_dir: Path | None) -> None:
    """Answer the held-out prompts greedily with every policy stage in ``results`` (and the SFT model they started
    from, the baseline), through the ``evaluate`` command's code (``rlhf_lightning.evaluation``): exact match, letter
    accuracy, the reward model's mean normalised score and its win rate against SFT with a 95% interval. Adds them
    to ``results``; the full report goes to ``runs/demo/eval/``."""
    from rlhf_lightning.evaluation import EvalConfig, ModelSpec, PromptSet, Sampling, run_evaluation

    policies = {stage: runs / f"tiny-{stage}/hf" for stage in results if stage != "rm"}
    if "sft" not in policies and (runs / "tiny-sft/hf").exists():
        policies = {"sft": runs / "tiny-sft/hf", **policies}  # the baseline every alignment stage is compared with
    if "conditional_sft" in policies:  # the same model, its chat template defaulting to the lowest condition
        from rlhf_lightning.algorithms.conditional_sft import read_settings, retarget_export

        worst = read_settings(policies["conditional_sft"]).worst_level
        policies[WORST] = retarget_export(policies["conditional_sft"], runs / "tiny-conditional_sft/hf-worst", worst)
    if not policies:
        return
    report = run_evaluation(EvalConfig(
        models=[ModelSpec(stage, str(path)) for stage, path in policies.items()], baseline=next(iter(policies)),
        prompts=PromptSet(str(HELDOUT), label_key="answer"), generation=Sampling(max_new_tokens=20),
        reward_model=str(rm_dir) if rm_dir else None,
        reward_functions=[f"{TASK}:exact_match", f"{TASK}:letter_accuracy"],
        ci_method="normal",  # many ties between close policies: Wilson (a tie as a coin flip) overstates the spread
        batch_size=200, output_dir=str(runs / "demo/eval")))  # one batch: greedy answers do not depend on padding
    for stage in policies:
        means = report["mean_reward"][stage]
        row = results.setdefault(stage, {})
        row |= {"accuracy": means["exact_match"], "letter_accuracy": means["letter_accuracy"]}
        if rm_dir:
            row["reward_model_score"] = means[report["reward_sources"][0]]
        if stage in report.get("win_rate", {}):
            row["win_rate_vs_sft"] = report["win_rate"][stage]


def run_demo(stages: list[str], quick: bool, workdir: Path, seed: int | None) -> dict[str, dict]:
    """Run ``stages`` in ``workdir`` and evaluate each exported model; returns the results per stage."""
    runs, results, curves = workdir / "runs", {}, {}
    rm_dir = runs / "tiny-rm/hf"
    for stage in stages:
        run_dir = runs / f"tiny-{stage}"
        if run_dir.exists():
            print(f"[demo] replacing the previous demo output {run_dir}", flush=True)
            shutil.rmtree(run_dir)
        start = time.perf_counter()
        for cmd in stage_commands(stage, workdir, quick, seed):
            print(f"\n[demo] {stage}: {shown(cmd)}", flush=True)
            if subprocess.run(cmd, cwd=workdir).returncode != 0:
                sys.exit(f"[demo] stage '{stage}' failed (its output is above); rerun it alone from {workdir} with:\n"
                         f"  {shown(cmd)}")
        results[stage] = {"seconds": time.perf_counter() - start}
        if stage == "rm":
            results[stage]["pair_accuracy"] = final_rm_accuracy(run_dir)
        if stage in ("ppo", "grpo"):
            curves[stage] = train_metrics(run_dir)
    print("\n[demo] greedy answers to the held-out prompts", flush=True)
    evaluate_stages(results, runs, rm_dir if rm_dir.exists() else None)
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
