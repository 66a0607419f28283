"""``ScoringDataModule``: rows to score, read from a jsonl file and kept whole (every field goes back to the output).

Three layouts, recognised from the first row's columns:

- ``response``: one prompt/response pair per row (``{"prompt", "response"}``) -> a ``score``;
- ``responses``: a prompt with a list of responses, as batch generation writes them -> ``scores``;
- ``pairs``: a preference pair (``{"prompt", "chosen", "rejected"}``) -> ``chosen_score``, ``rejected_score``.

Rows are read as JSON directly (not through ``datasets``), so fields such as the generation output's own
``source_file``/``source_line`` pass through unchanged; a row's identity here is its line in this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from rlhf_lightning.data.loaders import build_dataloader
from rlhf_lightning.errors import DataError, MissingPathError

Layout = Literal["response", "responses", "pairs"]


def read_jsonl(path: Path, option: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line; a line that is not a JSON object is a :class:`DataError`."""
    if not path.is_file():
        raise MissingPathError(f"{option}='{path}' does not exist. Point it at a jsonl file of rows to score.")
    if path.suffix != ".jsonl":
        raise DataError(f"{option}='{path}': scoring reads .jsonl files (one JSON object per line).")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: not valid JSON ({err.msg}). Fix the file.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: a row must be a JSON object.")
            rows.append((number, row))
    if not rows:
        raise DataError(f"{option}='{path}' has no rows.")
    return rows


class ScoringDataModule(pl.LightningDataModule):
    """Rows to score (``predict`` only), each batch a list of ``{"index", "line", "row"}``.

    Args:
        path: the jsonl file.
        prompt_key: the prompt column (text or a list of chat messages).
        response_key: the column of one response (layout ``response``).
        responses_key: the column of a list of responses (layout ``responses``, batch generation's output).
        chosen_key: the preferred response of a pair (layout ``pairs``).
        rejected_key: the other response of a pair.
        label_key: optional column handed to reward functions (e.g. the correct answer).
        layout: ``response``, ``responses`` or ``pairs``; default: from the first row's columns.
        batch_size: rows per batch per device.
        max_samples: score only the first N rows.
        tokenizer: unused (the reward models' own tokenizers are used); accepted so the CLI's tokenizer link works.
    """

    def __init__(self, path: str, prompt_key: str = "prompt", response_key: str = "response",
                 responses_key: str = "responses", chosen_key: str = "chosen", rejected_key: str = "rejected",
                 label_key: str | None = "label", layout: Layout | None = None, batch_size: int = 32,
                 max_samples: int | None = None, tokenizer: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.rows: list[dict[str, Any]] | None = None
        self.layout: Layout | None = layout

    def detect_layout(self, first: dict[str, Any]) -> Layout:
        hp = self.hparams
        if hp.chosen_key in first and hp.rejected_key in first:
            return "pairs"
        if hp.responses_key in first:
            return "responses"
        if hp.response_key in first:
            return "response"
        raise DataError(f"{hp.path} line 1: no column to score: expected data.init_args.response_key="
                        f"'{hp.response_key}', responses_key='{hp.responses_key}' or chosen_key/rejected_key="
                        f"'{hp.chosen_key}'/'{hp.rejected_key}'; the row has {sorted(first)}.")

    def check_row(self, line: int, row: dict[str, Any]) -> None:
        """Raise :class:`DataError` naming the file, line and option of a row that cannot be scored."""
        hp, where = self.hparams, f"{self.hparams.path} line {line}"
        prompt = row.get(hp.prompt_key)
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
            raise DataError(f"{where}: data.init_args.prompt_key='{hp.prompt_key}' is missing or not text/messages.")
        keys = {"response": [hp.response_key], "responses": [hp.responses_key],
                "pairs": [hp.chosen_key, hp.rejected_key]}[self.layout]
        for key in keys:
            value = row.get(key)
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value) if self.layout == "responses" \
                else isinstance(value, str)
            if not ok:
                kind = "a list of strings" if self.layout == "responses" else "a string"
                raise DataError(f"{where}: column '{key}' must be {kind} (layout {self.layout}); got {value!r:.80}.")

    def setup(self, stage: str) -> None:
        if self.rows is not None:
            return
        hp = self.hparams
        records = read_jsonl(Path(hp.path), "data.init_args.path")[: hp.max_samples or None]
        self.layout = self.layout or self.detect_layout(records[0][1])
        for line, row in records:
            self.check_row(line, row)
        self.rows = [{"index": i, "line": line, "row": row} for i, (line, row) in enumerate(records)]

    def predict_dataloader(self) -> DataLoader:
        return build_dataloader(self.rows, self.hparams.batch_size, False, list, self.trainer)
