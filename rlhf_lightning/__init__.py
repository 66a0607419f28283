"""rlhf_lightning: RLHF (SFT, reward models, PPO over Ray, the DPO family) as PyTorch Lightning modules."""

import os
import warnings

import torch

# DeepSpeed picks its accelerator when it is first imported; without a GPU it must be told to use the CPU one.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

# Deprecation noise from DeepSpeed's and Lightning's own calls into torch; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\). is deprecated")

__version__ = "0.1.0"
