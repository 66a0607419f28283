"""Lightning's DeepSpeed strategy, made to also run on CPU so CI exercises the real ZeRO code paths.

On a CUDA accelerator :class:`DeepSpeedStrategy` behaves exactly like Lightning's. On the CPU accelerator it
skips Lightning's CUDA-only check, initialises ``torch.distributed`` with gloo through DeepSpeed, and reports a
device with an index (DeepSpeed's engine requires one). ZeRO-2/3 and optimizer CPU offload
(``DeepSpeedCPUAdam``, JIT-built on first use) then train for real with 1 or more processes.

With a single process ZeRO-1/2 have nothing to partition, yet their flat gradient buckets and fp32 partition copies
cost time (~1.5 s per optimizer step at 100M parameters on a 2-core CPU: 0.59x TRL's SFT speed where the same
model without DeepSpeed ran at 1.10x). Such a run (one process, ZeRO-1/2, no optimizer offload) therefore runs as
DeepSpeed stage 0 with its no-op all-reduce skipped: same update, same engine, checkpoints in DeepSpeed's format.
``zero_on_one_process: true`` keeps ZeRO (e.g. to resume a one-process ZeRO-2 checkpoint written before this).

Use it from YAML::

    trainer:
      strategy:
        class_path: rlhf_lightning.strategies.DeepSpeedStrategy
        init_args: {stage: 2, offload_optimizer: true}
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.checkpointing import partial_path, remove_path, swap_into_place
from rlhf_lightning.errors import ConfigError


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """DeepSpeed ZeRO strategy for GPU and CPU.

    Args:
        stage: ZeRO stage (1, 2 or 3).
        offload_optimizer: keep optimizer states (and the step) on CPU; pair with ``DeepSpeedCPUAdam``
            (the algorithms swap a plain Adam/AdamW for it automatically).
        offload_parameters: ZeRO-3 only, keep parameters on CPU between uses.
        allgather_bucket_size: ZeRO-2 all-gather bucket, in elements.
        reduce_bucket_size: gradient reduce bucket, in elements.
        stage3_prefetch_bucket_size: ZeRO-3 parameter prefetch, in elements. ``0`` disables prefetching, which
            code that gathers parameters inside ``training_step`` (generation, weight sync) needs: with
            prefetching on, DeepSpeed fails on the second batch with "Cannot partition a param in flight".
        stage3_param_persistence_threshold: ZeRO-3 parameters smaller than this stay unpartitioned.
        config: a full DeepSpeed config (dict or JSON path) that overrides every option above.
        zero_on_one_process: keep ZeRO-1/2 when training on one process without offload (default: DeepSpeed
            stage 0 there, the same update without partitioning overhead; see the module docstring).
        kwargs: any other argument of :class:`lightning.pytorch.strategies.DeepSpeedStrategy`.
    """

    def __init__(
        self,
        stage: int = 2,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        allgather_bucket_size: int = 200_000_000,
        reduce_bucket_size: int = 200_000_000,
        stage3_prefetch_bucket_size: int | None = 0,
        stage3_param_persistence_threshold: int | None = None,
        config: str | dict[str, Any] | None = None,
        logging_level: int = logging.WARN,
        zero_on_one_process: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            stage=stage,
            offload_optimizer=offload_optimizer,
            offload_parameters=offload_parameters,
            allgather_bucket_size=allgather_bucket_size,
            reduce_bucket_size=reduce_bucket_size,
            config=config,
            logging_level=logging_level,
            **kwargs,
        )
        self._zero3_overrides = {
            key: value
            for key, value in {
                "stage3_prefetch_bucket_size": stage3_prefetch_bucket_size,
                "stage3_param_persistence_threshold": stage3_param_persistence_threshold,
            }.items()
            if value is not None
        }
        if config is None and stage == 3:
            self.config["zero_optimization"].update(self._zero3_overrides)
        self.zero_on_one_process = zero_on_one_process

    @property
    def on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    @property
    def offloads_optimizer(self) -> bool:
        """Whether optimizer states live on CPU (then DeepSpeed wants its own CPU Adam)."""
        offload = (self.config or {}).get("zero_optimization", {}).get("offload_optimizer") or {}
        return offload.get("device", "none") in ("cpu", "nvme")

    @property
    def root_device(self) -> torch.device:
        if self.on_cpu:
            return torch.device("cpu", 0)  # DeepSpeed reads ``device.index``
        return super().root_device

    def on_train_start(self) -> None:
        """Restore the training dataloader's mid-epoch position from the checkpoint.

        DeepSpeed restores checkpoints after ``setup`` (``restore_checkpoint_after_setup``), but the fit loop
        builds and starts iterating its dataloader earlier (to estimate the number of steps for the LR schedule)
        and never applies the dataloader state it restores later; without this, a resumed run restarts the
        epoch's data. Load the state, set the samplers to the restored epoch (they were set to epoch 0 before the
        checkpoint was loaded, and a ``DistributedSampler`` draws its order when the iterator starts: without it, a
        run resumed in epoch 1 or later replays epoch 0's order), then restart the iterator so both take effect.
        """
        super().on_train_start()
        fit_loop = self.lightning_module.trainer.fit_loop
        if fit_loop._combined_loader_states_to_load and fit_loop._data_fetcher is not None:
            for loader in fit_loop._combined_loader.flattened:
                _set_sampler_epoch(loader, fit_loop.epoch_progress.current.processed)
            fit_loop._load_combined_loader_states()
            with torch.random.fork_rng(devices=[]):  # the RNG state restored from the checkpoint stays as it was
                iter(fit_loop._data_fetcher)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        """Write the checkpoint directory next to ``filepath``, then swap it into place once every rank is done.

        Every rank writes its ZeRO shards into the temporary sibling (``.last.ckpt.partial``); after a barrier
        rank 0 renames it over the old checkpoint, which is deleted only then. A crash while saving therefore leaves
        the previous checkpoint whole.
        """
        final = Path(self.broadcast(str(filepath)))
        tmp = partial_path(final)
        if self.is_global_zero:
            remove_path(tmp)  # left over from a crash during an earlier save
        self.barrier("checkpoint: clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("checkpoint: shards written")
        if self.is_global_zero:
            swap_into_place(tmp, final)
        self.barrier("checkpoint: in place")

    @property
    def unpartitioned_single_process(self) -> bool:
        """Whether this run trains as DeepSpeed stage 0: one process, ZeRO-1/2, no optimizer offload (see the
        module docstring), unless ``zero_on_one_process``."""
        zero = (self.config or {}).get("zero_optimization", {})
        return (self.world_size == 1 and zero.get("stage") in (1, 2) and not self.offloads_optimizer
                and not self.zero_on_one_process)

    def init_deepspeed(self) -> None:
        if self.unpartitioned_single_process:
            stage = self.config["zero_optimization"]["stage"]
            self.config["zero_optimization"]["stage"] = 0
            rank_zero_info(f"DeepSpeed: one process, so ZeRO-{stage} would partition nothing; training as stage 0 "
                           "(the same update, without its bucket copies). zero_on_one_process: true keeps ZeRO.")
        super().init_deepspeed()

    def _setup_model_and_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                                   lr_scheduler: Any | None = None) -> tuple[Any, Any]:
        engine, optimizer = super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
            engine.enable_backward_allreduce = False  # averaging over one process: a copy of every gradient
        return engine, optimizer

    def load_checkpoint(self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
        self.check_checkpoint_layout(Path(checkpoint_path))
        return super().load_checkpoint(checkpoint_path, weights_only)

    def check_checkpoint_layout(self, path: Path) -> None:
        """Refuse, with the option to change, a checkpoint whose optimizer state is laid out for the other engine
        mode: ZeRO partitions (``*optim_states.pt``) resumed as one-process stage 0, or the reverse; DeepSpeed
        itself fails on either with a bare ``KeyError`` or a missing-file error."""
        engine = self.deepspeed_engine
        if engine is None or not path.is_dir() or not self.lightning_module.trainer.training:
            return
        partitioned = any(path.glob("*/*optim_states.pt"))
        expects_partitioned = bool(engine.zero_optimization() or engine.bfloat16_enabled())
        if partitioned and not expects_partitioned:
            raise ConfigError(
                f"{path} holds ZeRO-partitioned optimizer state, but this one-process run trains as DeepSpeed stage 0 "
                "(see trainer.strategy.init_args.zero_on_one_process): resume it with --trainer.strategy.init_args."
                "zero_on_one_process true, with the number of processes that wrote it.")
        if expects_partitioned and not partitioned:
            raise ConfigError(
                f"{path} was written by a one-process DeepSpeed stage-0 run (no ZeRO partitions), but this run "
                "expects ZeRO-partitioned optimizer state: resume it on one process without "
                "trainer.strategy.init_args.zero_on_one_process.")

    def micro_batch_boundary(self, last: bool) -> None:
        """Call before each micro-batch's forward under manual optimization.

        DeepSpeed advances its gradient-accumulation state in ``engine.forward``, which Lightning calls once per
        ``training_step``. Several ``manual_backward`` calls in one step then silently keep only the last
        micro-batch's gradients unless the engine is told which backward closes the accumulation window.
        """
        engine = self.deepspeed_engine
        engine.set_gradient_accumulation_boundary(last)
        if hasattr(engine.optimizer, "clear_backward_seen_flag"):
            engine.optimizer.clear_backward_seen_flag()

    def setup_environment(self) -> None:
        if self.on_cpu:
            DDPStrategy.setup_environment(self)  # Lightning's DeepSpeed refuses non-CUDA accelerators here
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            super().setup_distributed()
            return
        reset_seed()
        self.set_world_ranks()
        if "LOCAL_SIZE" not in os.environ:
            # DeepSpeed JIT-compiles its shared-memory all-reduce (tens of seconds on a fresh machine) at every CPU
            # init, but only uses it when its own launcher sets LOCAL_SIZE; Lightning launches ranks itself.
            # (import_module: the attribute `deepspeed.comm.torch` is PyTorch itself, not the submodule.)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        self._init_deepspeed_distributed()


def destroy_distributed() -> None:
    """Tear down ``torch.distributed`` and DeepSpeed's cached process groups.

    Called after each CLI run: ZeRO-3 on several CPU ranks can abort at interpreter exit otherwise, and a second
    in-process run (tests, notebooks) would hit DeepSpeed's cached clone of the destroyed world group.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.destroy_process_group()
    try:
        from deepspeed.utils import groups
    except ImportError:
        return
    for name, value in vars(groups).items():
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")):
            setattr(groups, name, {} if isinstance(value, dict) else None)


def gather_state_dict(module: torch.nn.Module, rank: int, all_ranks: bool = False) -> dict[str, torch.Tensor]:
    """Full state dict of ``module`` on CPU at ``rank`` 0 (empty elsewhere, unless ``all_ranks``), gathering ZeRO-3
    partitions one layer at a time (:func:`state_buckets` with no bucket size) so peak memory stays at one layer
    beyond the CPU copy. Call on every rank."""
    state: dict[str, torch.Tensor] = {}
    for bucket in state_buckets(module, 0, rank, all_ranks):
        state.update(bucket)
    return state


_LAYER_PARTS = (".base_layer.", ".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.",
                ".modules_to_save.", ".original_module.")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its module's path, with a LoRA layer's base weight, adapters and saved
    copies all mapped to the adapted layer (so they travel in one bucket and can be merged there)."""
    for part in _LAYER_PARTS:
        if part in name:
            return name.split(part, 1)[0]
    return name.rpartition(".")[0]


def state_buckets(module: torch.nn.Module, bucket_bytes: int, rank: int,
                  all_ranks: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The state dict of ``module`` as CPU buckets of about ``bucket_bytes`` each (a layer larger than that is one
    bucket of its own), gathering ZeRO-3 partitions one bucket at a time: streamed, no rank ever holds a second
    full copy of the model, only the bucket in hand. A layer's parameters (a LoRA layer's base weight and adapters
    included) stay in one bucket; persistent buffers come last. Buckets are filled on ``rank`` 0 (every rank with
    ``all_ranks``) and empty elsewhere; iterate on every rank, since gathering partitions is collective."""
    keep = all_ranks or rank == 0
    layers: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, param in module.named_parameters():  # tied parameters are listed once
        layers.setdefault(layer_of(name), []).append((name, param))
    zero3 = any(hasattr(p, "ds_id") for p in module.parameters())
    if zero3:
        import deepspeed

    def size(param: torch.nn.Parameter) -> int:
        return getattr(param, "ds_numel", param.numel()) * param.element_size()

    def gathered(params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
        context = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None) if zero3 \
            else contextlib.nullcontext()
        with context:
            return {name: param.detach().cpu().clone() for name, param in params} if keep else {}

    bucket: list[tuple[str, torch.nn.Parameter]] = []
    bucket_size = 0
    for params in layers.values():
        layer_size = sum(size(p) for _, p in params)
        if bucket and bucket_size + layer_size > bucket_bytes:
            yield gathered(bucket)
            bucket, bucket_size = [], 0
        bucket += params
        bucket_size += layer_size
    last = gathered(bucket)
    if keep:
        state_keys = module.state_dict().keys()
        last.update({name: b.detach().cpu().clone() for name, b in module.named_buffers() if name in state_keys})
    yield last
