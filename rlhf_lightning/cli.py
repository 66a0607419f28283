"""``RLHFCLI``: LightningCLI over every algorithm (subclass mode), linking the model's tokenizer to the data."""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rlhf_lightning.algorithms import RLHFModule


def tokenizer_of(model: str, tokenizer: str | None) -> str:
    """The tokenizer a model uses: its own ``tokenizer`` option, else the model path."""
    return tokenizer or model


class RLHFCLI(LightningCLI):
    """``python -m rlhf_lightning {fit,validate,test,predict} --config configs/<algo>.yaml``.

    ``--model`` takes any :class:`RLHFModule` subclass by ``class_path`` (yours too), ``--data`` any
    ``LightningDataModule``. The data module's ``tokenizer`` follows the model's unless set in the data section.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=RLHFModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def before_fit(self) -> None:
        """Start (or join) Ray in the launching process, before Lightning spawns the other local ranks, so they
        find the cluster through ``RAY_ADDRESS``."""
        config = getattr(self.model, "rollout_config", None)
        launching_process = os.environ.get("LOCAL_RANK", "0") == "0"  # Lightning sets LOCAL_RANK in the ranks it spawns
        if config is not None and config.backend == "ray" and launching_process:
            from rlhf_lightning.rollout.engine import start_ray

            start_ray(config)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(("model.init_args.model", "model.init_args.tokenizer"), "data.init_args.tokenizer",
                              compute_fn=tokenizer_of)
