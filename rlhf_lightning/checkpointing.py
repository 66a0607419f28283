"""Checkpoints that survive crashes and resume exactly: atomic writes and the random-number state.

Lightning checkpoints hold the weights, optimizer, scheduler, step counters and the dataloader's position, but not
the random-number generators, and a crash while one is written can leave a truncated ``last.ckpt``:

- :func:`swap_into_place` moves a fully written temporary sibling over the old checkpoint (file or DeepSpeed
  directory), so the previous checkpoint stays intact until the new one is complete. ``DeepSpeedStrategy`` uses it
  for its directory checkpoints, :class:`AtomicCheckpointIO` for plain ``torch.save`` files.
- :class:`ResumeState` (added to every run by ``RLHFModule.configure_callbacks``) saves the torch, CUDA, NumPy and
  Python RNG states of every rank and restores them when training starts after ``--ckpt_path``, so dropout
  and any other sampling continue as in an uninterrupted run. It also installs :class:`AtomicCheckpointIO` on
  strategies that write plain files.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

PARTIAL_SUFFIX = ".partial"  # not ``.ckpt``: Lightning's ``--ckpt_path last`` search never picks up a half-written one
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths atomically


def partial_path(path: str | Path) -> Path:
    """The temporary sibling a checkpoint is written to before it replaces ``path``: ``.last.ckpt.partial``."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def remove_path(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_into_place(tmp: str | Path, final: str | Path) -> None:
    """Make the fully written ``tmp`` (file or directory) the checkpoint at ``final``; the old one is deleted last.

    Files: ``os.replace`` (atomic). Directories, which ``rename`` cannot put over a non-empty directory: an atomic
    exchange on Linux, else two renames (the old one moves aside first, so a crash between them leaves it whole at
    ``<final>.old``).
    """
    tmp, final = Path(tmp), Path(final)
    if not tmp.is_dir() or not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):  # ``tmp`` now holds the old checkpoint
        remove_path(tmp)
        return
    old = final.with_name(final.name + ".old")
    remove_path(old)
    os.replace(final, old)
    os.replace(tmp, final)
    remove_path(old)


def save_named_checkpoint(trainer: pl.Trainer, name: str) -> Path:
    """Save a checkpoint called ``name`` next to the run's other checkpoints (the ``ModelCheckpoint`` directory,
    else ``<default_root_dir>/checkpoints``) and return its path; call on every rank (DeepSpeed writes shards).
    Used when a run has to stop (divergence, a dead rollout worker) and must leave something to resume from."""
    callback = trainer.checkpoint_callback
    directory = Path(callback.dirpath) if callback is not None and callback.dirpath else (
        Path(trainer.default_root_dir) / "checkpoints")
    path = directory / name
    trainer.save_checkpoint(path)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary sibling, ``fsync``, then rename over the old checkpoint.

    Lightning's own writer serialises to memory and commits through an fsspec transaction whose temporary file lives
    in the system temp directory: when that is another filesystem (tmpfs ``/tmp``, a network or object store
    mount), the commit is a plain copy onto ``last.ckpt``, and a crash during it truncates the only checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: Lightning's own writer
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_path(path)
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        swap_into_place(tmp, path)


def rng_states() -> dict[str, Any]:
    """This process's torch, CUDA, NumPy and Python RNG states, as tensors and plain Python values only (so
    ``torch.load(weights_only=True)``, Lightning's default for plain checkpoints, accepts them)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, python_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(state), python_gauss]}


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, python_gauss = states["python"]
    random.setstate((version, tuple(state), python_gauss))


def _all_ranks(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (no collective in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


class ResumeState(Callback):
    """Save every rank's RNG states in checkpoints and restore them before the first batch after a resume.

    They are restored in ``on_train_start``, not at load time: between loading and training, model set-up and the
    dataloader restart draw random numbers that the uninterrupted run drew before the checkpoint was written
    (``DeepSpeedStrategy`` restarts the resumed dataloader after this hook, under ``torch.random.fork_rng``).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:  # not DeepSpeed, not user-chosen
            strategy.checkpoint_io = AtomicCheckpointIO()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _all_ranks(rng_states())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending.get("rng", []), None
        if len(states) != trainer.world_size:
            rank_zero_warn(f"The checkpoint holds RNG states of {len(states)} ranks, this run has "
                           f"{trainer.world_size}: random numbers will differ from the original run's.")
            return
        set_rng_states(states[trainer.global_rank])
