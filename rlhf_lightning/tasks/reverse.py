"""The embedded demo task: reverse a short sequence of letters.

    python -m rlhf_lightning.tasks.reverse --out examples/data/reverse   # regenerates the bundled jsonl files

``reverse: k e q b`` -> ``b q e k``. Letters are space-separated, so with the bundled tokenizer every letter is one
token and the answer is a pure function of the prompt: correctness is exact-match, checkable by a rule, and the
same rule gives preference pairs (the right reversal over a wrong one) and a reward function for GRPO/PPO:

    reward_functions: [rlhf_lightning.tasks.reverse:exact_match]

Why alignment has something to fix: the SFT demonstrations are imperfect the way human ones are. In 60% of the
answers of 6+ letters the demonstrator slips and swaps the last two letters, so imitation learns to slip too
(greedy decoding picks the more frequent, wrong ending) while the right ending stays likely enough to be sampled.
The preference pairs (right answer over the slip or another near miss), the reward model trained on them and the
rule reward all prefer the right ending, so DPO, PPO and GRPO can each beat SFT on the held-out prompts.
Everything is generated from a seed (deterministic); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PREFIX = "reverse: "


def make_example(rng: random.Random, min_len: int = 3, max_len: int = 8) -> tuple[str, str]:
    """One (prompt, answer) pair."""
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len))]
    return PREFIX + " ".join(letters), " ".join(reversed(letters))


def answer_of(prompt: str) -> str:
    """The correct answer of a prompt (the rule itself)."""
    return " ".join(reversed(prompt.removeprefix(PREFIX).split()))


def near_miss(rng: random.Random, answer: str) -> str:
    """A wrong answer of the kind a model makes: two letters swapped, one dropped or changed, or not reversed."""
    letters = answer.split()
    for _ in range(10):
        wrong = list(letters)
        kind = rng.choice(["swap", "drop", "change", "unreversed"])
        if kind == "swap" and len(wrong) > 1:
            i = rng.randrange(len(wrong) - 1)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        elif kind == "drop" and len(wrong) > 1:
            del wrong[rng.randrange(len(wrong))]
        elif kind == "change":
            wrong[rng.randrange(len(wrong))] = rng.choice(LETTERS)
        else:
            wrong.reverse()
        if wrong != letters:
            return " ".join(wrong)
    return " ".join(letters + [rng.choice(LETTERS)])  # palindromes etc.: one letter too many


def exact_match(prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
    """Reward: 1.0 when the response is exactly the reversal (whitespace-normalised), else 0.0. ``labels`` are
    not needed (the rule derives the answer from the prompt) but are used when given."""
    return [float(" ".join(r.split()) == (label if label is not None else answer_of(p)))
            for p, r, label in zip(prompts, responses, labels, strict=True)]


def letter_accuracy(prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
    """Denser reward: the fraction of answer positions with the right letter, 0 if the length is wrong."""
    scores = []
    for p, r, label in zip(prompts, responses, labels, strict=True):
        truth, got = (label if label is not None else answer_of(p)).split(), r.split()
        scores.append(sum(a == b for a, b in zip(truth, got, strict=False)) / len(truth) if len(got) == len(truth)
                      else 0.0)
    return scores


def sloppy_answer(rng: random.Random, answer: str, error_rate: float, min_len: int) -> str:
    """A demonstrator's answer: with probability ``error_rate``, answers of ``min_len`` letters or more come with
    their last two letters swapped (a systematic slip, as real demonstrations have)."""
    letters = answer.split()
    if len(letters) >= min_len and rng.random() < error_rate:
        letters[-2], letters[-1] = letters[-1], letters[-2]
    return " ".join(letters)


def rejected_answer(rng: random.Random, answer: str, sft_error_rate: float, sft_error_min_len: int) -> str:
    """The rejected side of a preference pair: the demonstrators' slip where it applies (and changes the answer),
    otherwise a random near miss. (Rejecting a random near miss for long answers half the time instead made the
    tiny reward model worse at spotting the slip: 75-94% instead of 94-97% of held-out slip pairs.)"""
    if sft_error_rate > 0:
        slip = sloppy_answer(rng, answer, 1.0, sft_error_min_len)
        if slip != answer:
            return slip
    return near_miss(rng, answer)


def write_data(out: Path, seed: int = 0, n_sft: int = 2000, n_pairs: int = 4000, n_prompts: int = 1000,
               n_heldout: int = 200, min_len: int = 3, max_len: int = 8, sft_error_rate: float = 0.6,
               sft_error_min_len: int = 6) -> dict[str, Path]:
    """Write ``sft.jsonl`` (input/output), ``preference.jsonl`` (prompt/chosen/rejected), ``unpaired.jsonl``
    (the same pairs as KTO's prompt/completion/label rows), ``prompts.jsonl`` (prompt/answer) and ``heldout.jsonl``
    (prompt/answer, none of them in the other files).

    ``sft_error_rate`` makes the SFT demonstrations imperfect (see :func:`sloppy_answer`): imitation then learns
    the slip, while the rule-based reward and the preference pairs (right answer over the slip) can correct it."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    heldout: dict[str, str] = {}
    while len(heldout) < n_heldout:
        prompt, answer = make_example(rng, min_len, max_len)
        heldout[prompt] = answer

    def fresh() -> tuple[str, str]:
        while True:
            prompt, answer = make_example(rng, min_len, max_len)
            if prompt not in heldout:
                return prompt, answer

    files = {name: out / f"{name}.jsonl" for name in ("sft", "preference", "unpaired", "prompts", "heldout")}
    rows: dict[str, list[dict]] = {
        "sft": [{"input": p, "output": sloppy_answer(rng, a, sft_error_rate, sft_error_min_len)}
                for p, a in (fresh() for _ in range(n_sft))],
        "preference": [{"prompt": p, "chosen": a,
                        "rejected": rejected_answer(rng, a, sft_error_rate, sft_error_min_len)}
                       for p, a in (fresh() for _ in range(n_pairs))],
        "prompts": [{"prompt": p, "answer": a} for p, a in (fresh() for _ in range(n_prompts))],
        "heldout": [{"prompt": p, "answer": a} for p, a in heldout.items()],
    }
    rows["unpaired"] = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                        for r in rows["preference"] for side in ("chosen", "rejected")]
    for name, path in files.items():
        path.write_text("".join(json.dumps(row) + "\n" for row in rows[name]))
    return files


def evaluate(model_dir: str | Path, heldout: str | Path, reward_model: str | Path | None = None,
             max_new_tokens: int = 20) -> dict[str, float]:
    """Greedy answers of an exported model to the held-out prompts (chat template, as in training): exact-match
    ``accuracy`` (= the mean rule reward), mean ``letter_accuracy`` and, given a ``reward_model`` export, its mean
    normalised score ``reward_model_score`` (what PPO maximises). Generation and scoring are the ``evaluate``
    command's (:mod:`rlhf_lightning.eval_steps`), all prompts in one batch."""
    from rlhf_lightning.eval_steps import PromptSet, Sampling, encode_prompts, generate_texts, load_prompt_records
    from rlhf_lightning.models import load_tokenizer
    from rlhf_lightning.rollout.workers import GenerationWorker

    prompt_set = PromptSet(path=str(heldout), label_key="answer")
    records = load_prompt_records(prompt_set)
    tokenizer = load_tokenizer(str(model_dir))
    prompt_ids, prompts = encode_prompts(records, tokenizer, prompt_set)
    worker = GenerationWorker(str(model_dir), device="cpu")
    answers = [a[0] for a in generate_texts(worker, tokenizer, prompt_ids, Sampling(max_new_tokens), batch_size=0)]
    labels = [r["label"] for r in records]
    exact, letters = exact_match(prompts, answers, labels), letter_accuracy(prompts, answers, labels)
    result = {"accuracy": sum(exact) / len(records), "letter_accuracy": sum(letters) / len(records)}
    if reward_model is not None:
        result["reward_model_score"] = sum(reward_model_scores(reward_model, prompts, answers)) / len(records)
    return result


def reward_model_scores(reward_model: str | Path, prompts: list[str], responses: list[str]) -> list[float]:
    """Normalised scores of a ``RewardModel`` export for prompt/response pairs, tokenized as in PPO's rollouts."""
    from rlhf_lightning.eval_steps import RewardModelScorer

    return RewardModelScorer(str(reward_model), device="cpu", batch_size=None)(prompts, responses)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("examples/data/reverse"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-len", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=8)
    parser.add_argument("--sft-error-rate", type=float, default=0.6,
                        help="share of 6+ letter SFT answers with the last two letters swapped (0 = clean data)")
    args = parser.parse_args(argv)
    files = write_data(args.out, args.seed, min_len=args.min_len, max_len=args.max_len,
                       sft_error_rate=args.sft_error_rate)
    for name, path in files.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
