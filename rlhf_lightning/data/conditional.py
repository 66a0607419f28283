"""Reward-conditioned SFT data: scored responses, each trained on with its score's condition in the prompt.

Reads the rows batch scoring writes (``python -m rlhf_lightning predict --config configs/tiny/score.yaml``)::

    {"prompt": "reverse: k e q", "responses": ["q e k", "q k e"], "scores": [1.0, 0.0]}   # n samples per prompt
    {"prompt": "reverse: k e q", "response": "q e k", "score": 1.0}                      # one per row

(keys configurable; a prompt may also be a list of chat messages). Every response becomes one sample whose user
message(s) start with the condition of its score's level; the loss is on the response only. Before encoding, the
scores of all training rows (after ``max_samples`` and the ``val_split`` hold-out) are normalised and quantised
once (:mod:`rlhf_lightning.conditioning`); validation rows use the same statistics.

The tokenizer gets the condition-applying chat template (and, with ``condition_style: special_tokens``, one new
token per level), exactly as the exported model will have it (:class:`~rlhf_lightning.algorithms.ConditionalSFT`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import datasets
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.conditioning import (
    ConditionSettings,
    Normalize,
    ScoreQuantizer,
    Style,
    condition_settings,
    prepare_tokenizer,
    render_conditions,
    with_condition,
)
from rlhf_lightning.data.base import BaseDataModule, shorten
from rlhf_lightning.data.collate import IGNORE_INDEX
from rlhf_lightning.data.formatting import render_chat, tokenize_with_spans, truncate
from rlhf_lightning.data.sft import SFTDataModule, as_text
from rlhf_lightning.data.sources import load_records, require_columns, where
from rlhf_lightning.data.transcripts import BadRow
from rlhf_lightning.errors import ConfigError, DataError


def as_score(value: object, key: str) -> float:
    """A cell as a finite score; anything else (missing, text, NaN, inf) is a bad row."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRow(f"'{key}' must be a number, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value):
        raise BadRow(f"'{key}' is {value}, not a finite number")
    return float(value)


class ConditionalSFTDataModule(BaseDataModule):
    """Scored prompt/response rows for reward-conditioned SFT (see the module docstring).

    Args:
        prompt_key: column with the prompt (text or a list of chat messages).
        response_key: column with one response (rows of one response each, with ``score_key``).
        score_key: column with that response's score.
        responses_key: column with a list of responses (used when the data has it, with ``scores_key``).
        scores_key: column with one score per response.
        levels: number of conditions (score buckets), at least 2.
        normalize: ``rank`` (mid-rank percentile, the default: exact equal-frequency levels, robust to outliers)
            or ``zscore`` (normal CDF of the z-score: equal-frequency for normally distributed scores).
        condition_style: ``prefix`` (text in front of each user message) or ``special_tokens`` (one new token per
            level, embeddings resized by the model).
        condition_template: how a level is written, with ``{level}`` (1..levels) and ``{levels}``; default
            ``"<quality: {level}/{levels}> "`` (prefix) or ``"<|reward_{level}|>"`` (special tokens).
        max_len: maximum tokens per sample.
        truncation: ``right`` cuts long samples, ``drop`` drops them.
        kwargs: the common arguments of :class:`~rlhf_lightning.data.base.BaseDataModule`.
    """

    empty_sample = SFTDataModule.empty_sample

    def __init__(self, *args: Any, prompt_key: str = "prompt", response_key: str = "response",
                 score_key: str = "score", responses_key: str = "responses", scores_key: str = "scores",
                 levels: int = 5, normalize: Normalize = "rank", condition_style: Style = "prefix",
                 condition_template: str | None = None, max_len: int = 2048,
                 truncation: Literal["right", "drop"] = "right", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if levels < 2:
            raise ConfigError(f"data.init_args.levels={levels} must be at least 2 (one condition says nothing).")
        try:
            render_conditions(levels, condition_style, condition_template)
        except ValueError as err:
            raise ConfigError(f"data.init_args.condition_template: {err}.") from err
        self.quantizer: ScoreQuantizer | None = None
        self.condition_settings: ConditionSettings | None = None

    # ------------------------------------------------------------------------------------- conditions
    def setup(self, stage: str) -> None:
        if self.quantizer is None:
            self.fit_conditions()
        super().setup(stage)

    def fit_conditions(self) -> None:
        """Normalisation statistics and levels from the scores of every training row, once, before encoding."""
        hp, scores, bad = self.hparams, [], []
        for option, source in self._sources(hp.path, "data.init_args.path"):
            records = load_records(source, hp.split, option=option)
            if hp.max_samples:
                records = records.select(range(min(hp.max_samples, len(records))))
            if not hp.val_path and hp.val_split > 0:  # the same split BaseDataModule.setup makes
                records = records.train_test_split(test_size=hp.val_split, seed=hp.seed)["train"]
            self.check_columns(records, source)
            for row in records:
                try:
                    scores.extend(self.row_scores(row))
                except BadRow as err:
                    bad.append(f"{where(row['source_file'], row['source_line'])}: {err}")
        if bad and hp.on_bad_rows == "error":
            raise DataError(f"{len(bad)} row(s) with unusable scores: " + "; ".join(bad[:10])
                            + (" ..." if len(bad) > 10 else "") + ". Fix them or set data.init_args.on_bad_rows=skip.")
        try:
            self.quantizer = ScoreQuantizer.fit(scores, hp.normalize, hp.levels)
        except ValueError as err:
            raise DataError(f"data.init_args.path={hp.path!r}: {err}. Score the responses with a reward that tells "
                            f"them apart (data.init_args.score_key / scores_key).") from err
        self.condition_settings = condition_settings(self.quantizer, hp.condition_style, hp.condition_template)
        s = self.condition_settings
        rank_zero_info(f"Reward conditions ({hp.normalize}, {hp.levels} levels) from {len(scores)} scores "
                       f"(mean {s.stats['mean']:.4g}, std {s.stats['std']:.4g}): samples per level "
                       f"{s.level_counts}; inference uses the best condition {s.best_condition!r}.")

    def row_scores(self, row: dict[str, Any]) -> list[float]:
        """The scores of one row, checked (one finite number per response)."""
        hp = self.hparams
        if row.get(hp.responses_key) is None:
            return [as_score(row.get(hp.score_key), hp.score_key)]
        responses, scores = row[hp.responses_key], row.get(hp.scores_key)
        if not isinstance(scores, list) or not isinstance(responses, list) or len(scores) != len(responses):
            raise BadRow(f"'{hp.scores_key}' must list one score per response in '{hp.responses_key}' "
                         f"({len(responses) if isinstance(responses, list) else responses!r} responses, scores "
                         f"{scores!r})")
        return [as_score(s, hp.scores_key) for s in scores]

    # ------------------------------------------------------------------------------------------ encoding
    def check_columns(self, records: datasets.Dataset, source: str) -> None:
        hp = self.hparams
        keys = {"data.init_args.prompt_key": hp.prompt_key}
        if hp.responses_key in records.column_names:
            keys["data.init_args.scores_key"] = hp.scores_key
        else:
            keys |= {"data.init_args.response_key": hp.response_key, "data.init_args.score_key": hp.score_key}
        require_columns(records, keys, source)

    def encode_source(self, records: datasets.Dataset, source: str, part: str = "training") -> datasets.Dataset:
        prepare_tokenizer(self.tokenizer, self.condition_settings)  # idempotent: the exported model's tokenizer
        return super().encode_source(records, source, part)

    def encode_row(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """One sample per response, its prompt carrying the condition of its score's level."""
        hp = self.hparams
        scores = self.row_scores(row)
        responses = row[hp.responses_key] if row.get(hp.responses_key) is not None else [row[hp.response_key]]
        conditions = self.condition_settings.conditions
        return [self.encode_sample(row[hp.prompt_key], as_text(response, hp.response_key),
                                   conditions[self.quantizer.level(score) - 1])
                for response, score in zip(responses, scores, strict=True)]

    def encode_sample(self, prompt: str | list[dict[str, Any]], response: str, condition: str) -> dict[str, Any]:
        """Render with the chat template (the condition on every user message), loss on the response only."""
        hp = self.hparams
        if isinstance(prompt, str) and prompt.strip():
            messages = [{"role": "user", "content": with_condition(prompt, condition)}]
        elif isinstance(prompt, list) and prompt:
            messages = [dict(m, content=with_condition(m["content"], condition))
                        if m.get("role") == "user" and isinstance(m.get("content"), str) else m for m in prompt]
        else:
            raise BadRow(f"'{hp.prompt_key}' is empty or neither text nor a list of messages ({prompt!r})")
        text, spans = render_chat(self.tokenizer, [*messages, {"role": "assistant", "content": response}])
        sample = tokenize_with_spans(self.tokenizer, text, spans[-1:], chat_formatted=True)
        cut = len(sample["input_ids"]) > hp.max_len
        if cut and hp.truncation == "right":
            sample, _ = truncate(sample, hp.max_len)
        keep = not (cut and hp.truncation == "drop") and any(t != IGNORE_INDEX for t in sample["labels"])
        return {**sample, "truncated": cut, "keep": keep}

    def encoding_fingerprint(self, records: datasets.Dataset) -> str | None:
        """Also keyed by every training score: a row's level depends on the whole training distribution."""
        fingerprint = super().encoding_fingerprint(records)
        return fingerprint and Hasher.hash([fingerprint, self.quantizer.reference])

    finish = SFTDataModule.finish  # the length policy and its report
    example = SFTDataModule.example

    def layout(self, records: datasets.Dataset) -> str:
        hp = self.hparams
        if hp.responses_key in records.column_names:
            columns = f"'{hp.responses_key}'/'{hp.scores_key}'"
        else:
            columns = f"'{hp.response_key}'/'{hp.score_key}'"
        return (f"prompts from '{hp.prompt_key}', scored responses from {columns}, conditioned "
                f"({hp.condition_style}, best {shorten(self.condition_settings.best_condition)})")

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        return SFTDataModule.collate_fn(self)
