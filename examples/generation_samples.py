"""A custom callback: watch what the model answers while it trains (any algorithm with a ``model`` and ``tokenizer``).

    PYTHONPATH=examples python -m rlhf_lightning fit --config configs/tiny/sft.yaml \
        --trainer.callbacks+=generation_samples.GenerationSamples \
        --trainer.callbacks.prompts '["reverse: a b c", "reverse: q w e r t y"]' --trainer.callbacks.every_n_steps 20

Every ``every_n_steps`` optimizer steps it greedily answers fixed prompts (rendered with the tokenizer's chat
template) with the current weights, prints them, and appends ``step, prompt, answer`` rows to ``generations.csv``
in the first logger's directory. Side concerns like this belong in a callback, not in the LightningModule.
Under ZeRO-3 every rank must generate (``synced_gpus``), which is why ``generate`` runs on all ranks.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.models import greedy_answers
from rlhf_lightning.strategies import DeepSpeedStrategy


class GenerationSamples(Callback):
    """Log greedy answers to ``prompts`` every ``every_n_steps`` steps and at the end of training."""

    def __init__(self, prompts: list[str], every_n_steps: int = 50, max_new_tokens: int = 32) -> None:
        self.prompts, self.every_n_steps, self.max_new_tokens = prompts, every_n_steps, max_new_tokens
        self.last_logged_step = -1

    def answers(self, module: pl.LightningModule) -> list[str]:
        strategy = module.trainer.strategy
        zero3 = isinstance(strategy, DeepSpeedStrategy) and strategy.config["zero_optimization"]["stage"] == 3
        was_training = module.model.training
        module.model.eval()
        answers = greedy_answers(module.model, module.tokenizer, self.prompts, self.max_new_tokens, synced_gpus=zero3)
        module.model.train(was_training)
        return answers

    def log_answers(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self.last_logged_step:
            return  # already logged at this step (the last periodic step can also be the end)
        self.last_logged_step = step
        answers = self.answers(module)
        if trainer.global_rank != 0:
            return
        new = [(step, p, a) for p, a in zip(self.prompts, answers, strict=True)]
        rank_zero_info("\n".join(f"[step {s}] {p!r} -> {a!r}" for s, p, a in new))
        if trainer.loggers and trainer.loggers[0].log_dir:
            path = Path(trainer.loggers[0].log_dir) / "generations.csv"
            fresh = not path.exists()
            with path.open("a", newline="") as f:
                writer = csv.writer(f)
                if fresh:
                    writer.writerow(["step", "prompt", "answer"])
                writer.writerows(new)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.log_answers(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.log_answers(trainer, module)
