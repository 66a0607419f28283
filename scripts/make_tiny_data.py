"""Regenerate the small deterministic data files under ``examples/data`` used by the tiny configs and tests.

    python scripts/make_tiny_data.py

Task: add two numbers (``What is 12 + 345?`` -> ``357``). Answers are exact, so accuracy is checkable.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "examples" / "data"


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", str(a + b)


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


if __name__ == "__main__":
    main()
