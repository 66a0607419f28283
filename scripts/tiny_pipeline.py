"""Run the tiny configs one after another as ordinary CLI calls and print what each stage achieved.

    python scripts/tiny_pipeline.py                    # sft, then rm, dpo, kto, simpo, orpo
    python scripts/tiny_pipeline.py --stages sft dpo   # a subset (later stages need runs/tiny-sft/hf)

Each stage is exactly ``python -m rlhf_lightning fit --config configs/tiny/<stage>.yaml`` (copy any of them).
Afterwards every model is asked 200 held-out addition questions (greedy decoding, exact match), and a table
with accuracy, the stage's final validation metrics and its wall time is printed and written to
``runs/tiny-pipeline.md``.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_lightning.models import greedy_answers

REPO = Path(__file__).resolve().parents[1]
STAGES = ["sft", "rm", "dpo", "kto", "simpo", "orpo"]
SHOWN_METRICS = {"sft": ["val/loss"], "rm": ["val/accuracy", "val/margin"]}
PREFERENCE_METRICS = ["val/accuracy", "val/margin"]


def held_out_questions(n: int = 200, seed: int = 1234) -> list[tuple[str, int]]:
    """Addition questions that do not appear in examples/data/sft_tiny.jsonl."""
    seen = set((REPO / "examples/data/sft_tiny.jsonl").read_text().split("\n"))
    seen = {re.search(r'"input": "([^"]+)"', line).group(1) for line in seen if line}
    rng, out = random.Random(seed), []
    while len(out) < n:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        question = f"What is {a} + {b}?"
        if question not in seen:
            out.append((question, a + b))
    return out


def accuracy(model_dir: Path, questions: list[tuple[str, int]]) -> float:
    """Exact-match accuracy of greedy answers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answers = greedy_answers(model, AutoTokenizer.from_pretrained(model_dir), [q for q, _ in questions], 6)
    return sum(a.strip() == str(truth) for a, (_, truth) in zip(answers, questions, strict=True)) / len(questions)


def last_metrics(stage: str) -> dict[str, float]:
    rows = list(csv.DictReader(open(REPO / f"runs/tiny-{stage}/csv/version_0/metrics.csv")))
    keys = SHOWN_METRICS.get(stage, PREFERENCE_METRICS if stage != "kto" else ["val/kl"])
    return {k: float(next(r[k] for r in reversed(rows) if r.get(k))) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    args = parser.parse_args()
    questions = held_out_questions()
    lines = ["| stage | held-out accuracy | final validation metrics | wall time |", "|---|---:|---|---:|"]
    for stage in args.stages:
        run_dir = REPO / f"runs/tiny-{stage}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "rlhf_lightning", "fit", "--config", f"configs/tiny/{stage}.yaml"]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
        seconds = time.perf_counter() - start
        acc = "-" if stage == "rm" else f"{accuracy(run_dir / 'hf', questions):.1%}"
        shown = ", ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in last_metrics(stage).items())
        lines.append(f"| {stage} | {acc} | {shown} | {seconds:.0f} s |")
    table = "\n".join(lines)
    print("\n" + table)
    (REPO / "runs").mkdir(exist_ok=True)
    (REPO / "runs/tiny-pipeline.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
