"""Datasets, collators and LightningDataModules."""

from rlhf_lightning.data.base import BaseDataModule
from rlhf_lightning.data.conditional import ConditionalSFTDataModule
from rlhf_lightning.data.preference import PreferenceDataModule, UnpairedPreferenceDataModule
from rlhf_lightning.data.prompts import PromptDataModule
from rlhf_lightning.data.sft import SFTDataModule

__all__ = ["BaseDataModule", "ConditionalSFTDataModule", "PreferenceDataModule", "PromptDataModule", "SFTDataModule",
           "UnpairedPreferenceDataModule"]
