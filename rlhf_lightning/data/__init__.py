"""Datasets, collators and LightningDataModules."""

from rlhf_lightning.data.sft import SFTDataModule

__all__ = ["SFTDataModule"]
