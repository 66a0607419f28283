"""Datasets, collators and LightningDataModules.

The DataModules are imported on first use (``rlhf_lightning.data.SFTDataModule``): the formatting helpers in this
package are also used by commands that never build one (``chat``), which then start without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BaseDataModule": "base",
    "ConditionalSFTDataModule": "conditional",
    "PreferenceDataModule": "preference",
    "PromptDataModule": "prompts",
    "ScoringDataModule": "scoring",
    "SFTDataModule": "sft",
    "UnpairedPreferenceDataModule": "preference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlhf_lightning.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"rlhf_lightning.data.{_EXPORTS[name]}"), name)
