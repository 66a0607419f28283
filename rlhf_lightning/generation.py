"""The one generation path: sampled or greedy responses of a causal LM to tokenized prompts.

PPO's rollout workers, batch generation (``predict``), ``chat``, ``evaluate`` and the training-time sample
callbacks all call :func:`generate_responses`, so a sampling option means the same thing everywhere.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)


@torch.no_grad()
def generate_responses(model: PreTrainedModel, prompt_ids: list[list[int]], n: int, max_new_tokens: int,
                       temperature: float, top_p: float, top_k: int, eos_token_ids: list[int], pad_token_id: int,
                       generation_kwargs: dict[str, Any] | None = None, seed: int | None = None, streamer: Any = None,
                       prompt_seeds: list[int] | None = None, synced_gpus: bool = False) -> list[list[int]]:
    """``n`` responses per prompt, grouped by prompt; each ends at (and includes) its first EOS token.

    Sampling follows exactly the given options plus ``generation_kwargs`` (any ``GenerationConfig`` field, e.g.
    ``min_new_tokens``): an explicit ``GenerationConfig`` keeps the checkpoint's own ``generation_config.json``
    (repetition penalty, its default temperature...) from silently changing the distribution sampled.

    ``seed`` makes the samples a function of the call alone (the trainer derives it from the run's seed and
    the policy version), so a resumed run samples what the uninterrupted one would have, on any backend; the
    caller's random state is left untouched.

    ``streamer`` (in-process only, e.g. ``transformers.TextIteratorStreamer``) receives tokens as they are
    generated: the chat command prints them as they come, through this same generation path.

    ``prompt_seeds`` (one per prompt, sampling only) makes each prompt's ``n`` samples a function of its own seed
    alone, whatever else is in the batch (see :class:`RowSeededSampler`): batch generation gives the same samples
    resumed, sharded over any number of devices or in any batch size.

    ``synced_gpus`` must be set under ZeRO-3 with several ranks, where every rank has to take part in each step.
    Every generation in the project goes through here: rollouts, batch generation, chat, evaluation."""
    device = next(model.parameters()).device
    row_sampler = None
    if prompt_seeds is not None and temperature > 0:
        row_sampler = RowSeededSampler([s for s in prompt_seeds for _ in range(n)], n, max_new_tokens,
                                       temperature, top_p, top_k, generation_kwargs)
        temperature, generation_kwargs = 0.0, row_sampler.other_kwargs  # it samples; generate() takes its pick
    prompt_ids = [p for p in prompt_ids for _ in range(n)]  # n rows per prompt (greedy allows no n>1)
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):  # left padding for generation
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} \
        if temperature > 0 else {"do_sample": False}
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids, pad_token_id=pad_token_id,
                              **sampling, **(generation_kwargs or {}))
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids.to(device),
                                  attention_mask=attention_mask.to(device), generation_config=config,
                                  streamer=streamer, synced_gpus=synced_gpus, logits_processor=LogitsProcessorList(
                                      [row_sampler] if row_sampler else []))
    responses = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_token_ids), len(row))
        responses.append(row[:end])
    return responses


class RowSeededSampler(LogitsProcessor):
    """Samples every row from its own random stream, so a row's tokens do not depend on the other rows of the batch.

    ``model.generate`` draws one ``torch.multinomial`` for the whole batch, so a prompt's samples change with the
    batch it lands in (resumed runs, other device counts, other batch sizes). This processor runs last in greedy
    mode: it applies the sampling warpers transformers itself would (temperature, top-k, top-p, and ``min_p`` /
    ``typical_p`` from ``generation_kwargs``), draws the token by inverse-CDF sampling with the row's own uniform
    for this step (pre-drawn from a generator seeded with :func:`row_seed`), and leaves only that token finite,
    which greedy decoding then takes. The distribution sampled is the one ``do_sample=True`` samples.

    ``row_seeds`` has one seed per row: rows ``i*n .. i*n+n-1`` are the ``n`` samples of prompt ``i``."""

    def __init__(self, row_seeds: list[int], n: int, max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, generation_kwargs: dict[str, Any] | None = None) -> None:
        kwargs = dict(generation_kwargs or {})
        warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        warpers += [TopKLogitsWarper(top_k)] if top_k else []
        warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        if kwargs.get("min_p") is not None:
            warpers.append(MinPLogitsWarper(kwargs.pop("min_p")))
        if kwargs.get("typical_p") is not None and kwargs["typical_p"] < 1.0:
            warpers.append(TypicalLogitsWarper(kwargs.pop("typical_p")))
        self.warpers, self.other_kwargs = LogitsProcessorList(warpers), kwargs
        self.uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(
            row_seed(seed, i % n))) for i, seed in enumerate(row_seeds)])  # (rows, steps)
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        probs = self.warpers(input_ids, scores.float()).softmax(-1)
        cdf = probs.cumsum(-1)
        u = self.uniforms[:, step].to(cdf.device)[:, None] * cdf[:, -1:]
        picked = torch.searchsorted(cdf, u, right=True).clamp(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter(-1, picked, 0.0)


def row_seed(prompt_seed: int, sample: int) -> int:
    """The seed of the ``sample``-th response to a prompt seeded ``prompt_seed`` (distinct for every pair)."""
    return (prompt_seed * 1_000_003 + sample) % (2**63)
