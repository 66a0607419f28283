"""Best-of-n selection for rejection sampling: scored samples -> SFT rows (pure functions, plus one file step).

Llama 2 (Touvron et al. 2023, arXiv 2307.09288, sec. 3.2.3) keeps each prompt's highest-scoring sample; RAFT (Dong
et al. 2023, arXiv 2304.06767) keeps the samples above a reward threshold. :func:`select_file` is the ``select``
step of :mod:`rlhf_lightning.rejection_sampling` (``python -m rlhf_lightning rejection-sampling select``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from rlhf_lightning.errors import ConfigError, DataError

Selection = Literal["best", "threshold"]


def best_index(scores: Sequence[float]) -> int:
    """Index of the highest score; among equal scores the first (deterministic)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def select_responses(responses: Sequence[str], scores: Sequence[float], selection: Selection = "best",
                     threshold: float | None = None, dedup: bool = True) -> list[tuple[str, float]]:
    """The (response, score) pairs of one prompt that become SFT data.

    ``best``: the highest-scoring response (first of ties), dropped when ``threshold`` is set and it scores below.
    ``threshold``: every response scoring ``>= threshold``, best first (stable for ties); with ``dedup`` a text
    sampled several times is kept once (duplicates would weight that answer n-fold in the loss)."""
    if len(responses) != len(scores):
        raise ValueError(f"{len(responses)} responses but {len(scores)} scores")
    if not responses:
        return []
    if selection == "best":
        i = best_index(scores)
        return [(responses[i], scores[i])] if threshold is None or scores[i] >= threshold else []
    if threshold is None:
        raise ConfigError("selection: threshold needs a threshold value (option threshold).")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept, seen = [], set()
    for i in order:
        if scores[i] >= threshold and not (dedup and responses[i] in seen):
            kept.append((responses[i], scores[i]))
            seen.add(responses[i])
    return kept


def sft_row(prompt: str | list[dict[str, Any]], response: str, score: float) -> dict[str, Any]:
    """One SFT row: ``input``/``output`` for a text prompt, ``messages`` (prompt + the answer) for a chat prompt."""
    if isinstance(prompt, list):
        return {"messages": [*prompt, {"role": "assistant", "content": response}], "score": score}
    return {"input": prompt, "output": response, "score": score}


def select_rows(rows: Sequence[dict[str, Any]], selection: Selection = "best", threshold: float | None = None,
                dedup: bool = True, source: str = "scores") -> list[dict[str, Any]]:
    """SFT rows from scored generation rows (``prompt``, ``responses``, ``scores``; see :func:`select_responses`).
    A row without equally long ``responses`` and ``scores`` is a :class:`DataError` naming ``source`` and its line."""
    out = []
    for line, row in enumerate(rows, 1):
        responses, scores = row.get("responses"), row.get("scores")
        if not isinstance(responses, list) or not isinstance(scores, list) or len(responses) != len(scores):
            raise DataError(f"{source}:{line}: a scored generation row needs lists 'responses' and 'scores' of "
                            f"equal length (got keys {sorted(row)}). Pass the output of the score step.")
        for response, score in select_responses(responses, [float(s) for s in scores], selection, threshold, dedup):
            out.append(sft_row(row["prompt"], response, score))
    return out


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def selection_stats(rows: Sequence[dict[str, Any]], selected: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What selection bought: counts, the mean score of all samples, of each prompt's best sample and of the kept
    rows. ``mean_best - mean_all`` is the reward gain of best-of-n over sampling once (Llama 2, fig. 7)."""
    every = [float(s) for row in rows for s in row["scores"]]
    return {"prompts": len(rows), "samples": len(every), "selected": len(selected),
            "mean_score_all": mean(every), "mean_score_best": mean([max(map(float, r["scores"])) for r in rows
                                                                      if r["scores"]]),
            "mean_score_selected": mean([r["score"] for r in selected])}


def select_file(scores: Path, output: Path, selection: Selection = "best", threshold: float | None = None,
                dedup: bool = True) -> dict[str, Any]:
    """Select from a score file into an SFT file, write ``selection.json`` (stats) beside it; return the stats.

    Args:
        scores: output of the score step (rows with ``prompt``, ``responses`` and ``scores``).
        output: the SFT jsonl to write.
        selection: ``best`` (one per prompt) or ``threshold`` (every sample scoring >= threshold).
        threshold: minimum score of a kept sample.
        dedup: with ``threshold``, keep a response sampled several times once.
    """
    from rlhf_lightning.data.scoring import read_jsonl
    from rlhf_lightning.inference.writer import write_atomically

    rows = [row for _, row in read_jsonl(Path(scores), "--scores")]
    selected = select_rows(rows, selection, threshold, dedup, str(scores))
    if not selected:
        raise DataError(f"{scores}: no sample was selected ({len(rows)} prompts, threshold={threshold}): lower "
                        f"threshold or sample more (n, temperature).")
    write_atomically(Path(output), "".join(json.dumps(row) + "\n" for row in selected))
    stats = selection_stats(rows, selected) | {"selection": selection, "threshold": threshold, "dedup": dedup}
    Path(output).with_name("selection.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
