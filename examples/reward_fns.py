"""Rule-based reward functions (``model.init_args.reward_functions``) for the bundled tasks: the addition questions
of ``examples/data/*_tiny.jsonl`` and the demo's letter reversal (``examples/data/reverse``).

A reward function takes the prompts, the decoded responses and the prompt data's labels (``label_key``) and
returns one float per response:

    reward_functions: [examples/reward_fns.py:reversal_prefix]
"""


def reversal_prefix(prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
    """Demo task, partial credit in [0, 1]: the share of the answer that is right before the first mistake
    (1.0 = exact; an answer with extra letters loses the credit of one letter). Denser than exact match, still
    maximal only for the exact reversal."""
    from rlhf_lightning.tasks.reverse import answer_of

    scores = []
    for prompt, response, label in zip(prompts, responses, labels, strict=True):
        truth, got = (label or answer_of(prompt)).split(), response.split()
        right = next((i for i, (a, b) in enumerate(zip(truth, got, strict=False)) if a != b), min(len(truth), len(got)))
        scores.append(max(0, right - (len(got) > len(truth))) / len(truth))
    return scores


def exact_sum(prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
    """1.0 when the response is exactly the correct sum (the label), else 0.0."""
    return [float(r.strip() == (label or "").strip()) for r, label in zip(responses, labels, strict=True)]


def even_answer(prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
    """1.0 when the response is a number ending in an even digit: a preference a tiny model can learn in a
    few PPO steps (used by the tests)."""
    return [float(r.strip().isdigit() and int(r.strip()[-1]) % 2 == 0) for r in responses]


def final_answer(prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
    """GSM8K-style: 1.0 when the last number in the response equals the label's final answer (the number after
    ``####`` if present, else the label's last number)."""
    import re

    def last_number(text: str) -> str | None:
        numbers = re.findall(r"-?\d[\d,]*\.?\d*", text.split("####")[-1])
        return numbers[-1].replace(",", "").rstrip(".") if numbers else None

    return [float(label is not None and last_number(r) is not None and last_number(r) == last_number(label))
            for r, label in zip(responses, labels, strict=True)]
