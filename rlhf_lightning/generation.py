"""The one generation path: sampled or greedy responses of a causal LM to tokenized prompts.

PPO's rollout workers, batch generation (``predict``), ``chat``, ``evaluate`` and the training-time sample
callbacks all call :func:`generate_responses`, so a sampling option means the same thing everywhere.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from rlhf_lightning.data.collate import IGNORE_INDEX, pad_sequences
from rlhf_lightning.logprobs import label_log_probs


@dataclass
class Sampling:
    """The sampling options of :func:`generate_responses`, as one value (``evaluate``'s ``generation``, chat's reply
    options): ``temperature`` 0 is greedy; ``generation_kwargs`` are extra ``GenerationConfig`` fields (e.g.
    ``repetition_penalty``)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generation_kwargs: dict[str, Any] | None = None

def generate_responses(model: PreTrainedModel, prompt_ids: list[list[int]], n: int, max_new_tokens: int,
                       temperature: float, top_p: float, top_k: int, eos_token_ids: list[int], pad_token_id: int,
                       generation_kwargs: dict[str, Any] | None = None, seed: int | None = None, streamer: Any = None,
                       prompt_seeds: list[int] | None = None, synced_gpus: bool = False) -> list[list[int]]:
    """``n`` responses per prompt, grouped by prompt (:func:`sample_responses` without the log-probs)."""
    return sample_responses(model, prompt_ids, n, max_new_tokens, temperature, top_p, top_k, eos_token_ids,
                            pad_token_id, generation_kwargs, seed, streamer, prompt_seeds, synced_gpus)[0]


@torch.no_grad()
def sample_responses(model: PreTrainedModel, prompt_ids: list[list[int]], n: int, max_new_tokens: int,
                     temperature: float, top_p: float, top_k: int, eos_token_ids: list[int], pad_token_id: int,
                     generation_kwargs: dict[str, Any] | None = None, seed: int | None = None, streamer: Any = None,
                     prompt_seeds: list[int] | None = None, synced_gpus: bool = False,
                     with_log_probs: bool = False) -> tuple[list[list[int]], list[list[float]] | None]:
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
    alone, whatever else is in the batch (:func:`row_uniforms`): batch generation gives the same samples resumed,
    sharded over any number of devices or in any batch size.

    ``synced_gpus`` must be set under ZeRO-3 with several ranks, where every rank has to take part in each step.
    Every generation in the project goes through here: rollouts, batch generation, chat, evaluation.

    Sampling draws each token by inverse-CDF (:class:`InverseCdfSampler`) instead of ``generate``'s
    ``torch.multinomial``: the same distribution, and on a CPU 1.16x the decode tokens/s of SmolLM2-135M at 16 rows
    (``multinomial`` draws one exponential variate per vocabulary entry per row: 13 ms of a 100 ms step).

    Speed: the ``n`` rows of a prompt share one prefill (:func:`shared_prefill`; 1.8x the tokens/s of a plain
    ``generate`` loop at n=4 on a 26M model, see ``benchmarks/bench_generate.py``). Measured and not kept, on CPU
    (``benchmarks/bench_decode.py``): a static KV cache (the same speed as the dynamic one), the same compiled with
    inductor (~3 minutes to compile for 135M parameters, then slower), transformers' continuous batching (0.44x the
    tokens/s, and a 14 GB paged cache). Not done: dropping finished rows needs a decode loop of our own
    (``generate`` keeps decoding them); on SmolLM2-135M a step of 4 rows costs ~0.65x one of 16 rows (every weight
    is read once per step whatever the rows), so it pays only where response lengths vary widely.

    ``with_log_probs``: also return the sampler's log-prob of each response token, ``log softmax(logits / T)`` at
    the sampling temperature (greedy: T = 1) before top-k/top-p truncation, the quantity the trainer computes for
    the same tokens. Asynchronous rollouts weight the update by the ratio of the two (truncated importance
    sampling). The sampler records them as it draws (one log-softmax per step); other decoding modes (beams,
    ``generate``'s own sampling) get them from one forward pass over the finished sequences."""
    device = next(model.parameters()).device
    kwargs = dict(generation_kwargs or {})
    own_sampler = temperature > 0 and InverseCdfSampler.handles(kwargs)
    prompt_ids = [p for p in prompt_ids for _ in range(n)]  # n rows per prompt (greedy allows no n>1)
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):  # left padding for generation
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} \
        if temperature > 0 and not own_sampler else {"do_sample": False}
    sampler_kwargs = {key: kwargs.pop(key) for key in InverseCdfSampler.WARPER_KEYS if key in kwargs} \
        if own_sampler else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids, pad_token_id=pad_token_id,
                              **sampling, **kwargs)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    shared = shared_prefill(model, input_ids, attention_mask, n) if can_share_prefill(n, width, config) else {}
    processors = []
    if own_sampler:  # greedy decoding takes the token it draws; the global RNG is not touched (thread-safe)
        if prompt_seeds is not None:
            uniforms = row_uniforms([s for s in prompt_seeds for _ in range(n)], n, max_new_tokens)
        else:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            uniforms = torch.rand(len(prompt_ids), max_new_tokens, generator=generator)
        processors.append(InverseCdfSampler(uniforms, temperature, top_p, top_k, sampler_kwargs, device,
                                            record_log_probs=with_log_probs))
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type, enabled=seed is not None and not own_sampler):
        if seed is not None and not own_sampler:  # generate's own sampling draws from the global RNG
            torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                             streamer=streamer, synced_gpus=synced_gpus, **shared,
                             logits_processor=LogitsProcessorList(processors))
    responses = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_token_ids), len(row))
        responses.append(row[:end])
    if not with_log_probs:
        return responses, None
    if own_sampler:
        recorded = torch.stack(processors[0].log_probs, dim=1).cpu().tolist()  # (rows, steps)
        return responses, [steps[:len(r)] for steps, r in zip(recorded, responses, strict=True)]
    return responses, response_log_probs(model, prompt_ids, responses, temperature if temperature > 0 else 1.0)


@torch.no_grad()
def response_log_probs(model: PreTrainedModel, prompt_ids: list[list[int]], responses: list[list[int]],
                       temperature: float) -> list[list[float]]:
    """Log-prob of each response token given its prompt (one per row), from one forward pass of ``model``."""
    device = next(model.parameters()).device
    rows = list(zip(prompt_ids, responses, strict=True))
    batch = {"input_ids": pad_sequences([p + r for p, r in rows], 0),
             "attention_mask": pad_sequences([[1] * (len(p) + len(r)) for p, r in rows], 0),
             "labels": pad_sequences([[IGNORE_INDEX] * len(p) + r for p, r in rows], IGNORE_INDEX)}
    log_probs = label_log_probs(model, {k: v.to(device) for k, v in batch.items()}, temperature).float().cpu()
    return [log_probs[row, len(p) - 1:len(p) - 1 + len(r)].tolist() for row, (p, r) in enumerate(rows)]


def can_share_prefill(n: int, width: int, config: GenerationConfig) -> bool:
    """Whether the ``n`` rows of a prompt can share one prefill: several samples, a prompt longer than one token, and
    plain (not beam, not assisted) decoding with the default dynamic cache, whose rows can be repeated."""
    return (n > 1 and width > 1 and (config.num_beams or 1) == 1 and config.cache_implementation is None
            and config.prompt_lookup_num_tokens is None)


def shared_prefill(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   n: int) -> dict[str, Any]:
    """The KV cache of every prompt but its last token, computed once per prompt and repeated for its ``n`` rows.

    ``model.generate`` would run the prompt through the model once per sample (``num_return_sequences`` does the
    same): with n samples of a 50-token prompt and 32 new tokens, that prefill is over half of all the compute. Here
    the distinct prompts (rows ``0, n, 2n...``) go through the model once, the cache is repeated ``n`` times, and
    ``generate`` continues from it (it processes only the uncached last token, with the position ids it derives from
    the same attention mask): the same computation, so the same distribution and the same greedy tokens. Returns the
    keyword argument that hands the cache to ``generate`` (``cache``, or ``past_key_values`` before transformers 5.2x).
    """
    unique, mask = input_ids[::n, :-1], attention_mask[::n, :-1]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # what generate derives from the mask (pads: 0)
    kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=unique, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    key = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
    cache = out[key]
    cache.batch_repeat_interleave(n)
    return {key: cache}


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model (under any peft wrapper) computes logits for the last positions only when asked."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


class InverseCdfSampler(LogitsProcessor):
    """Samples the next token of every row by inverse-CDF with a uniform drawn in advance, in greedy mode.

    It runs last among ``generate``'s logits processors (so repetition penalties and the like have applied), applies
    the sampling warpers transformers itself would (temperature, top-k, top-p, and ``min_p`` / ``typical_p`` /
    ``epsilon_cutoff`` / ``eta_cutoff`` from ``generation_kwargs``, in transformers' order), picks the token where the
    row's uniform for this step falls in the cumulative distribution, and leaves only that token finite, which greedy
    decoding then takes. The distribution sampled is the one ``do_sample=True`` samples.

    Why not ``generate``'s own sampling: ``torch.multinomial`` draws an exponential variate for every vocabulary
    entry of every row at every step (on a CPU, 13 ms of SmolLM2-135M's 100 ms decode step at 16 rows), where this
    needs one uniform per row; and pre-drawn uniforms can come from a seed per row (:func:`row_uniforms`), so that a
    row's tokens do not depend on the other rows of its batch.

    ``uniforms`` is (rows, max_new_tokens): rows ``i*n .. i*n+n-1`` are the ``n`` samples of prompt ``i``.
    ``record_log_probs``: keep each step's log-prob of the picked tokens at the temperature, untruncated
    (``log_probs``, one (rows,) tensor per step)."""

    WARPER_KEYS = ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")

    def __init__(self, uniforms: torch.Tensor, temperature: float, top_p: float, top_k: int,
                 warper_kwargs: dict[str, Any] | None = None, device: torch.device | str = "cpu",
                 record_log_probs: bool = False) -> None:
        kwargs = warper_kwargs or {}
        warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        warpers += [TopKLogitsWarper(top_k)] if top_k else []
        warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        if kwargs.get("min_p") is not None:
            warpers.append(MinPLogitsWarper(kwargs["min_p"]))
        if kwargs.get("typical_p") is not None and kwargs["typical_p"] < 1.0:
            warpers.append(TypicalLogitsWarper(kwargs["typical_p"]))
        if kwargs.get("epsilon_cutoff") is not None and 0.0 < kwargs["epsilon_cutoff"] < 1.0:
            warpers.append(EpsilonLogitsWarper(kwargs["epsilon_cutoff"]))
        if kwargs.get("eta_cutoff") is not None and 0.0 < kwargs["eta_cutoff"] < 1.0:
            warpers.append(EtaLogitsWarper(kwargs["eta_cutoff"], device=device))  # the scores' device
        self.warpers, self.uniforms = LogitsProcessorList(warpers), uniforms
        self.start: int | None = None
        self.temperature = temperature
        self.log_probs: list[torch.Tensor] | None = [] if record_log_probs else None  # (rows,) per step

    @staticmethod
    def handles(generation_kwargs: dict[str, Any]) -> bool:
        """Whether these ``GenerationConfig`` fields ask for plain sampling, which this sampler does; beam search
        and contrastive search or ``top_h`` go through ``generate``'s own sampling."""
        beams = (generation_kwargs.get("num_beams") or 1) > 1
        return not beams and all(generation_kwargs.get(key) is None for key in ("top_h", "penalty_alpha"))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        probs = self.warpers(input_ids, scores.float()).softmax(-1)
        cdf = probs.cumsum(-1)
        u = self.uniforms[:, step].to(cdf.device)[:, None] * cdf[:, -1:]
        picked = torch.searchsorted(cdf, u, right=True).clamp(max=scores.shape[-1] - 1)
        if self.log_probs is not None:
            untruncated = torch.log_softmax(scores.float() / self.temperature, dim=-1)
            self.log_probs.append(untruncated.gather(-1, picked).squeeze(-1))
        return torch.full_like(scores, float("-inf")).scatter(-1, picked, 0.0)


def row_uniforms(row_seeds: list[int], n: int, max_new_tokens: int) -> torch.Tensor:
    """(rows, max_new_tokens) uniforms, row ``i`` from a generator seeded with :func:`row_seed` of its prompt's seed
    and its sample index ``i % n``: a row's draws depend on its own seed alone."""
    return torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(row_seed(seed, i % n)))
                        for i, seed in enumerate(row_seeds)])


def row_seed(prompt_seed: int, sample: int) -> int:
    """The seed of the ``sample``-th response to a prompt seeded ``prompt_seed`` (distinct for every pair)."""
    return (prompt_seed * 1_000_003 + sample) % (2**63)
