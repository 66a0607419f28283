"""Batch generation: ``n`` responses per prompt of a jsonl file, through Lightning's ``predict`` loop.

    python -m rlhf_lightning predict --config configs/tiny/generate.yaml
    python -m rlhf_lightning predict --config configs/tiny/generate.yaml --trainer.devices 2   # sharded

The model samples through the same :class:`~rlhf_lightning.rollout.workers.GenerationWorker` PPO uses (one
generation path). Prompts come from :class:`~rlhf_lightning.data.PromptDataModule` (same formatting as training:
chat template or ``input_template``); :class:`~rlhf_lightning.inference.writer.JsonlPredictionWriter` writes one
row per prompt, ``{"prompt", "responses", "label", "source_file", "source_line"}``, in input order, plus
``<output>.meta.json`` (model, sampling options, chat template, rows, tokens/s).

Deterministic and resumable: prompt ``source_file:source_line`` is sampled from its own seed (derived from
``seed`` and that key, :func:`prompt_seed`), so its samples do not depend on the batch it lands in, the device
count or whether the run was interrupted; a rerun skips the prompts already written.
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any

from lightning.pytorch import LightningDataModule

from rlhf_lightning.algorithms.base import RLHFModule, require
from rlhf_lightning.data.sources import load_records
from rlhf_lightning.errors import ConfigError, DataError
from rlhf_lightning.inference.writer import JsonlPredictionWriter, gather, report
from rlhf_lightning.models import check_model_path, load_tokenizer
from rlhf_lightning.rollout.workers import GenerationWorker


def prompt_seed(seed: int, source_file: str, source_line: int) -> int:
    """The sampling seed of one prompt: a stable hash of the run's ``seed`` and the prompt's file and line."""
    return zlib.crc32(f"{seed}:{os.path.basename(source_file)}:{source_line}".encode())


class Generator(RLHFModule):
    """Samples ``n`` responses per prompt (``predict`` only).

    Args:
        n: responses per prompt.
        max_new_tokens: most tokens generated per response (it also stops at EOS / end of turn).
        temperature: sampling temperature; 0 = greedy (then one response is computed and repeated ``n`` times).
        top_p: nucleus sampling mass (1 = off).
        top_k: sample among the ``k`` likeliest tokens (0 = off).
        generation_kwargs: more ``GenerationConfig`` fields, e.g. ``{repetition_penalty: 1.1, min_p: 0.05}``.
        seed: seed of every prompt's samples (with its file and line); default: ``seed_everything``'s, else 0.
        skip_special_tokens: drop special tokens (EOS, end of turn) from the response text.
        kwargs: ``model``, ``tokenizer``, ``dtype``, ``attn_implementation``, ``trust_remote_code``... of
            :class:`RLHFModule` (its training options are unused).
    """

    resumable = True

    def __init__(self, *args: Any, n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, generation_kwargs: dict[str, Any] | None = None,
                 seed: int | None = None, skip_special_tokens: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        require(n >= 1, "n", n, ">= 1")
        require(max_new_tokens >= 1, "max_new_tokens", max_new_tokens, ">= 1")
        require(temperature >= 0, "temperature", temperature, ">= 0 (0 = greedy)")
        require(0 < top_p <= 1, "top_p", top_p, "in (0, 1]")
        require(top_k >= 0, "top_k", top_k, ">= 0 (0 = off)")
        self.seed = seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.worker: GenerationWorker | None = None
        self._order: dict[tuple, int] | None = None
        self._keys: list[tuple[str, int]] = []
        self._messages: dict[tuple[str, int], list] = {}
        self._tokens = self._samples = self._skipped = 0
        self._started = 0.0

    # ------------------------------------------------------------------------------------------ pre-flight
    def check_config(self, datamodule: LightningDataModule | None) -> None:
        from rlhf_lightning.data import PromptDataModule

        if not isinstance(datamodule, PromptDataModule):
            raise ConfigError(f"{type(self).__name__} generates from prompts: set data.class_path to "
                              f"rlhf_lightning.data.PromptDataModule (got {type(datamodule).__name__}).")
        for option, path, random_ok in self.model_paths():
            check_model_path(path, option, random_init=random_ok)

    def configure_model(self) -> None:
        if self.worker is None:
            hp = self.hparams
            device = str(self.trainer.strategy.root_device) if self._has_trainer else None
            self.worker = GenerationWorker(hp.model, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
                                           trust_remote_code=hp.trust_remote_code, device=device,
                                           random_init=hp.random_init)
            self.model = self.worker.model  # a submodule: the model summary counts it
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer or self.hparams.model,
                                            trust_remote_code=self.hparams.trust_remote_code)

    def configure_optimizers(self) -> None:
        return None

    # ------------------------------------------------------------------------------------------ the rows
    def output_meta(self) -> dict[str, Any]:
        """What produced the rows (a resumed run must match it); also written to ``<output>.meta.json``."""
        hp, data = self.hparams, self.trainer.datamodule.hparams
        return {"model": hp.model, "tokenizer": hp.tokenizer or hp.model, "dtype": hp.dtype, "n": hp.n,
                "max_new_tokens": hp.max_new_tokens, "temperature": hp.temperature, "top_p": hp.top_p,
                "top_k": hp.top_k, "generation_kwargs": hp.generation_kwargs or {}, "seed": self.seed,
                "data": data.path, "prompt_key": data.prompt_key, "label_key": data.label_key,
                "input_template": data.input_template, "use_chat_template": data.use_chat_template,
                "chat_template": self.uses_chat_template()}

    def uses_chat_template(self) -> bool:
        data = self.trainer.datamodule
        return data.hparams.input_template is None and data.hparams.use_chat_template and bool(
            data.tokenizer.chat_template)

    @staticmethod
    def row_key(row: dict[str, Any]) -> tuple[str, int]:
        return row["source_file"], int(row["source_line"])

    def row_order(self, row: dict[str, Any]) -> int | None:
        """Position of a written row in the input (its dataset index), from its file and line."""
        if self._order is None:
            dataset = self.trainer.datamodule.train_dataset
            self._keys = [(f, int(line)) for f, line in zip(dataset["source_file"], dataset["source_line"],
                                                              strict=True)]
            self._order = {key: i for i, key in enumerate(self._keys)}
        return self._order.get(self.row_key(row))

    def writer(self) -> JsonlPredictionWriter | None:
        return next((c for c in self.trainer.callbacks if isinstance(c, JsonlPredictionWriter)), None)

    # -------------------------------------------------------------------------------------------- predict
    def on_predict_start(self) -> None:
        self._started = time.perf_counter()
        self.row_order({"source_file": "", "source_line": 0})  # build the order map once
        self._messages = self.chat_prompts()

    def chat_prompts(self) -> dict[tuple[str, int], list]:
        """The message lists of chat-formatted prompts by file and line: the data module keeps only their rendered
        text, and the output row gives the prompt as the input had it."""
        data = self.trainer.datamodule
        found = {}
        for option, source in data._sources(data.hparams.path, "data.init_args.path"):
            records = load_records(source, data.hparams.split, option=option)
            if records.features[data.hparams.prompt_key].__class__.__name__ in ("List", "Sequence", "LargeList"):
                for f, line, prompt in zip(records["source_file"], records["source_line"],
                                           records[data.hparams.prompt_key], strict=True):
                    found[(f, int(line))] = prompt
        return found

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[tuple[int, dict[str, Any]]]:
        """Generate for the batch's prompts not written yet; returns ``(input position, row)`` pairs."""
        hp, writer = self.hparams, self.writer()
        todo = []
        for position, index in enumerate(batch["index"].tolist()):
            key = self._keys[index]
            done = writer.done(key) if writer else None
            if done is not None and done["prompt"] != self.prompt_of(batch, position, key):
                raise DataError(f"{key[0]} line {key[1]}: the prompt differs from the one in '{writer.output}' (the "
                                f"input changed since): pass --trainer.callbacks.init_args.overwrite true to start "
                                f"over.")
            if done is None:
                todo.append((position, index, key))
        self._skipped += len(batch["index"]) - len(todo)
        if not todo:
            return []
        prompt_ids = [batch["prompt_ids"][p] for p, _, _ in todo]
        n = hp.n if hp.temperature > 0 else 1  # greedy: one response, repeated
        out = self.worker.generate(
            prompt_ids, n=n, max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=hp.top_p,
            top_k=hp.top_k, eos_token_ids=self.eos_token_ids(), pad_token_id=self.tokenizer.pad_token_id,
            generation_kwargs=hp.generation_kwargs, prompt_seeds=[prompt_seed(self.seed, *key) for _, _, key in todo])
        responses = out["responses"]
        self._tokens += sum(len(r) for r in responses)
        self._samples += len(responses)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=hp.skip_special_tokens)
        rows = []
        for i, (position, index, key) in enumerate(todo):
            group = texts[i * n:(i + 1) * n] * (hp.n // n)
            rows.append((index, {"prompt": self.prompt_of(batch, position, key), "responses": group,
                                 "label": batch["label"][position], "source_file": key[0], "source_line": key[1]}))
        return rows

    def prompt_of(self, batch: dict[str, Any], position: int, key: tuple[str, int]) -> Any:
        """The prompt as the input gave it: text, or a list of chat messages."""
        return self._messages.get(key, batch["prompt_text"][position])

    def eos_token_ids(self) -> list[int]:
        """EOS of the tokenizer and of the model's generation config (chat models often end turns with another)."""
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.worker.model.generation_config, "eos_token_id", None)
        ids |= set(configured if isinstance(configured, list) else [configured])
        return sorted(i for i in ids if i is not None)

    def run_stats(self) -> dict[str, Any]:
        """Throughput over every rank (collective): new tokens and responses per second of wall time."""
        per_rank = gather(self, [self._tokens, self._samples, self._skipped, time.perf_counter() - self._started])
        (tokens, samples, skipped, _), seconds = per_rank.sum(0).tolist(), per_rank[:, 3].max().item()
        world = self.trainer.world_size
        stats = {"new_tokens": int(tokens), "responses": int(samples), "skipped_prompts": int(skipped),
                 "seconds": round(seconds, 3), "tokens_per_s": round(tokens / max(seconds, 1e-9), 2),
                 "samples_per_s": round(samples / max(seconds, 1e-9), 3), "devices": world}
        report(f"Generated {stats['responses']} responses ({stats['new_tokens']} tokens) in "
                       f"{stats['seconds']:.1f} s: {stats['tokens_per_s']:.1f} tokens/s, "
                       f"{stats['samples_per_s']:.2f} samples/s" +
                       (f" ({stats['skipped_prompts']} prompts already written were skipped)" if skipped else ""))
        return stats
