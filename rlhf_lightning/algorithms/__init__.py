"""One LightningModule per algorithm, all subclasses of :class:`RLHFModule`."""

from rlhf_lightning.algorithms.base import RLHFModule
from rlhf_lightning.algorithms.sft import SFT

__all__ = ["RLHFModule", "SFT"]
