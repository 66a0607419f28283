"""Regenerate the small deterministic data files under ``examples/data`` used by the tiny configs and tests.

    python scripts/make_tiny_data.py

Task: add two numbers (``What is 12 + 45?`` -> ``57``). Answers are exact, so accuracy is checkable, and
preference data follows from the rule: the correct sum is chosen over a wrong one (off by a few units or tens).
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "examples" / "data"


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", str(a + b)


def wrong_answer(rng: random.Random, answer: str) -> str:
    value = int(answer)
    return str(max(0, value + rng.choice([-10, -2, -1, 1, 2, 10])))


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "sft_tiny.jsonl", "w") as f:
        for _ in range(1000):
            prompt, answer = addition(rng)
            f.write(json.dumps({"input": prompt, "output": answer}) + "\n")
    with open(OUT / "chat_tiny.jsonl", "w") as f:
        for _ in range(200):
            messages = []
            for _ in range(rng.randint(1, 3)):
                prompt, answer = addition(rng)
                messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(OUT / "preference_tiny.jsonl", "w") as f:
        for _ in range(600):
            prompt, answer = addition(rng)
            wrong = wrong_answer(rng, answer)
            margin = 1.0 if abs(int(wrong) - int(answer)) >= 10 else 0.5
            f.write(json.dumps({"prompt": prompt, "chosen": answer, "rejected": wrong, "margin": margin}) + "\n")
    with open(OUT / "kto_tiny.jsonl", "w") as f:
        for _ in range(600):
            prompt, answer = addition(rng)
            good = rng.random() < 0.5
            f.write(json.dumps({"prompt": prompt, "completion": answer if good else wrong_answer(rng, answer),
                                "label": good}) + "\n")


if __name__ == "__main__":
    main()
