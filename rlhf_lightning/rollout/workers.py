"""Rollout workers: generation, reference log-probs and reward-model scores.

Plain classes, so the same code runs in-process (``local`` backend) or as Ray actors on their own devices
(``ray`` backend). Tensors cross the boundary on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from rlhf_lightning.generation import sample_responses
from rlhf_lightning.logprobs import label_log_probs
from rlhf_lightning.models import last_token_rewards, load_causal_lm


class ModelWorker:
    """Holds one frozen Hugging Face model on ``device``."""

    score_head = False

    def __init__(self, model: str, dtype: str = "float32", attn_implementation: str | None = None,
                 trust_remote_code: bool = False, device: str | None = None, seed: int = 0,
                 random_init: bool = False) -> None:
        torch.manual_seed(seed)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_causal_lm(model, dtype=dtype, attn_implementation=attn_implementation,
                                    trust_remote_code=trust_remote_code, score_head=self.score_head,
                                    random_init=random_init and not self.score_head)
        self.model.to(self.device).eval().requires_grad_(False)

    def ready(self) -> bool:
        """Answers once the model is loaded (the trainer waits on it, with a timeout, before the first step)."""
        return True

    def pid(self) -> int:
        """The worker's process id (on Ray, the actor's process: tests kill it to check the run stops cleanly)."""
        return os.getpid()

    def node_id(self) -> str | None:
        """The Ray node the worker runs on (``None`` outside Ray): where its placement put it."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class GenerationWorker(ModelWorker):
    """Samples responses from a copy of the policy; the trainer pushes new weights with a version number, so a
    rollout can check it never uses stale weights."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.version = 0  # the weights loaded from ``model`` are the trainer's version 0

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Load a full (unsharded) policy state dict; tied weights (e.g. ``lm_head`` = embeddings) may be absent."""
        self.begin_weights()
        self.load_weight_bucket(state_dict)
        return self.commit_weights(version)

    def begin_weights(self) -> None:
        """A streamed push starts: every parameter must arrive (in buckets) before :meth:`commit_weights`."""
        self.pending = {name for name, _ in self.model.named_parameters()}  # tied parameters listed once

    def load_weight_bucket(self, bucket: dict[str, torch.Tensor]) -> None:
        """Copy one bucket of the policy's weights into the model, in place (no second copy is allocated)."""
        unexpected = self.model.load_state_dict(bucket, strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"Weight push has {len(unexpected)} names this model lacks, e.g. {sorted(unexpected)[:3]}.")
        self.pending -= bucket.keys()

    def commit_weights(self, version: int) -> int:
        """The push is complete: check every parameter arrived, then report the new ``version``."""
        if self.pending:
            raise KeyError(f"Weight push lacks {len(self.pending)} parameters, e.g. {sorted(self.pending)[:3]}.")
        self.version = version
        return version

    def generate(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int, eos_token_ids: list[int], pad_token_id: int,
                 generation_kwargs: dict[str, Any] | None = None, seed: int | None = None,
                 streamer: Any = None, prompt_seeds: list[int] | None = None, with_log_probs: bool = False) -> dict:
        """:func:`~rlhf_lightning.generation.sample_responses` with this worker's model: ``responses``, the
        ``version`` of its weights (the trainer checks which policy sampled) and, ``with_log_probs``, the sampler's
        ``log_probs`` of the response tokens (for the importance weights of asynchronous rollouts)."""
        responses, log_probs = sample_responses(self.model, prompt_ids, n, max_new_tokens, temperature, top_p, top_k,
                                                eos_token_ids, pad_token_id, generation_kwargs, seed, streamer,
                                                prompt_seeds, with_log_probs=with_log_probs)
        return {"responses": responses, "version": self.version, "log_probs": log_probs}


class PolicyGenerationWorker(GenerationWorker):
    """A generation worker over the trained module itself (``local`` backend): no second copy of the policy in
    memory and no weight push, since its weights are always the trainer's current ones.

    ``policy`` returns the module (the trainer builds it in ``configure_model``, after the workers exist). It
    generates in eval mode (no dropout; gradient checkpointing, active only in training mode, leaves the KV cache
    on) and without gradients, then restores the module's mode. A weight "push" only records the version, so the
    trainer's check that a rollout used the current weights still holds."""

    def __init__(self, policy: Callable[[], torch.nn.Module]) -> None:
        self.policy = policy
        self.version = 0

    @property
    def model(self) -> torch.nn.Module:  # type: ignore[override]
        return self.policy()

    def begin_weights(self) -> None:
        """The module's weights are the trainer's own: a push copies nothing, only its version is recorded."""

    def load_weight_bucket(self, bucket: dict[str, torch.Tensor]) -> None:
        pass

    def commit_weights(self, version: int) -> int:
        self.version = version
        return version

    def generate(self, *args: Any, **kwargs: Any) -> dict:
        """:meth:`GenerationWorker.generate` in eval mode; the module's train/eval mode is restored afterwards."""
        model = self.model
        training = model.training
        model.eval()
        try:
            return super().generate(*args, **kwargs)
        finally:
            model.train(training)


class ReferenceWorker(ModelWorker):
    """Per-token log-probs of the labelled tokens under the frozen reference policy (the LM head applied to the
    response positions only, in chunks: :func:`rlhf_lightning.logprobs.label_log_probs`)."""

    @torch.no_grad()
    def log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
        batch = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
                 "labels": labels.to(self.device)}
        return label_log_probs(self.model, batch, temperature).cpu()


class RewardModelWorker(ModelWorker):
    """Scalar reward of each sequence from a trained reward model, normalised with the mean/std the reward
    model stored at export (``reward_mean``/``reward_std`` in its config) when ``normalize`` is set."""

    score_head = True

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:

        rewards = last_token_rewards(self.model, input_ids.to(self.device), attention_mask.to(self.device)).cpu()
        config = self.model.config
        if normalize and getattr(config, "reward_std", None):
            rewards = (rewards - config.reward_mean) / config.reward_std
        return rewards
