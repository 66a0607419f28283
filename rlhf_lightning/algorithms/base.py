"""``RLHFModule``: what every algorithm shares — model loading, optimizer/scheduler, throughput logging.

Subclasses implement ``training_step`` (and usually ``validation_step``). The model is built in
``configure_model`` so that LightningCLI can construct the module cheaply on every rank and DeepSpeed ZeRO-3
can partition the weights while they load.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from rlhf_lightning.models import load_causal_lm, load_tokenizer
from rlhf_lightning.strategies import DeepSpeedStrategy


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW at a learning rate that suits full fine-tuning of pretrained LMs."""
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class RLHFModule(LightningModule):
    """Base of all algorithms.

    Args:
        model: hub id, local directory, or ``tiny-llama`` (bundled, randomly initialised).
        tokenizer: tokenizer name or path; defaults to ``model``.
        dtype: parameter dtype: ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``; default: flash-attn when installed on
            a GPU, else sdpa.
        gradient_checkpointing: recompute activations in backward to save memory.
        trust_remote_code: allow model code from the hub (off unless you trust the repository).
        config_overrides: keys set on the model config before building (e.g. ``{num_hidden_layers: 4}``).
        optimizer: optimizer factory (``class_path`` + ``init_args`` in YAML). With DeepSpeed optimizer offload,
            ``torch.optim.Adam``/``AdamW`` is replaced by ``DeepSpeedCPUAdam`` with the same settings.
        lr_scheduler: a ``transformers.get_scheduler`` name: ``cosine``, ``linear``, ``constant_with_warmup``...
        warmup_steps: warmup length in optimizer steps, or a fraction of all steps if below 1.
        min_lr_ratio: with ``cosine``, decay to this fraction of the peak learning rate instead of 0.
    """

    def __init__(
        self,
        model: str = "tiny-llama",
        tokenizer: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        config_overrides: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: str = "cosine",
        warmup_steps: float = 0.03,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._step_started = 0.0

    # ----------------------------------------------------------------------------------------------- model
    def load_model(self, name_or_path: str, score_head: bool = False) -> PreTrainedModel:
        """Build a causal LM (or, with ``score_head``, a scalar-output model) with this module's settings."""
        hp = self.hparams
        ds_config = self.trainer.strategy.config if self._has_trainer and isinstance(
            self.trainer.strategy, DeepSpeedStrategy) else None
        return load_causal_lm(name_or_path, dtype=hp.dtype, attn_implementation=hp.attn_implementation,
                              gradient_checkpointing=hp.gradient_checkpointing,
                              trust_remote_code=hp.trust_remote_code, config_overrides=hp.config_overrides,
                              deepspeed_config=ds_config, score_head=score_head)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.load_model(self.hparams.model).train()  # from_pretrained returns eval mode
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer or self.hparams.model,
                                            trust_remote_code=self.hparams.trust_remote_code)

    @property
    def _has_trainer(self) -> bool:
        return self._trainer is not None

    # ------------------------------------------------------------------------------------------- optimizer
    def trainable_parameters(self) -> list[torch.nn.Parameter] | list[dict]:
        """Parameters (or param groups) handed to the optimizer; override for per-group learning rates."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if isinstance(self.trainer.strategy, DeepSpeedStrategy) and self.trainer.strategy.offloads_optimizer:
            optimizer = to_deepspeed_cpu_adam(optimizer)
        total = self.total_optimizer_steps()
        warmup = int(self.hparams.warmup_steps * total) if self.hparams.warmup_steps < 1 else int(
            self.hparams.warmup_steps)
        name, extra = self.hparams.lr_scheduler, {}
        if name == "cosine" and self.hparams.min_lr_ratio > 0:
            name, extra = "cosine_with_min_lr", {"min_lr_rate": self.hparams.min_lr_ratio}
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                                  scheduler_specific_kwargs=extra)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, for the LR schedule (override when a step makes several)."""
        return int(self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------------------------------------ throughput
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def log_throughput(self, num_tokens: int | torch.Tensor, num_samples: int) -> None:
        """Log this rank's tokens/s and samples/s for the current step (call at the end of training_step)."""
        elapsed = max(time.perf_counter() - self._step_started, 1e-9)
        self.log("train/tokens_per_sec", float(num_tokens) / elapsed)
        self.log("train/samples_per_sec", num_samples / elapsed)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)


def to_deepspeed_cpu_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Swap torch Adam/AdamW for DeepSpeed's CPU Adam (required with optimizer offload), keeping param groups."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return optimizer
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    defaults = optimizer.defaults
    return DeepSpeedCPUAdam(optimizer.param_groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"],
                            weight_decay=defaults["weight_decay"],
                            adamw_mode=isinstance(optimizer, torch.optim.AdamW))
