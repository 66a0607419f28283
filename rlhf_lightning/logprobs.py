"""Model forward passes for training losses: padded or packed batches, log-probs of the response tokens only.

A batch is either padded (``input_ids``, ``attention_mask``, ``labels``, all (B, T)) or packed (one row with
``position_ids`` and ``segment_ids``, see :mod:`rlhf_lightning.data.packing`); :func:`forward_inputs` gives the
model the right arguments for both, and the per-sample reductions here return one value per padded row or per
packed segment, so losses are written once.

Log-probs only where needed (:func:`label_log_probs`): the backbone runs once, the LM head is applied to the
labelled positions only (the response; prompt positions never reach the head) and in chunks with
:func:`~rlhf_lightning.losses.selective_log_probs`, so the (tokens × vocabulary) logits never exist in full. Models
whose logits are more than ``lm_head(hidden)`` (logit soft-capping or scaling in the config) and heads that cannot be
found fall back to the full forward pass.

    from rlhf_lightning.logprobs import sequence_logps
    sums = sequence_logps(model, batch)["sum"]  # (rows or segments,)
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf_lightning.losses import (
    IGNORE_INDEX,
    entropy_from_logits,
    segment_sums,
    selective_log_probs,
    selective_log_probs_and_entropy,
    shift_labels,
    token_log_probs,
)

LOGPROB_CHUNK_SIZE = 1024  # response tokens per LM-head chunk: 1024 × 49k vocab × 4 B ≈ 200 MB of logits
# Config keys under which a model's logits are not plain ``lm_head(hidden)`` (Gemma 2/3, Cohere, Granite...)
LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    """Whether ``batch`` is a packed row (it has ``segment_ids``) rather than padded rows."""
    return "segment_ids" in batch


def forward_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool | None]:
    """Keyword arguments of the model's forward pass for a padded or packed batch.

    Always ``use_cache=False``: a loss or scoring forward needs no KV cache, and building one costs a copy of every
    layer's keys and values plus, per layer, a host-to-device tensor that stalls a GPU's queue (transformers'
    ``DynamicCache`` initialisation; with it SFT ran at 0.82x TRL's speed on an H200).

    Packed rows go without an attention mask and with ``use_cache=False``: transformers then builds the
    block-diagonal causal mask from the restarting ``position_ids`` (flash-attention: varlen from the same
    ``position_ids``); with a cache object it skips that detection and samples would attend to each other."""
    if is_packed(batch):
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None,
                "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real (non-padding) tokens in the batch, for throughput logging."""
    if is_packed(batch):
        return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
    return batch["attention_mask"].sum()


def num_sequences(batch: dict[str, torch.Tensor]) -> int:
    """Sequences in the batch: padded rows, or packed segments."""
    return int(batch["segment_ids"].max()) + 1 if is_packed(batch) else batch["input_ids"].shape[0]


def segment_last_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Flat index of each packed segment's last token: (1, N) segment ids -> (S,)."""
    ids = segment_ids.reshape(-1)
    is_last = torch.ones_like(ids, dtype=torch.bool)
    is_last[:-1] = ids[1:] != ids[:-1]
    return is_last.nonzero().squeeze(-1)


def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(backbone, lm_head)`` of a causal LM (a peft model is unwrapped; its adapters stay active), or ``None``
    when the logits are not ``lm_head(backbone(...).last_hidden_state)``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORM_KEYS):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = getattr(base, getattr(base, "base_model_prefix", "") or "", None)
    if not isinstance(head, nn.Module) or not isinstance(backbone, nn.Module) or backbone is base:
        return None
    return backbone, head


def label_log_probs(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                    chunk_size: int = LOGPROB_CHUNK_SIZE) -> torch.Tensor:
    """Log-prob of each next-token label (B, T) (0 where there is none), like
    :func:`~rlhf_lightning.losses.token_log_probs` on the full logits, but with the LM head applied to the labelled
    positions only, chunk by chunk (module docstring)."""
    labels = shift_labels(batch["labels"])
    parts = lm_parts(model)
    if parts is None:
        return token_log_probs(model(**forward_inputs(batch)).logits, labels, temperature)
    backbone, head = parts
    hidden = backbone(**forward_inputs(batch)).last_hidden_state
    mask = labels != IGNORE_INDEX
    picked = selective_log_probs(hidden[mask], head, labels[mask], chunk_size, temperature)
    return scatter_positions(picked, mask)


def label_log_probs_and_entropy(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                                chunk_size: int = LOGPROB_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`label_log_probs` and the entropy of the next-token distribution at the same (labelled) positions,
    both (B, T) with 0 elsewhere, from one pass of the LM head over the response (the PPO/GRPO update)."""
    labels = shift_labels(batch["labels"])
    mask = labels != IGNORE_INDEX
    parts = lm_parts(model)
    if parts is None:
        logits = model(**forward_inputs(batch)).logits
        if temperature != 1.0:
            logits = logits / temperature
        return token_log_probs(logits, labels), entropy_from_logits(logits) * mask
    backbone, head = parts
    hidden = backbone(**forward_inputs(batch)).last_hidden_state
    log_probs, entropy = selective_log_probs_and_entropy(hidden[mask], head, labels[mask], chunk_size, temperature)
    return scatter_positions(log_probs, mask), scatter_positions(entropy, mask)


def scatter_positions(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values of the ``mask`` positions (N,) back into a zero tensor of the mask's shape (B, T)."""
    out = values.new_zeros(mask.shape)
    out[mask] = values
    return out


def pack_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded rows (``input_ids``, ``attention_mask``, optional ``labels``) -> one packed row in the
    layout of :mod:`rlhf_lightning.data.packing`, built on the batch's device. Each row's first token gets label
    -100 (nothing predicts it: in the padded layout the shift drops it, in the packed one the previous row would
    predict it). :func:`unpack_rows` maps per-position results back."""
    keep = batch["attention_mask"].bool()
    positions = (keep.long().cumsum(-1) - 1)[keep]
    rows = torch.arange(keep.shape[0], device=keep.device)
    packed = {"input_ids": batch["input_ids"][keep][None], "position_ids": positions[None],
              "segment_ids": rows.repeat_interleave(keep.sum(-1))[None]}
    if "labels" in batch:
        packed["labels"] = batch["labels"][keep].masked_fill(positions == 0, IGNORE_INDEX)[None]
    return packed


def unpack_rows(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position ``values`` of a packed row (1, N) back into the padded layout (B, T) of ``attention_mask``,
    0 at padding: position t of row b predicts that row's token t + 1 in both layouts."""
    return scatter_positions(values[0], attention_mask.bool())


def per_sequence(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of per-token ``values`` (B, T) per padded row or per packed segment."""
    if not is_packed(batch):
        return values.sum(-1)
    return segment_sums(values, batch["segment_ids"], num_sequences(batch))


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor],
                   chunk_size: int = LOGPROB_CHUNK_SIZE) -> dict[str, torch.Tensor]:
    """Per-sequence (padded row or packed segment) ``sum`` and per-token ``mean`` log-prob of the labelled
    (response) tokens, and their ``count``."""
    total = per_sequence(label_log_probs(model, batch, chunk_size=chunk_size), batch)
    labels = shift_labels(batch["labels"])
    count = per_sequence((labels != IGNORE_INDEX).long(), batch)
    return {"sum": total, "mean": total / count.clamp(min=1), "count": count}
