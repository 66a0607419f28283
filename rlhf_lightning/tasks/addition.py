"""The real-model demo task: one-digit addition, answered with the result alone.

    python -m rlhf_lightning.tasks.addition --out examples/data/addition   # regenerates the bundled jsonl files

``What is 7 + 5? Write only the result, like this: 4`` -> ``12`` or ``7 + 5 = 12``. The answer is a pure function
of the prompt, so correctness is a rule (:func:`exact_answer`): the response, whitespace-normalised and without a
final period, must be the right sum ``c`` or the equation ``a + b = c`` (the model's own way of writing a result).
Anything else is wrong: a wrong sum, a sentence, and also a right equation followed by an explanation
("7 + 5 = 12\\n\\nThis is a mathematical operation..."), since the prompt asks for the result only.

Why this task for SmolLM2-135M-Instruct (probed on 32 random problems, chat template, 16 new tokens): greedy, 20/32
answers pass (22/32 have the right sum as their last number: the rest ramble on after the equation or answer in a
sentence); sampled at temperature 0.7, only 17/128 pass, and 12 of 32 groups of 4 samples mix passes and
failures, so GRPO's group advantages are non-zero and there is room above the start. Other probes: "Reply with
only the number" gives 0/48 exact (the model writes "7 + 5 = 12"), "Reply with only the equation, like this:
2 + 2 = 4" 2/32 (it discusses 2 + 2 = 4), two-digit sums 4-5/32 and capitalising a word or naming the next letter
0/24: learning format is realistic in minutes on a CPU, learning arithmetic is not.

The DPO pairs are fixed, written by :func:`write_data` from the rule (chosen: the right equation; rejected: the
model's typical mistakes, see :func:`wrong_answer`), so the demo needs no sampling stage before DPO. Everything is
generated from a seed; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

TEMPLATE = "What is {a} + {b}? Write only the result, like this: 4"
PROMPT_RE = re.compile(r"What is (\d+) \+ (\d+)\?")
# Continuations the model writes after a right equation (seen in its greedy and sampled answers).
RAMBLES = ["\n\nThis is a mathematical operation that adds two numbers together.",
           "\n\nThis is a simple example of addition.", " Let me know if you need anything else!",
           "\nWrite this result in only one line."]


def answer_of(prompt: str) -> str:
    """The correct equation of a prompt (the rule itself); raises ``ValueError`` for a prompt of another shape."""
    match = PROMPT_RE.search(prompt)
    if match is None:
        raise ValueError(f"Not an addition prompt (expected 'What is <a> + <b>?'): {prompt!r}")
    a, b = int(match[1]), int(match[2])
    return f"{a} + {b} = {a + b}"


def normalize(response: str) -> str:
    """Whitespace collapsed to single spaces, one final period dropped: ``' 7 +  5 = 12.'`` -> ``'7 + 5 = 12'``."""
    return " ".join(response.split()).removesuffix(".").rstrip()


def exact_answer(prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
    """Reward and held-out accuracy: 1.0 when the normalised response is the right equation ``a + b = c`` or the
    bare sum ``c``, else 0.0. ``labels`` (the equation) win over the prompt when given."""
    scores = []
    for prompt, response, label in zip(prompts, responses, labels, strict=True):
        equation = label if label is not None else answer_of(prompt)
        scores.append(float(normalize(response) in (equation, equation.rpartition(" = ")[2])))
    return scores


def last_number(prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
    """Lenient score (diagnostic): 1.0 when the last integer in the response is the right sum, whatever the
    words around it, so ``exact_answer`` minus ``last_number`` is what format alone costs."""
    scores = []
    for prompt, response, label in zip(prompts, responses, labels, strict=True):
        total = (label if label is not None else answer_of(prompt)).rpartition(" = ")[2]
        numbers = re.findall(r"-?\d+", response)
        scores.append(float(bool(numbers) and numbers[-1] == total))
    return scores


def wrong_answer(rng: random.Random, answer: str) -> str:
    """A wrong answer of the kinds the model gives: the right equation then more text, a sum off by 1-3 (or one
    operand instead of the sum), or a sentence instead of the equation."""
    left, _, total = answer.rpartition(" = ")
    kind = rng.choice(["ramble", "sum", "sentence"])
    if kind == "ramble":
        return answer + rng.choice(RAMBLES)
    if kind == "sum":
        wrong = int(total) + rng.choice([-3, -2, -1, 1, 2, 3])
        return f"{left} = {wrong if wrong != int(total) and wrong >= 0 else left.split()[0]}"
    return rng.choice([f"The answer is {total}.", f"The result of {left} is {total}.", f"{left} equals {total}."])


def problems(low: int = 1, high: int = 9) -> list[tuple[int, int]]:
    """Every ``(a, b)`` with both operands in ``[low, high]`` (81 for one digit)."""
    return [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]


def write_data(out: Path, seed: int = 0, n_heldout: int = 36, n_prompts: int = 400, n_pairs: int = 200,
               low: int = 1, high: int = 9) -> dict[str, Path]:
    """Write ``heldout.jsonl`` (``n_heldout`` distinct problems, each once), ``prompts.jsonl`` (``n_prompts`` draws
    from the other problems) and ``preference.jsonl`` (``n_pairs`` draws from the other problems: the right
    equation chosen over :func:`wrong_answer`). Rows are prompt/answer, the answer being the equation. The split is
    over problems (one digit gives only 81), so no held-out sum is ever trained on."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    pool = problems(low, high)
    rng.shuffle(pool)
    heldout, train = pool[:n_heldout], pool[n_heldout:]
    if not train:
        raise ValueError(f"n_heldout={n_heldout} leaves no problem of {len(pool)} to train on.")

    def row(a: int, b: int) -> dict[str, str]:
        return {"prompt": TEMPLATE.format(a=a, b=b), "answer": f"{a} + {b} = {a + b}"}

    rows = {"heldout": [row(a, b) for a, b in heldout],
            "prompts": [row(*rng.choice(train)) for _ in range(n_prompts)]}
    rows["preference"] = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": wrong_answer(rng, r["answer"])}
                          for r in (row(*rng.choice(train)) for _ in range(n_pairs))]
    files = {name: out / f"{name}.jsonl" for name in rows}
    for name, path in files.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("examples/data/addition"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_data(args.out, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
