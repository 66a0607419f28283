"""LoRA / QLoRA adapters (through peft) for the model a run trains: options, injection, the reference as the same
model with adapters off, and merged weights for generation workers and exports.

    model:
      init_args:
        lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes each targeted weight ``W`` (out × in) and trains a low-rank update
``ΔW = (alpha / r) · B A`` (``A``: r × in, ``B``: out × r, ``B`` starting at 0, so training starts from the
pretrained model). Adapters are injected in place (``peft.inject_adapter_in_model``): the model stays its plain
transformers class (``model.model``, ``lm_head``, ``base_model``, ``generate`` behave as before) and only the
adapter weights, plus a reward/value model's score head, require grad, so the optimizer holds only them.
(transformers' own ``add_adapter`` would do the same but needs peft >= 0.22, which is not released.)

What the rest of the project builds on it:

- the reference policy of DPO, KTO and PPO is the same model with adapters disabled (:func:`adapters_disabled`):
  no second model in memory;
- generation workers and exports get merged weights ``W + ΔW`` under the plain model's parameter names
  (:func:`merged_state_dict`), computed from a copy of the state, never by merging into the trained module;
- ``export: adapter`` writes the peft adapter only (:func:`save_adapter`: ``adapter_model.safetensors`` +
  ``adapter_config.json`` naming the base model), which ``peft.PeftModel.from_pretrained(base, dir)`` loads.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314), ``load_in_4bit``, loads the frozen base in 4-bit NF4 through
bitsandbytes, which needs a CUDA GPU: :func:`check_lora` refuses it, naming the option, anywhere else.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rlhf_lightning.errors import ConfigError

ADAPTER = "default"  # peft's adapter name; one adapter per model
OPTION = "model.init_args.lora"


@dataclass
class LoRA:
    """Low-rank adapters on the trained model (and PPO's critic) instead of full fine-tuning.

    Attributes:
        r: rank of each update ``B A``.
        alpha: scale numerator: the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapter's input (training only).
        target_modules: ``all-linear`` (every linear layer but the output head) or module names, e.g.
            ``[q_proj, v_proj]``; names must be linear layers.
        load_in_4bit: QLoRA: hold the frozen base weights in 4-bit NF4 (bitsandbytes + a CUDA GPU).
        export: what ``HFExport`` writes: ``merged`` weights (a plain model any tool loads) or the ``adapter``
            only (``adapter_config.json`` names the base model; load with ``peft.PeftModel.from_pretrained``).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    load_in_4bit: bool = False
    export: Literal["merged", "adapter"] = "merged"


def check_lora(lora: LoRA | None, hardware: bool = True) -> None:
    """Raise a :class:`ConfigError` naming ``model.init_args.lora.<field>`` for a bad value, or (``hardware``) for
    ``load_in_4bit`` where bitsandbytes or a CUDA GPU is missing. Cheap: loads nothing."""
    if lora is None:
        return
    for name, valid, requirement in (
        ("r", lora.r >= 1, "an integer >= 1"),
        ("alpha", lora.alpha > 0, "> 0"),
        ("dropout", 0 <= lora.dropout < 1, "in [0, 1)"),
        ("target_modules", bool(lora.target_modules) and (isinstance(lora.target_modules, str)
                                                          or all(isinstance(m, str) and m for m in
                                                                 lora.target_modules)),
         "'all-linear' or a non-empty list of module names, e.g. [q_proj, v_proj]"),
        ("export", lora.export in ("merged", "adapter"), "'merged' or 'adapter'"),
    ):
        if not valid:
            raise ConfigError(f"{OPTION}.{name}={getattr(lora, name)!r} is invalid: it must be {requirement}.")
    if lora.load_in_4bit and lora.export == "merged":
        raise ConfigError(f"{OPTION}.load_in_4bit=true with {OPTION}.export=merged: the frozen base is held in 4 "
                          f"bits, so merged weights would be its quantised copy; set {OPTION}.export: adapter (and "
                          f"merge onto the full-precision base afterwards).")
    if hardware and lora.load_in_4bit:
        missing = [what for what, ok in (("the bitsandbytes package (pip install bitsandbytes)",
                                          importlib.util.find_spec("bitsandbytes") is not None),
                                         ("a CUDA GPU", torch.cuda.is_available())) if not ok]
        if missing:
            raise ConfigError(f"{OPTION}.load_in_4bit=true (QLoRA) needs {' and '.join(missing)}; set it to false "
                              f"for LoRA on full-precision weights.")


def quantization_config(lora: LoRA | None, dtype: torch.dtype) -> Any:
    """The ``BitsAndBytesConfig`` of QLoRA's 4-bit NF4 base (double quantisation, compute in ``dtype``), or None."""
    if lora is None or not lora.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def head_name(model: nn.Module) -> str | None:
    """Attribute name of a ``*ForSequenceClassification`` model's scalar head (``score``/``classifier``), else None."""
    return next((name for name in ("score", "classifier") if isinstance(getattr(model, name, None), nn.Module)),
                None)


def apply_lora(model: nn.Module, lora: LoRA, base_model_name: str, score_head: bool = False) -> nn.Module:
    """Inject adapters into ``model`` in place and freeze everything else; with ``score_head`` the scalar head is
    trained in full (peft ``modules_to_save``). ``base_model_name`` is what an adapter export names as its base."""
    from peft import LoraConfig, inject_adapter_in_model, prepare_model_for_kbit_training
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    if lora.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model.is_gradient_checkpointing)
    head = head_name(model) if score_head else None
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, modules_to_save=[head] if head else None,
                        base_model_name_or_path=base_model_name)
    try:
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as err:  # no module matched target_modules
        raise ConfigError(f"{OPTION}.target_modules={lora.target_modules!r}: {err}") from err
    others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, LoraLayer)
                     and not isinstance(m, LoraLinear)})
    if others:
        raise ConfigError(f"{OPTION}.target_modules={lora.target_modules!r} reaches non-linear layers ({others}): "
                          f"name linear layers only (e.g. q_proj, v_proj) or use all-linear.")
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers of ``model`` by module name (empty for a model without adapters)."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def has_lora(model: nn.Module | None) -> bool:
    """Whether ``model`` carries injected adapters."""
    return model is not None and hasattr(model, "peft_config") and bool(lora_layers(model))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its frozen base (adapters and saved-module copies off) in eval mode, then restore adapters,
    ``requires_grad`` flags and train mode. A model without adapters is only switched to eval mode: it *is* its
    base. Use it under ``torch.no_grad()`` (it is a reference, not something to differentiate)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    switches = [m for m in model.modules() if isinstance(m, BaseTunerLayer | ModulesToSaveWrapper)]
    flags = {p: p.requires_grad for m in switches for p in m.parameters()}  # peft's toggle rewrites them
    was_training = model.training
    model.eval()
    for module in switches:
        module.enable_adapters(False)
    try:
        yield model
    finally:
        for module in switches:
            module.enable_adapters(True)
        for param, flag in flags.items():
            param.requires_grad_(flag)
        model.train(was_training)


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merged weights of an adapted ``model`` under the plain model's names, from ``state`` (its full state dict, e.g.
    gathered from ZeRO shards): ``W + (alpha / r) B A`` for every adapted linear layer (transposed for
    ``fan_in_fan_out`` layers such as GPT-2's ``Conv1D``), a saved module's trained copy for the module itself.
    The model and ``state`` are not modified. A ``state`` without adapters is returned as it is."""
    layers = lora_layers(model)
    if not layers:
        return state
    if any(type(layer.get_base_layer()).__name__ == "Linear4bit" for layer in layers.values()):
        raise ConfigError(f"{OPTION}.load_in_4bit=true: merged weights of a 4-bit base are not supported (export "
                          f"the adapter, and generate with the trained module: rollout backend local).")
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        merged[key.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")] = value
    for name, layer in layers.items():
        if f"{name}.lora_A.{ADAPTER}.weight" not in state:  # e.g. a rank that holds no state
            continue
        lora_a, lora_b = state[f"{name}.lora_A.{ADAPTER}.weight"], state[f"{name}.lora_B.{ADAPTER}.weight"]
        delta = (lora_b.float() @ lora_a.float()) * layer.scaling[ADAPTER]
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        weight = merged[f"{name}.weight"]
        merged[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return merged


def adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's weights from ``state`` (the model's full state dict), named as ``PeftModel.save_pretrained``
    names them (under ``base_model.model.``, where a ``PeftModel`` holds the adapted model)."""
    from peft import get_peft_model_state_dict

    weights = get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER)
    return {f"base_model.model.{name}": value for name, value in weights.items()}


def save_adapter(model: nn.Module, state: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Write the peft adapter of ``model`` (weights from ``state``) to ``directory``: ``adapter_model.safetensors``
    and ``adapter_config.json``, whose ``base_model_name_or_path`` names the base model to load it onto."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in adapter_state_dict(model, state).items()}
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[ADAPTER].save_pretrained(str(directory))


def trainable_summary(model: nn.Module) -> str:
    """``trainable / total parameters (percent)`` of a model, for the log."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} / {total:,} parameters trainable ({100 * trainable / max(total, 1):.2f}%)"
