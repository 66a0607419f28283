"""``JsonlPredictionWriter``: predictions of every rank to one jsonl file in input order, safe to kill and resume.

Each rank appends the rows of every finished batch to its own part file (``<output>.part<rank>``, one
``{"order": i, "row": {...}}`` line per row, flushed at once), so a killed run loses at most the batches in flight.
When ``predict`` ends, rank 0 merges the parts into ``output``: rows sorted by ``order`` (their position in the
input), each once (the distributed sampler repeats a few rows to even out the shards), written to a temporary file
and renamed over ``output``, so ``output`` is never half written.

A resumable module (``Generator``) is resumed from what is already there: on start, rank 0 folds leftover part
files into ``output`` (a torn last line, from a kill in the middle of a write, is dropped) and every rank reads the
rows already done (:meth:`JsonlPredictionWriter.done`); the module skips them. ``<output>.meta.json`` records the
options that produced the rows: resuming with other options is refused (one line naming ``overwrite``), since the
file would mix two runs. Modules that are not resumable (scoring) start over each run.

The module provides ``output_meta() -> dict`` (options to compare and record) and ``resumable: bool``; a
resumable one also ``row_key(row)`` (its identity) and ``row_order(row) -> int | None`` (the input position of a
row read back from ``output``). Optional: ``run_stats() -> dict`` (collective, added to the meta, e.g. tokens/s)
and ``summarize(output)`` (rank 0, after the merge, e.g. score statistics).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from rlhf_lightning.errors import ConfigError


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a jsonl file, in order. A last line cut short (no newline, not valid JSON: the process
    was killed while writing it) is dropped; a bad line before the last means the file is not ours to append to."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # torn tail
                break
            raise ConfigError(f"'{path}' line {number} is not valid JSON: it was not written by this command. Move "
                              f"it away or pass --trainer.callbacks.init_args.overwrite true.") from None
    return rows


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (write a temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` rows to a jsonl file (``output``) plus ``<output>.meta.json``.

    Args:
        output: the jsonl file to write.
        overwrite: start over, deleting an earlier ``output`` (and its parts and meta) instead of resuming it.
    """

    def __init__(self, output: str, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.overwrite = overwrite
        self._done: dict[tuple, dict[str, Any]] = {}
        self._handle: Any = None
        self.meta: dict[str, Any] = {}

    @property
    def meta_path(self) -> Path:
        return self.output.with_name(self.output.name + ".meta.json")

    def part_path(self, rank: int) -> Path:
        return self.output.with_name(f"{self.output.name}.part{rank}")

    def part_paths(self) -> list[Path]:
        return sorted(self.output.parent.glob(f"{self.output.name}.part*"))

    # -------------------------------------------------------------------------------------------- start
    def check_resume(self, module: LightningModule) -> None:
        """Refuse an existing ``output`` written with other options (or by something else); cheap, before loading."""
        if self.overwrite or not getattr(module, "resumable", False):
            return
        if not (self.output.exists() or self.part_paths()):
            return
        if not self.meta_path.is_file():
            raise ConfigError(f"'{self.output}' exists but has no {self.meta_path.name}: it was not written by this "
                              f"command. Choose another output or pass --trainer.callbacks.init_args.overwrite true.")
        old, new = json.loads(self.meta_path.read_text()).get("options", {}), module.output_meta()
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k)]
        if changed:
            raise ConfigError(f"'{self.output}' was written with other options ({'; '.join(changed)}); resuming would "
                              f"mix two runs in one file. Pass --trainer.callbacks.init_args.overwrite true to start "
                              f"over, or choose another output.")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check_resume(pl_module)
        resumable = getattr(pl_module, "resumable", False) and not self.overwrite
        if trainer.is_global_zero:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            if resumable:
                self.merge(pl_module)  # fold a killed run's parts into output
            else:
                for path in [self.output, self.meta_path, *self.part_paths()]:
                    path.unlink(missing_ok=True)
            self.meta = {"options": pl_module.output_meta(), "complete": False}
            write_atomically(self.meta_path, json.dumps(self.meta, indent=2) + "\n")
        trainer.strategy.barrier("jsonl-writer-setup")
        rows = read_rows(self.output) if resumable else []
        self._done = {pl_module.row_key(row): row for row in rows}
        if rows:
            rank_zero_info(f"Resuming '{self.output}': {len(rows)} rows already written are skipped.")

    def done(self, key: tuple) -> dict[str, Any] | None:
        """The row already written for ``key`` (an earlier, interrupted run), or ``None``."""
        return self._done.get(key)

    # ------------------------------------------------------------------------------------------- writing
    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if not prediction:
            return
        if self._handle is None:
            self._handle = self.part_path(trainer.global_rank).open("a", encoding="utf-8")
        self._handle.write("".join(json.dumps({"order": order, "row": row}) + "\n" for order, row in prediction))
        self._handle.flush()

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close this rank's part; rank 0 merges every part into ``output`` and completes the meta."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        stats = pl_module.run_stats() if hasattr(pl_module, "run_stats") else {}  # every rank (collective)
        trainer.strategy.barrier("jsonl-writer-merge")
        if trainer.is_global_zero:
            count = self.merge(pl_module)
            self.meta.update(stats, rows=count, complete=True)
            write_atomically(self.meta_path, json.dumps(self.meta, indent=2) + "\n")
            rank_zero_info(f"Wrote {count} rows to {self.output} (and {self.meta_path.name}).")
            if hasattr(pl_module, "summarize"):
                pl_module.summarize(self.output)
        trainer.strategy.barrier("jsonl-writer-done")

    def merge(self, pl_module: LightningModule) -> int:
        """Fold the part files into ``output``: sorted by input order, one row per order, parts deleted after."""
        by_order: dict[int, dict[str, Any]] = {}
        unordered = []
        for row in read_rows(self.output):  # only a resumable module's output survives setup
            order = pl_module.row_order(row)
            if order is None:
                unordered.append(row)
            else:
                by_order.setdefault(order, row)
        parts = self.part_paths()
        for part in parts:
            for item in read_rows(part):
                by_order.setdefault(int(item["order"]), item["row"])
        if parts or unordered:
            rows = [by_order[k] for k in sorted(by_order)] + unordered
            write_atomically(self.output, "".join(json.dumps(row) + "\n" for row in rows))
            for part in parts:
                part.unlink()
        return len(by_order) + len(unordered)


def gather(module: LightningModule, values: list[float]) -> torch.Tensor:
    """``values`` of every rank as a (ranks, len(values)) tensor (collective: all ranks must call it)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=module.device)
    if module.trainer.world_size > 1:
        tensor = module.trainer.strategy.all_gather(tensor)
    return tensor.reshape(module.trainer.world_size, -1).cpu()


@rank_zero_only
def report(message: str) -> None:
    """Print a result line on rank 0 (stdout: the run's outcome, not a log message)."""
    print(message, flush=True)
