"""Prompt extraction for preference data without a prompt column (Anthropic HH layout, full chats).

Anthropic's HH-RLHF and many datasets derived from it store each pair as two whole conversations::

    {"chosen":   "\\n\\nHuman: What is 1 + 2?\\n\\nAssistant: 3",
     "rejected": "\\n\\nHuman: What is 1 + 2?\\n\\nAssistant: no idea"}

or as two lists of chat messages that differ only in the last answer. The prompt is what both share, as TRL's
``extract_prompt`` does: for message lists the common leading messages; for strings the longest common prefix,
cut back to just after the last assistant marker (``"\\n\\nAssistant:"``) inside it so a response that starts with
the same words in both ("I think ...") keeps them. Without a marker in the shared prefix the common prefix itself is
the prompt (minus a trailing space, as TRL does). A single unpaired transcript (KTO) is split after its last marker.

String transcripts are *already formatted* text: they are tokenized as they are (BOS + transcript + EOS), never
wrapped in the tokenizer's chat template, because wrapping a whole HH transcript as one "user" message would
train the model on a conversation inside a conversation — and a TRL user training on HH strings gets the raw text
too. Message lists are rendered with the chat template as usual.
"""

from __future__ import annotations

import os
from typing import Any

Message = dict[str, Any]
ASSISTANT_MARKER = "\n\nAssistant:"


class BadRow(ValueError):
    """A record that cannot be used; the message says why."""


def shared_prefix_prompt(chosen: str, rejected: str, marker: str = ASSISTANT_MARKER) -> tuple[str, str, str]:
    """``(prompt, chosen response, rejected response)`` of two string transcripts that share their prompt."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(marker)
    if cut >= 0:
        end = cut + len(marker)
    else:
        end = len(common) - 1 if common.endswith(" ") else len(common)
    if end == 0:
        raise BadRow("chosen and rejected share no prompt (no common prefix and no prompt column)")
    if end == len(chosen) or end == len(rejected):
        raise BadRow("one response is empty once the shared prompt is removed")
    return chosen[:end], chosen[end:], rejected[end:]


def shared_leading_messages(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], Message,
                                                                                        Message]:
    """``(prompt messages, chosen answer, rejected answer)`` of two chats that differ only in the last answer."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise BadRow("chosen is identical to rejected")
    tails = chosen[shared:], rejected[shared:]
    if any(len(tail) != 1 or tail[0].get("role") != "assistant" for tail in tails):
        raise BadRow("chosen and rejected chats must share every message but a last assistant message")
    if shared == 0:
        raise BadRow("chosen and rejected chats share no prompt message")
    return chosen[:shared], tails[0][0], tails[1][0]


def split_transcript(transcript: str, marker: str = ASSISTANT_MARKER) -> tuple[str, str]:
    """``(prompt, response)`` of one HH transcript: split just after its last assistant marker."""
    cut = transcript.rfind(marker)
    if cut < 0:
        raise BadRow(f"no prompt column and no {marker!r} turn in the transcript to split it at")
    end = cut + len(marker)
    if not transcript[end:].strip():
        raise BadRow("the transcript's last assistant turn is empty")
    return transcript[:end], transcript[end:]


def split_chat(chat: list[Message]) -> tuple[list[Message], str]:
    """``(prompt messages, answer)`` of one chat whose last message is the assistant's answer."""
    if len(chat) < 2 or chat[-1].get("role") != "assistant":
        raise BadRow("a chat completion must be a prompt followed by a last assistant message")
    return chat[:-1], chat[-1]["content"]
