"""Lightning callbacks for side concerns: Hugging Face export (consolidated from ZeRO shards)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.guards import TrainingDivergedError
from rlhf_lightning.lora import has_lora, merged_state_dict, save_adapter
from rlhf_lightning.strategies import gather_state_dict

log = logging.getLogger(__name__)


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state`` that hold a NaN or an infinity."""
    return [name for name, tensor in state.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def _from_rank_zero(value: list[str]) -> list[str]:
    """Rank 0's ``value`` on every rank (so all ranks raise together instead of the others hanging in a barrier)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def export_hf(model: torch.nn.Module, tokenizer: object | None, directory: str | Path, rank: int,
              adapter_only: bool = False) -> None:
    """Write ``save_pretrained`` weights (+ tokenizer) that plain ``transformers`` can load. Call on every rank.

    A model with LoRA adapters is exported merged (``W + ΔW`` under the plain model's names), or, with
    ``adapter_only``, as its peft adapter (``adapter_model.safetensors`` + ``adapter_config.json`` naming the base).
    Refuses (on every rank) a model with NaN or infinite weights, naming them: such an export would load and
    generate garbage without any error.
    """
    adapter_only = adapter_only and has_lora(model)
    state = gather_state_dict(model, rank)
    if not adapter_only:
        state = merged_state_dict(model, state)  # unchanged without adapters
    bad = _from_rank_zero(nonfinite_tensors(state) if rank == 0 else [])
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise TrainingDivergedError(
            f"Not exporting to {directory}: {len(bad)} weight tensors hold NaN or inf ({shown}). Training diverged: "
            f"lower the learning rate (model.init_args.optimizer.init_args.lr) and resume from an earlier checkpoint.")
    if rank == 0:
        directory = Path(directory)
        if adapter_only:
            save_adapter(model, state, directory)
        else:
            model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        rank_zero_info(f"Exported Hugging Face model to {directory}")


class HFExport(Callback):
    """Export the module's ``model`` (and ``tokenizer``) with ``save_pretrained``.

    A module may define ``prepare_export()`` (called on every rank first) to add to the export, e.g. config keys.
    With ``lora`` the export holds merged weights, or only the adapter with ``lora.export: adapter``.

    A new run refuses a ``dirpath`` that already holds files (another run's export would be silently replaced and
    mixed with this one's): resuming (``ckpt_path``) or ``overwrite=True`` allows it. The CLI checks this before
    anything loads (``--overwrite true`` sets ``overwrite``); this callback checks again when training starts, for
    runs built in Python.

    Args:
        dirpath: output directory; periodic exports go to ``dirpath/step-<N>``, the final one to ``dirpath``.
        every_n_steps: export every N optimizer steps (0 = only at the end).
        at_end: export when training ends.
        attribute: the module attribute holding the Hugging Face model (e.g. ``critic`` for PPO's value model).
        overwrite: let a new run export into a non-empty ``dirpath``.
    """

    def __init__(self, dirpath: str = "outputs/hf", every_n_steps: int = 0, at_end: bool = True,
                 attribute: str = "model", overwrite: bool = False) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self.attribute = attribute
        self.overwrite = overwrite
        self._last_exported_step = -1

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Refuse a non-empty ``dirpath`` in a new run (here, after any checkpoint has been restored, so
        ``trainer.ckpt_path`` tells a resumed run from a new one)."""
        if self.overwrite or trainer.ckpt_path or not (self.dirpath.is_dir() and any(self.dirpath.iterdir())):
            return
        raise ConfigError(f"HFExport dirpath '{self.dirpath}' already holds files from an earlier run: resume that "
                          f"run (ckpt_path), choose another directory, delete this one, or pass HFExport(overwrite="
                          f"True) (CLI: --overwrite true).")

    def _export(self, trainer: pl.Trainer, module: pl.LightningModule, directory: Path) -> None:
        if hasattr(module, "prepare_export"):  # e.g. the reward model stores its reward statistics in the config
            module.prepare_export()
        model = getattr(module, self.attribute)
        lora = getattr(module, "lora", None)
        export_hf(model, getattr(module, "tokenizer", None), directory, trainer.global_rank,
                  adapter_only=lora is not None and lora.export == "adapter")
        self._last_exported_step = trainer.global_step
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_exported_step:
            self._export(trainer, module, self.dirpath / f"step-{step}")

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.at_end:
            self._export(trainer, module, self.dirpath)


class SampleTable(Callback):
    """Log a table of rollout samples (prompt, response, reward) every ``every_n_steps`` training steps.

    Reads ``module.last_samples`` (set by the PPO family). CSV loggers get ``samples.csv`` in their log
    directory, TensorBoard a markdown text entry, wandb a ``wandb.Table``.

    Args:
        every_n_steps: logging period in training steps.
        max_rows: samples per table.
    """

    def __init__(self, every_n_steps: int = 10, max_rows: int = 8) -> None:
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
        batch_idx = trainer.fit_loop.epoch_loop.batch_progress.current.completed - 1
        samples = getattr(module, "last_samples", [])[: self.max_rows]
        if not samples or batch_idx % self.every_n_steps or trainer.global_rank != 0:
            return
        rows = [[trainer.global_step, s["prompt"], s["response"], round(float(s["reward"]), 4)] for s in samples]
        for logger in trainer.loggers:
            self._log(logger, rows, trainer.global_step)

    @staticmethod
    def _log(logger: object, rows: list[list], step: int) -> None:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

        columns = ["step", "prompt", "response", "reward"]
        if isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / "samples.csv"
            new = not path.exists()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(columns)
                writer.writerows(rows)
        elif isinstance(logger, TensorBoardLogger):
            table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            table += "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows)
            logger.experiment.add_text("samples", table, global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_table(key="samples", columns=columns, data=rows, step=step)
