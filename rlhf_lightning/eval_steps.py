"""The steps of an evaluation, shared by ``evaluate`` and the demo task's ``reverse.evaluate``: read a prompt file,
render prompts as PPO does, answer them through the rollout workers' one generation path and score answers
through their one reward-model scoring path.

- prompts are read with :func:`~rlhf_lightning.data.sources.load_records` (bad paths and columns are one error
  line naming ``prompts.*``) and rendered by ``PromptDataModule.encode_row``, the exact code PPO's prompts go
  through (chat template, or ``input_template``; message-list prompts with the chat template);
- answers come from :meth:`GenerationWorker.generate <rlhf_lightning.rollout.workers.GenerationWorker.generate>`
  (greedy when ``temperature`` is 0), decoded as PPO decodes its rollouts;
- reward-model scores come from :meth:`RewardModelWorker.score
  <rlhf_lightning.rollout.workers.RewardModelWorker.score>` (normalised) on sequences tokenized by
  :func:`~rlhf_lightning.data.formatting.encode_prompt_response`, as in PPO's rollouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from rlhf_lightning.errors import DataError
from rlhf_lightning.generation import Sampling  # noqa: F401  (re-exported: evaluate's API)


@dataclass
class PromptSet:
    """A prompt file and how its prompts are rendered (the options of ``PromptDataModule``).

    Args:
        path: jsonl/json/parquet/csv file, directory or hub dataset name.
        prompt_key: prompt column (text, or a list of chat messages).
        label_key: optional column given to reward functions as ``labels`` (e.g. the reference answer).
        input_template: ``"...{}..."`` format instead of the chat template.
        use_chat_template: render text prompts with the tokenizer's chat template (with the generation prompt).
        max_samples: only the first N prompts.
        split: split of a hub dataset.
    """

    path: str = ""
    prompt_key: str = "prompt"
    label_key: str | None = None
    input_template: str | None = None
    use_chat_template: bool = True
    max_samples: int | None = None
    split: str = "train"


def load_prompt_records(prompts: PromptSet) -> list[dict[str, Any]]:
    """The prompt rows, in file order: ``prompt`` (as in the file), ``label`` (text or ``None``), ``source_file``,
    ``source_line``. Missing files and columns raise one error naming the ``prompts.*`` option."""
    from rlhf_lightning.data.sources import load_records, require_columns

    if not prompts.path:
        raise DataError("prompts.path is not set: point it at a prompt file (jsonl with a prompt column).")
    records = load_records(prompts.path, prompts.split, option="prompts.path")
    keys = {"prompts.prompt_key": prompts.prompt_key} | (
        {"prompts.label_key": prompts.label_key} if prompts.label_key else {})
    require_columns(records, keys, prompts.path)
    if prompts.max_samples:
        records = records.select(range(min(prompts.max_samples, len(records))))
    label = prompts.label_key
    return [{"prompt": row[prompts.prompt_key], "label": None if not label or row[label] is None else str(row[label]),
             "source_file": row["source_file"], "source_line": row["source_line"]} for row in records]


def encode_prompts(records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase,
                   prompts: PromptSet) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt as the model is given it, and the prompt text reward functions receive (the prompt
    itself, or the rendered conversation for message lists), exactly as ``PromptDataModule`` encodes them for PPO.
    An empty or non-text prompt is a :class:`DataError` naming its file and line."""
    from rlhf_lightning.data.prompts import PromptDataModule
    from rlhf_lightning.data.sources import where
    from rlhf_lightning.data.transcripts import BadRow

    encoder = PromptDataModule(path=prompts.path, prompt_key="prompt", input_template=prompts.input_template,
                               use_chat_template=prompts.use_chat_template)
    encoder.tokenizer = tokenizer
    ids, texts = [], []
    for record in records:
        try:
            encoded = encoder.encode_row({"prompt": record["prompt"]})
        except BadRow as err:
            raise DataError(f"{where(record['source_file'], record['source_line'])}: {err} "
                            f"(prompts.prompt_key='{prompts.prompt_key}'). Fix or remove the row.") from err
        ids.append(encoded["prompt_ids"])
        texts.append(encoded["prompt_text"])
    return ids, texts


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: Any) -> list[int]:
    """Where an answer ends: the tokenizer's EOS and any end-of-turn ids in the model's generation config."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generate_texts(worker: Any, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]], sampling: Sampling,
                   n: int = 1, batch_size: int = 32, prompt_seeds: list[int] | None = None,
                   desc: str | None = None) -> list[list[str]]:
    """``n`` decoded answers per prompt from a :class:`~rlhf_lightning.rollout.workers.GenerationWorker`, in
    batches of ``batch_size`` prompts (``0``: all at once), with a progress bar titled ``desc``. Sampled answers
    draw from each prompt's own seed in ``prompt_seeds`` (see ``GenerationWorker.generate``), so they do not depend
    on the batch size or on the other prompts."""
    size = batch_size or len(prompt_ids)
    eos = eos_token_ids(tokenizer, worker.model)
    answers: list[list[str]] = []
    with tqdm(total=len(prompt_ids), desc=desc, unit="prompt", disable=desc is None) as progress:
        for start in range(0, len(prompt_ids), size):
            batch = prompt_ids[start:start + size]
            seeds = prompt_seeds[start:start + size] if prompt_seeds is not None else None
            out = worker.generate(batch, n=n, max_new_tokens=sampling.max_new_tokens,
                                  temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                  eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id,
                                  generation_kwargs=sampling.generation_kwargs, prompt_seeds=seeds)
            texts = tokenizer.batch_decode(out["responses"], skip_special_tokens=True)
            answers += [texts[i:i + n] for i in range(0, len(texts), n)]
            progress.update(len(batch))
    return answers


class RewardModelScorer:
    """Normalised reward-model scores of prompt/response pairs, tokenized with the reward model's tokenizer as in
    PPO's rollouts. Each distinct pair is scored once (and remembered), so identical answers of two models get
    identical scores whatever batch they fall in: an exact tie."""

    def __init__(self, path: str, prompts: PromptSet | None = None, device: str | None = None, dtype: str = "float32",
                 batch_size: int | None = 32, normalize: bool = True) -> None:
        from rlhf_lightning.models import load_tokenizer
        from rlhf_lightning.rollout.workers import RewardModelWorker

        self.tokenizer = load_tokenizer(path, option="reward_model")
        self.worker = RewardModelWorker(path, dtype=dtype, device=device)
        self.prompts = prompts or PromptSet()
        self.batch_size, self.normalize = batch_size, normalize
        self.cache: dict[tuple[str, str], float] = {}

    def __call__(self, prompts: list[Any], responses: list[str], desc: str | None = None) -> list[float]:
        from rlhf_lightning.data.collate import pad_sequences
        from rlhf_lightning.data.formatting import encode_prompt_response

        keys = [(json.dumps(p), r) for p, r in zip(prompts, responses, strict=True)]
        todo = {key: (p, r) for key, p, r in zip(keys, prompts, responses, strict=True) if key not in self.cache}
        pending = list(todo.items())
        size = self.batch_size or max(len(pending), 1)
        for start in tqdm(range(0, len(pending), size), desc=desc, unit="batch", disable=desc is None or not pending):
            chunk = pending[start:start + size]
            sequences = [sum(encode_prompt_response(self.tokenizer, p, r, self.prompts.input_template,
                                                    self.prompts.use_chat_template), [])
                         for _, (p, r) in chunk]
            input_ids = pad_sequences(sequences, self.tokenizer.pad_token_id)
            attention_mask = pad_sequences([[1] * len(s) for s in sequences], 0)
            scores = self.worker.score(input_ids, attention_mask, normalize=self.normalize).tolist()
            self.cache.update(zip((key for key, _ in chunk), scores, strict=True))
        return [self.cache[key] for key in keys]
