"""One LightningModule per algorithm, all subclasses of :class:`RLHFModule`."""

from rlhf_lightning.algorithms.base import RLHFModule
from rlhf_lightning.algorithms.conditional_sft import ConditionalSFT
from rlhf_lightning.algorithms.dpo import DPO
from rlhf_lightning.algorithms.kto import KTO
from rlhf_lightning.algorithms.orpo import ORPO
from rlhf_lightning.algorithms.ppo import PPO
from rlhf_lightning.algorithms.preference import PreferenceModule
from rlhf_lightning.algorithms.reward_model import RewardModel
from rlhf_lightning.algorithms.sft import SFT
from rlhf_lightning.algorithms.simpo import SimPO

__all__ = ["ConditionalSFT", "DPO", "KTO", "ORPO", "PPO", "PreferenceModule", "RLHFModule", "RewardModel", "SFT",
           "SimPO"]
