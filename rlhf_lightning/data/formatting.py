"""Turn prompts, responses and chats into token ids with a response-only loss mask.

A sample is rendered to text first (chat template, ``input_template`` or plain concatenation) together with
the character spans that belong to the model's answers; one tokenizer call with offsets then marks every token
that starts inside an answer span. This works with any chat template (no ``{% generation %}`` tags needed)
and trains on *every* assistant turn of a multi-turn chat, including each turn's end-of-turn token.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf_lightning.data.collate import IGNORE_INDEX

Span = tuple[int, int]


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> tuple[str, list[Span]]:
    """Render ``messages`` with the tokenizer's chat template; return the text and each assistant turn's span.

    An assistant turn's span runs from the end of the conversation rendered up to it (with the generation
    prompt) to the end of the conversation rendered through it.
    """
    if not tokenizer.chat_template:
        raise ValueError("Chat-formatted data needs a tokenizer with a chat template; this tokenizer has none. "
                         "Use input/output keys with data.init_args.input_template instead.")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        prefix = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(prefix) or start > len(prefix):
            raise ValueError("The chat template renders a conversation's prefix differently from the whole "
                             "conversation, so assistant turns cannot be located. Use input_template instead.")
        spans.append((start, len(prefix)))
    return text, spans


def render_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, input_template: str | None = None,
    use_chat_template: bool = True,
) -> tuple[str, list[Span]]:
    """Render one prompt/response pair; the span covers the response (and the end-of-sequence marker)."""
    if input_template is None and use_chat_template and tokenizer.chat_template:
        return render_chat(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    prefix = input_template.format(prompt) if input_template else prompt
    text = prefix + response + (tokenizer.eos_token or "")
    return text, [(len(prefix), len(text))]


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, input_template: str | None = None,
                  use_chat_template: bool = True) -> str:
    """The text a model is given to generate a response: the same formatting as :func:`render_prompt_response`."""
    if input_template is None and use_chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return input_template.format(prompt) if input_template else prompt


def tokenize_with_spans(tokenizer: PreTrainedTokenizerBase, text: str, spans: list[Span],
                        chat_formatted: bool) -> dict[str, list[int]]:
    """Tokenize ``text``; ``labels`` equal ``input_ids`` on tokens starting inside a span, ``-100`` elsewhere.

    Chat-template text already holds its special tokens (BOS etc.), so those are not added a second time.
    """
    if not tokenizer.is_fast:
        raise ValueError("Response-only loss masking needs a fast tokenizer (offset mapping); "
                         f"{type(tokenizer).__name__} is a slow one.")
    enc = tokenizer(text, add_special_tokens=not chat_formatted, return_offsets_mapping=True)
    labels = []
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        in_span = end > start and any(lo <= start < hi for lo, hi in spans)
        labels.append(token_id if in_span else IGNORE_INDEX)
    return {"input_ids": list(enc["input_ids"]), "labels": labels}


def truncate(sample: dict[str, list[int]], max_len: int) -> tuple[dict[str, list[int]], bool]:
    """Cut a sample to ``max_len`` tokens from the right; return it and whether anything was cut."""
    if len(sample["input_ids"]) <= max_len:
        return sample, False
    return {key: value[:max_len] for key, value in sample.items()}, True


def encode_prompt_response(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, Any]], response: str,
                           input_template: str | None = None,
                           use_chat_template: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of its response (which ends with the EOS / end-of-turn token).

    ``prompt`` is a string or a list of chat messages (multi-turn context). The pair is rendered and tokenized
    as one text, then split where the response starts, so ``prompt_ids + response_ids`` is exactly the
    tokenization a model sees, and different responses to one prompt share the same ``prompt_ids``.
    """
    if isinstance(prompt, list):
        text, spans = render_chat(tokenizer, [*prompt, {"role": "assistant", "content": response}])
        chat = True
    else:
        text, spans = render_prompt_response(tokenizer, prompt, response, input_template, use_chat_template)
        chat = input_template is None and use_chat_template and bool(tokenizer.chat_template)
    start = spans[-1][0]
    enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    split = next((i for i, (lo, hi) in enumerate(enc["offset_mapping"]) if hi > lo and lo >= start), len(ids))
    return ids[:split], ids[split:]


def fit_prompt(prompt_ids: list[int], response_ids: list[list[int]], max_len: int) -> list[int] | None:
    """Left-truncate the prompt so ``prompt + response`` fits ``max_len`` for every response; responses are never
    cut. Returns the (possibly shorter) prompt, or ``None`` when a response alone leaves no room for any prompt."""
    room = max_len - max(len(r) for r in response_ids)
    if room < 1:
        return None
    return prompt_ids[-room:] if len(prompt_ids) > room else prompt_ids
