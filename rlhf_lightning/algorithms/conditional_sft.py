"""Reward-conditioned SFT (Decision-Transformer alignment, arXiv 2308.12050; SteerLM-like): SFT on scored responses
whose prompts carry their score's condition; the export generates at the best condition by default.

    python -m rlhf_lightning fit --config configs/tiny/conditional_sft.yaml

The data (:class:`~rlhf_lightning.data.ConditionalSFTDataModule`) turns scores into conditions
(:mod:`rlhf_lightning.conditioning`); this module trains exactly as :class:`SFT` and adds what the conditions need:

- ``condition_style: special_tokens``: the new tokens are added to the tokenizer and the embeddings resized (new
  rows start at the mean of the old ones, transformers' default) before training and before a checkpoint loads;
- every export gets the condition-applying chat template (the best condition by default, see
  :mod:`rlhf_lightning.conditioning`) and the settings (levels, normalisation statistics, template, best and worst
  condition) as ``config.reward_condition``; the final export also as ``reward_condition.json``.

:func:`retarget_export` makes a copy of an export whose default is another level (e.g. the worst, to measure what
the condition does with any evaluation command).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lightning.pytorch import LightningDataModule

from rlhf_lightning.algorithms.sft import SFT
from rlhf_lightning.callbacks import HFExport
from rlhf_lightning.conditioning import ConditionSettings, conditioned_chat_template, prepare_tokenizer
from rlhf_lightning.data.conditional import ConditionalSFTDataModule
from rlhf_lightning.errors import ConfigError, MissingPathError

SETTINGS_FILE = "reward_condition.json"


class ConditionalSFT(SFT):
    """SFT on reward-conditioned data; exports carry their condition (all arguments: see :class:`RLHFModule`)."""

    def check_config(self, datamodule: LightningDataModule | None) -> None:
        super().check_config(datamodule)
        if not isinstance(datamodule, ConditionalSFTDataModule):
            raise ConfigError(f"model ConditionalSFT needs data.class_path: rlhf_lightning.data."
                              f"ConditionalSFTDataModule (the conditions come from the data), got "
                              f"{type(datamodule).__name__}.")

    @property
    def condition_settings(self) -> ConditionSettings:
        """The conditions fitted by the data module on the training scores."""
        datamodule = self.trainer.datamodule
        if datamodule is None or datamodule.condition_settings is None:
            raise RuntimeError("ConditionalSFT needs a set-up ConditionalSFTDataModule (trainer.datamodule).")
        return datamodule.condition_settings

    def configure_model(self) -> None:
        """Load as :class:`SFT`, then give the tokenizer the conditions (resizing embeddings for new tokens)."""
        super().configure_model()
        prepare_tokenizer(self.tokenizer, self.condition_settings)
        if len(self.tokenizer) > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(len(self.tokenizer))

    def prepare_export(self) -> None:
        """Called by :class:`~rlhf_lightning.callbacks.HFExport` before every export."""
        settings = self.condition_settings
        prepare_tokenizer(self.tokenizer, settings)
        self.model.config.reward_condition = settings.to_dict()

    def on_train_end(self) -> None:
        """Write ``reward_condition.json`` next to the final export(s) (HFExport, a callback, exported just before)."""
        if self.trainer.global_rank != 0:
            return
        for callback in self.trainer.callbacks:
            if isinstance(callback, HFExport) and callback.at_end and callback.dirpath.is_dir():
                write_settings(callback.dirpath, self.condition_settings)


def write_settings(directory: str | Path, settings: ConditionSettings) -> Path:
    """Write ``reward_condition.json`` into an export directory."""
    path = Path(directory) / SETTINGS_FILE
    path.write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    return path


def read_settings(directory: str | Path) -> ConditionSettings:
    """The condition settings of a reward-conditioned export."""
    path = Path(directory) / SETTINGS_FILE
    if not path.is_file():
        raise MissingPathError(f"'{directory}' has no {SETTINGS_FILE}: it is not a reward-conditioned SFT export.")
    return ConditionSettings.from_dict(json.loads(path.read_text()))


def retarget_export(source: str | Path, target: str | Path, level: int) -> Path:
    """A copy of export ``source`` in ``target`` whose chat template defaults to condition ``level`` (1..levels)
    instead of the best one; weight files are symlinked, not copied. For measuring other conditions with commands
    that only take a model directory (e.g. ``tasks.reverse.evaluate``)."""
    from transformers import AutoTokenizer

    source, target = Path(source), Path(target)
    settings = read_settings(source)
    if not 1 <= level <= settings.levels:
        raise ConfigError(f"level={level} must be between 1 and {settings.levels}.")
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
            (target / path.name).unlink(missing_ok=True)
            (target / path.name).symlink_to(path.resolve())
        elif path.is_file():
            shutil.copy2(path, target / path.name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    condition = settings.conditions[level - 1]
    tokenizer.chat_template = conditioned_chat_template(tokenizer.chat_template, settings.conditions, condition)
    tokenizer.save_pretrained(target)
    return target
