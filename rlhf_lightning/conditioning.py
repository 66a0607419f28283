"""Reward conditions for reward-conditioned SFT (Decision-Transformer alignment): scores -> levels -> prompt prefixes.

"Aligning Language Models with Offline Learning from Human Feedback" (Hu et al., arXiv 2308.12050) trains on
responses annotated with their reward, the reward written into the prompt, and asks for a high reward at inference
(the Decision Transformer's return-to-go); SteerLM (arXiv 2310.05344) does the same with attribute values. Here:

1. **Normalise** each score ``s`` against the training scores ``x_1..x_N`` to ``u`` in [0, 1]:
   ``rank``:   u = (#{x_i < s} + ½·#{x_i = s}) / N   (the mid-rank percentile: tied scores share one value);
   ``zscore``: u = Φ((s − μ) / σ)   (μ, σ the mean and population std of the training scores, Φ the normal CDF).
2. **Quantise** into ``L`` levels: level = min(⌊u·L⌋, L − 1) + 1, so levels run 1 (worst) .. L (best).
   Both are *equal-frequency* buckets (exactly for ``rank``, for normally distributed scores with ``zscore``):
   every condition is learned from about N/L samples, and the top one, the condition used at inference, stands
   for "the best 1/L of what the model produced", not for a handful of outliers, as equal-width buckets on raw or
   z-scores would make it. Ties never straddle a boundary, so discrete scores (a 0/1 rule) leave some levels
   empty: e.g. 30% zeros and 70% ones give levels 1 and 4 of 5.
3. **Render** a level as text, prepended to every user message: a prefix (``"<quality: {level}/{levels}> "``,
   configurable) or one special token per level (``"<|reward_{level}|>"``, added to the tokenizer).

**Which condition inference uses**: the *best condition* is the highest level that occurs in the training data
(L for continuous scores). :func:`conditioned_chat_template` wraps the tokenizer's chat template so that every user
message which does not already start with a condition gets the best one prepended; an exported model thus
generates at its best condition on every path that renders prompts with its chat template (batch generation,
chat, evaluation, PPO) without code changes. ``apply_chat_template(..., condition=1)`` (a level) or
``condition="<quality: 1/5> "`` (a rendered condition) picks another one, ``condition=""`` none; a user message
that starts with a condition keeps it.

Prefix or special tokens: a text prefix needs no vocabulary change; a new token per level is learned faster by a
small model (the tiny demo picks up ``<|reward_k|>`` in 3 epochs but a one-digit difference inside the 12-token
``"<quality: k/5> "`` only after about 10: see ``configs/tiny/conditional_sft.yaml``).

Everything here is pure (no files, no models) except :func:`prepare_tokenizer`, which edits a tokenizer in place.
"""

from __future__ import annotations

import bisect
import json
import math
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Normalize = Literal["rank", "zscore"]
Style = Literal["prefix", "special_tokens"]
DEFAULT_TEMPLATES: dict[str, str] = {"prefix": "<quality: {level}/{levels}> ", "special_tokens": "<|reward_{level}|>"}
# A chat template for tokenizers without one: the same text as plain prompt + response concatenation.
PLAIN_CHAT_TEMPLATE = ("{{ bos_token or '' }}{% for message in messages %}{{ message['content'] }}"
                       "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")


def mid_rank_percentile(score: float, reference: Sequence[float]) -> float:
    """(#{x < s} + ½·#{x = s}) / N over the *sorted* ``reference`` scores (tied scores share one value)."""
    below, through = bisect.bisect_left(reference, score), bisect.bisect_right(reference, score)
    return (below + 0.5 * (through - below)) / len(reference)


def normal_cdf(z: float) -> float:
    """Φ(z) = ½·(1 + erf(z / √2))."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def quantize(u: float, levels: int) -> int:
    """Level 1..``levels`` of a normalised score ``u`` in [0, 1]: min(⌊u·L⌋, L − 1) + 1 (equal-width in ``u``)."""
    return min(int(math.floor(u * levels)), levels - 1) + 1


@dataclass(frozen=True)
class ScoreQuantizer:
    """Scores -> levels with statistics fitted once on the training scores (:meth:`fit`)."""

    normalize: Normalize
    levels: int
    mean: float
    std: float
    reference: tuple[float, ...] = field(repr=False)  # the sorted training scores (``rank``)

    @classmethod
    def fit(cls, scores: Sequence[float], normalize: Normalize = "rank", levels: int = 5) -> ScoreQuantizer:
        """Fit on the training scores. ``ValueError`` for fewer than 2 levels, an unknown method, a non-finite score
        or scores that are all equal (nothing to condition on)."""
        if levels < 2:
            raise ValueError(f"levels={levels} must be at least 2")
        if normalize not in ("rank", "zscore"):
            raise ValueError(f"normalize='{normalize}' must be 'rank' or 'zscore'")
        values = [float(s) for s in scores]
        bad = [i for i, s in enumerate(values) if not math.isfinite(s)]
        if bad:
            raise ValueError(f"score {values[bad[0]]} at position {bad[0]} is not a finite number")
        if not values or min(values) == max(values):
            raise ValueError(f"all {len(values)} scores are equal ({values[0] if values else 'none'}): there is "
                             f"nothing to condition on")
        mean = sum(values) / len(values)
        std = math.sqrt(sum((s - mean) ** 2 for s in values) / len(values))
        return cls(normalize, levels, mean, std, tuple(sorted(values)))

    def normalized(self, score: float) -> float:
        """``u`` in [0, 1] (see the module docstring)."""
        if self.normalize == "rank":
            return mid_rank_percentile(score, self.reference)
        return normal_cdf((score - self.mean) / self.std)

    def level(self, score: float) -> int:
        """Level 1..``levels`` of a score."""
        return quantize(self.normalized(score), self.levels)

    def level_counts(self) -> list[int]:
        """How many training scores fall in each level (index 0 = level 1)."""
        counts = [0] * self.levels
        for score in self.reference:
            counts[self.level(score) - 1] += 1
        return counts

    def level_ranges(self) -> list[list[float] | None]:
        """[lowest, highest] training score of each level, ``None`` for an empty level."""
        ranges: list[list[float] | None] = [None] * self.levels
        for score in self.reference:  # sorted, so the first score seen is the lowest
            k = self.level(score) - 1
            ranges[k] = [ranges[k][0], score] if ranges[k] else [score, score]
        return ranges


def check_template(template: str, levels: int) -> list[str]:
    """The rendered condition of each level (index 0 = level 1) from ``template`` (fields ``{level}``,
    ``{levels}``); ``ValueError`` unless it has ``{level}`` and renders ``levels`` distinct non-blank strings."""
    if "level" not in {field for _, field, _, _ in string.Formatter().parse(template)}:
        raise ValueError(f"condition template {template!r} must contain '{{level}}'")
    try:
        rendered = [template.format(level=k, levels=levels) for k in range(1, levels + 1)]
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"condition template {template!r} may use only {{level}} and {{levels}} ({err})") from err
    if len({c.strip() for c in rendered}) != levels or not all(c.strip() for c in rendered):
        raise ValueError(f"condition template {template!r} must render {levels} different non-blank conditions")
    return rendered


def render_conditions(levels: int, style: Style = "prefix", template: str | None = None) -> list[str]:
    """Every level's condition text (index 0 = level 1); ``template`` defaults to the style's
    (:data:`DEFAULT_TEMPLATES`). With ``special_tokens`` each condition is one token to add to the tokenizer."""
    if style not in DEFAULT_TEMPLATES:
        raise ValueError(f"condition style '{style}' must be one of {sorted(DEFAULT_TEMPLATES)}")
    return check_template(template or DEFAULT_TEMPLATES[style], levels)


def with_condition(content: str, condition: str) -> str:
    """A user message prefixed with ``condition`` (how training data and the exported template both render it)."""
    return condition + content


@dataclass(frozen=True)
class ConditionSettings:
    """What an export stores about its conditions (``reward_condition.json`` and ``config.reward_condition``)."""

    normalize: Normalize
    levels: int
    style: Style
    template: str
    conditions: list[str]
    best_level: int
    best_condition: str
    worst_level: int
    worst_condition: str
    stats: dict[str, float]
    level_counts: list[int]
    level_ranges: list[list[float] | None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConditionSettings:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


def condition_settings(quantizer: ScoreQuantizer, style: Style = "prefix",
                       template: str | None = None) -> ConditionSettings:
    """The settings of a fitted quantizer: best (worst) condition = highest (lowest) level present in training."""
    conditions = render_conditions(quantizer.levels, style, template)
    counts = quantizer.level_counts()
    present = [k + 1 for k, n in enumerate(counts) if n]
    scores = quantizer.reference
    stats = {"count": len(scores), "mean": quantizer.mean, "std": quantizer.std, "min": scores[0], "max": scores[-1]}
    return ConditionSettings(quantizer.normalize, quantizer.levels, style, template or DEFAULT_TEMPLATES[style],
                             conditions, present[-1], conditions[present[-1] - 1], present[0],
                             conditions[present[0] - 1], stats, counts, quantizer.level_ranges())


WRAPPER_START, WRAPPER_END = "{%- set reward_conditions = ", "{%- set messages = reward_ns.messages %}"
_WRAPPER = WRAPPER_START + """CONDITIONS -%}
{%- if condition is not defined or condition is none -%}{%- set condition = DEFAULT -%}
{%- elif condition is number -%}{%- set condition = reward_conditions[condition - 1] -%}{%- endif -%}
{%- set reward_ns = namespace(messages=[]) -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' and message['content'] is string and condition -%}
{%- set reward_found = namespace(any=false) -%}
{%- for c in reward_conditions -%}
{%- if message['content'].startswith(c | trim) -%}{%- set reward_found.any = true -%}{%- endif -%}
{%- endfor -%}
{%- if not reward_found.any -%}{%- set message = dict(message, content=condition ~ message['content']) -%}{%- endif -%}
{%- endif -%}
{%- set reward_ns.messages = reward_ns.messages + [message] -%}
{%- endfor -%}
""" + WRAPPER_END


def base_chat_template(template: str | None) -> str | None:
    """``template`` without the condition wrapper of :func:`conditioned_chat_template` (unchanged if it has none)."""
    if template and template.startswith(WRAPPER_START) and WRAPPER_END in template:
        return template.split(WRAPPER_END, 1)[1]
    return template


def conditioned_chat_template(base: str | dict[str, str] | None, conditions: list[str], default: str) -> str | dict:
    """``base`` (a chat template, a dict of named ones, or ``None``: :data:`PLAIN_CHAT_TEMPLATE`) with a Jinja prefix
    that prepends ``default`` to every user message not already starting with one of ``conditions`` (compared
    without surrounding blanks). The template variable ``condition`` overrides ``default``: a level number
    (1..L), a condition string, or ``""`` for none. An already wrapped template is unwrapped first."""
    if isinstance(base, dict):
        return {name: conditioned_chat_template(text, conditions, default) for name, text in base.items()}
    prefix = _WRAPPER.replace("CONDITIONS", json.dumps(conditions)).replace("DEFAULT", json.dumps(default))
    return prefix + (base_chat_template(base) or PLAIN_CHAT_TEMPLATE)


def prepare_tokenizer(tokenizer: Any, settings: ConditionSettings) -> int:
    """Give ``tokenizer`` (a ``transformers`` tokenizer) the conditions, in place and idempotently: the special
    tokens (``special_tokens`` style) and the condition-applying chat template around its own one (the plain
    template when it has none). Returns the number of tokens added (the model must resize its embeddings)."""
    added = tokenizer.add_tokens(settings.conditions, special_tokens=True) if settings.style == "special_tokens" else 0
    tokenizer.chat_template = conditioned_chat_template(tokenizer.chat_template, settings.conditions,
                                                        settings.best_condition)
    return added
