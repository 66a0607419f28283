"""Stop a diverging run instead of training on (and exporting) a broken model.

:class:`DivergenceGuard` is added to every run by ``RLHFModule.configure_callbacks`` with the module's
``max_nonfinite_steps``, ``loss_spike_factor`` and ``loss_spike_warmup`` options:

- **Non-finite loss or gradient**: the optimizer step is skipped (parameters and optimizer state unchanged), a
  warning names the step, and ``train/skipped_steps`` counts such steps. Plain strategies: the gradients are checked
  after backward (``on_before_optimizer_step``, after any ``manual_backward`` too) and dropped, so the optimizer
  step changes nothing (DeepSpeed stage 0 in fp32 too). DeepSpeed ZeRO (and stage 0's bf16/fp16 optimizers): the
  engine holds the gradients; it checks their norm itself and skips the step (fp32, bf16 with
  ``check_grad_overflow``, the default, and fp16), and the guard counts its skipped steps.
  ``max_nonfinite_steps`` skipped steps in a row stop the run: a checkpoint of the last good weights is written
  (``diverged-step=N.ckpt`` next to the other checkpoints) and :class:`TrainingDivergedError` names it.
- **Loss spike** (automatic optimization: SFT, reward model, DPO family): with ``loss_spike_factor`` set, a loss
  above ``factor`` × the median of the last :data:`SPIKE_WINDOW` finite losses stops the run, once
  ``loss_spike_warmup`` steps have been seen. A blown-up learning rate shows as such a spike (e.g. 1e7), and the
  model it leaves behind is not worth a checkpoint: resume from the last regular one with a lower learning rate.

The learning-rate schedule still advances on a skipped step (Lightning steps it per batch).
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn

from rlhf_lightning.checkpointing import save_named_checkpoint
from rlhf_lightning.errors import UserError

SPIKE_WINDOW = 100  # recent losses whose median a spike is measured against


class TrainingDivergedError(UserError, RuntimeError):
    """Training stopped because the loss or the gradients diverged (a learning rate too high, bad data rows...)."""


def grads_finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether every gradient of ``params`` is finite (parameters without a gradient are ignored)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)  # one fused pass; a norm is non-finite iff its tensor has inf/nan
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def is_spike(loss: float, history: list[float], factor: float, warmup: int) -> bool:
    """Whether ``loss`` exceeds ``factor`` times the median of ``history`` (after ``warmup`` finite losses)."""
    if len(history) < max(warmup, 1):
        return False
    return loss > factor * statistics.median(history)


def _engine(trainer: pl.Trainer) -> Any | None:
    """The DeepSpeed engine if it owns the gradients and skips bad steps itself: ZeRO, or a bf16/fp16 optimizer
    wrapper. DeepSpeed stage 0 in fp32 (one process, see :mod:`rlhf_lightning.strategies`) steps the plain torch
    optimizer on the parameters' own gradients with no overflow check, so it takes the plain strategies' path."""
    engine = trainer.strategy.deepspeed_engine if isinstance(trainer.strategy, DeepSpeedStrategy) else None
    if engine is None or engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return engine
    return None


class DivergenceGuard(Callback):
    """Skip steps with non-finite loss/gradients, stop after ``max_nonfinite_steps`` in a row or on a loss spike.

    Args:
        max_nonfinite_steps: consecutive skipped steps that stop the run (0 = skip forever, never stop).
        loss_spike_factor: stop when the loss exceeds this multiple of the recent median (``None`` = off).
        loss_spike_warmup: finite losses to see before spikes are checked.
    """

    def __init__(self, max_nonfinite_steps: int = 3, loss_spike_factor: float | None = None,
                 loss_spike_warmup: int = 10) -> None:
        self.max_nonfinite_steps = max_nonfinite_steps
        self.loss_spike_factor = loss_spike_factor
        self.loss_spike_warmup = loss_spike_warmup
        self.skipped_total = 0
        self.streak = 0
        self.losses: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self._batch_skipped = 0
        self._batch_applied = 0
        self._engine_seen: tuple[int, int] | None = None  # DeepSpeed (global_steps, skipped_steps) already counted

    # --------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total, "streak": self.streak, "losses": list(self.losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = state_dict.get("skipped_total", 0)
        self.streak = state_dict.get("streak", 0)
        self.losses = deque(state_dict.get("losses", []), maxlen=SPIKE_WINDOW)

    # --------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = _engine(trainer)
        self._engine_seen = (engine.global_steps, engine.skipped_steps) if engine is not None else None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """After backward, before the step: drop non-finite gradients (all ranks agree) so the step is a no-op."""
        if _engine(trainer) is not None:
            return  # DeepSpeed checks the gradient norm in its own step
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = trainer.strategy.reduce_boolean_decision(grads_finite(params), all=True)
        if finite:
            self._batch_applied += 1
        else:
            optimizer.zero_grad(set_to_none=True)  # torch optimizers skip parameters without a gradient
            self._batch_skipped += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        skipped, applied = self._collect_step_outcomes(trainer)
        if skipped:
            self.skipped_total += skipped
            self.streak = self.streak + skipped if not applied else skipped
            rank_zero_warn(f"Step {trainer.global_step}: non-finite loss or gradient, optimizer step skipped "
                           f"({self.streak} in a row, {self.skipped_total} in total).")
        elif applied:
            self.streak = 0
        pl_module.log("train/skipped_steps", float(self.skipped_total))
        if self.max_nonfinite_steps and self.streak >= self.max_nonfinite_steps:
            self._stop_nonfinite(trainer)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.loss_spike_factor is not None and isinstance(loss, torch.Tensor) and not skipped:
            self._check_spike(trainer, float(trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")))

    # ------------------------------------------------------------------------------------------- helpers
    def _collect_step_outcomes(self, trainer: pl.Trainer) -> tuple[int, int]:
        """(skipped, applied) optimizer steps of the batch that just ended."""
        engine = _engine(trainer)
        if engine is not None and self._engine_seen is not None:
            steps, skipped = engine.global_steps - self._engine_seen[0], engine.skipped_steps - self._engine_seen[1]
            self._engine_seen = (engine.global_steps, engine.skipped_steps)
            return skipped, steps - skipped
        outcome = (self._batch_skipped, self._batch_applied)
        self._batch_skipped = self._batch_applied = 0
        return outcome

    def _check_spike(self, trainer: pl.Trainer, loss: float) -> None:
        if not torch.isfinite(torch.tensor(loss)):
            return
        if is_spike(loss, list(self.losses), self.loss_spike_factor, self.loss_spike_warmup):
            median = statistics.median(self.losses)
            last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise TrainingDivergedError(
                f"Training stopped at step {trainer.global_step}: loss {loss:.4g} is more than "
                f"model.init_args.loss_spike_factor={self.loss_spike_factor:g} x the median {median:.4g} of the "
                f"last {len(self.losses)} steps. The learning rate is probably too high: lower "
                f"model.init_args.optimizer.init_args.lr (or add warm-up / gradient clipping) and resume from the "
                f"last checkpoint ({last}) with --ckpt_path.")
        self.losses.append(loss)

    def _stop_nonfinite(self, trainer: pl.Trainer) -> None:
        path = save_named_checkpoint(trainer, f"diverged-step={trainer.global_step}.ckpt")  # the last good weights
        raise TrainingDivergedError(
            f"Training stopped at step {trainer.global_step}: {self.streak} optimizer steps in a row had a non-finite "
            f"loss or gradient (limit model.init_args.max_nonfinite_steps={self.max_nonfinite_steps}); they were "
            f"skipped. Weights of the last good step: {path}. Lower the learning rate "
            f"(model.init_args.optimizer.init_args.lr), clip gradients, or check the data rows of these steps, then "
            f"resume with --ckpt_path {path}.")
