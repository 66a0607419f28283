"""A new SFT loss is one method: subclass :class:`rlhf_lightning.algorithms.SFT` and override ``compute_loss``.

    PYTHONPATH=examples python -m rlhf_lightning fit --config configs/tiny/sft.yaml \
        --model custom_sft_loss.LabelSmoothedSFT --model.init_args.label_smoothing 0.1
"""

import torch
import torch.nn.functional as F

from rlhf_lightning.algorithms import SFT
from rlhf_lightning.losses import IGNORE_INDEX


class LabelSmoothedSFT(SFT):
    """SFT with label smoothing (Szegedy et al. 2016): the target puts ``1 - ε`` on the token, ``ε`` spread evenly."""

    def __init__(self, *args, label_smoothing: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=self.label_smoothing)
