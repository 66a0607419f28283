"""``RLHFCLI``: LightningCLI over every algorithm (subclass mode), linking the model's tokenizer to the data.

Before a subcommand starts anything (model load, DeepSpeed, Ray), a pre-flight check turns user mistakes into one
:class:`~rlhf_lightning.errors.UserError` (printed by ``__main__`` as one line):

1. ``--ckpt_path``: an explicit path must exist, and ``last`` must find a checkpoint (Lightning would silently
   start a new run, e.g. after a typo in the run directory);
2. ``fit`` only: the output directories of ``HFExport`` and ``ModelCheckpoint`` must be empty unless resuming
   (``--ckpt_path``) or ``--overwrite true``: two runs in one directory otherwise mix their checkpoints and the
   last export silently wins;
3. ``model.check_config(datamodule)``: option combinations and model paths;
4. ``datamodule.setup(stage)``: data paths, columns and rows (``setup`` returns at once when Lightning calls it
   again).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rlhf_lightning.algorithms import RLHFModule
from rlhf_lightning.callbacks import HFExport
from rlhf_lightning.errors import ConfigError, MissingPathError, verbose
from rlhf_lightning.inference.writer import JsonlPredictionWriter

CKPT_PATH_KEYWORDS = ("best", "hpc")


def tokenizer_of(model: str, tokenizer: str | None) -> str:
    """The tokenizer a model uses: its own ``tokenizer`` option, else the model path."""
    return tokenizer or model


# jsonargparse's report of a subclass option that fails to parse wraps the one useful line in a Union report.
_UNION_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
                "Given value:", "- Expected a <class 'NoneType'>")


def short_parse_error(message: str) -> str:
    """One line from a jsonargparse error: the dotted option (``model.init_args.micro_batch_size``) and what is
    wrong with it, without the Union-subtype report around it. Unknown shapes come back joined on one line."""
    path, details = [], []
    for line in (raw.strip() for raw in message.splitlines()):
        if not line or line.startswith(_UNION_NOISE):
            continue
        key = re.fullmatch(r'(?:- )?Parser key "([^"]+)":', line)
        subclass = re.fullmatch(r"(?:- )?Problem with given class_path '([^']+)':", line)
        if key:
            path.append(key.group(1))
        elif subclass:
            path.append("init_args")
            details.append(f"(class {subclass.group(1)})")
        else:
            details.append(line)
    text = " ".join(details[1:] + details[:1]) if details and details[0].startswith("(class") else " ".join(details)
    return f"{'.'.join(path)}: {text}" if path else text


_SUBCLASS_ROOTS = ("model", "data")


def nested_nulls_as_dicts(args: list[str]) -> list[str]:
    """Rewrite ``--model.init_args.rollout.share_policy null`` as ``--model.init_args.rollout '{"share_policy":
    null}'``, which means the same and merges the same way with the rest of ``rollout``.

    Why: jsonargparse (4.53) re-parses an option nested two or more levels inside a subclass-mode argument (``model``,
    ``data``) as ``f"--{key}={value}"`` after loading its value, so ``null`` comes back as the string ``None``: a
    ``bool | None`` option fails to parse and a ``str | None`` one silently becomes ``"None"``. One level deep
    (``--model.init_args.lr null``) is not affected and is left alone."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        option, eq, value = arg.partition("=")
        if not eq and i + 1 < len(args):
            value = args[i + 1]
        parts = option[2:].split(".") if option.startswith("--") else []
        head = 2 if parts[1:2] == ["init_args"] else 1
        if parts and parts[0] in _SUBCLASS_ROOTS and len(parts) - head >= 2 and value == "null":
            nested: object = None
            for key in reversed(parts[head + 1:]):
                nested = {key: nested}
            out += ["--" + ".".join(parts[:head + 1]), json.dumps(nested)]
            i += 1 if eq else 2
            continue
        out.append(arg)
        i += 1
    return out


class RLHFArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, reporting a bad option as one line instead of the full usage (~50 lines)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or verbose():  # nested parsers raise to their parent; --verbose: jsonargparse's own
            super().error(message, ex)
        sys.stderr.write(f"error: {short_parse_error(message)} (--help lists the options, --verbose gives the full "
                         f"report)\n")
        sys.exit(2)


def output_dirs(trainer: Trainer) -> list[tuple[str, Path]]:
    """(description, directory) of the callbacks that write a run's outputs to a fixed directory."""
    dirs = []
    for callback in trainer.callbacks:
        if isinstance(callback, HFExport) and not callback.overwrite:
            dirs.append(("HFExport dirpath", Path(callback.dirpath)))
        elif isinstance(callback, ModelCheckpoint) and callback.dirpath:
            dirs.append(("ModelCheckpoint dirpath", Path(callback.dirpath)))
    return dirs


def check_output_dirs(trainer: Trainer) -> None:
    """Refuse to start a new run in output directories that hold another run's files."""
    for what, directory in output_dirs(trainer):
        if directory.is_dir() and any(directory.iterdir()):
            raise ConfigError(
                f"{what} '{directory}' already holds files from an earlier run: a new run would mix its outputs "
                f"with them. Resume that run with --ckpt_path last, choose another directory, delete this one, "
                f"or pass --overwrite true.")


def last_checkpoints(trainer: Trainer) -> tuple[set[str], list[str]]:
    """(existing ``last`` checkpoints, directories searched), found the way ``trainer.fit(ckpt_path="last")`` finds
    them (Lightning's own ``ModelCheckpoint._find_last_checkpoints``)."""
    found, searched = set(), []
    for callback in trainer.callbacks:
        if isinstance(callback, OnExceptionCheckpoint):
            searched.append(callback.ckpt_path)
            found |= {callback.ckpt_path} if Path(callback.ckpt_path).exists() else set()
        elif isinstance(callback, ModelCheckpoint):
            candidates = callback._find_last_checkpoints(trainer)
            searched.append(str(callback.dirpath or "the ModelCheckpoint default directory"))
            found |= {path for path in candidates if Path(path).exists()}
    return found, searched


def check_ckpt_path(ckpt_path: str | None, trainer: Trainer) -> None:
    """``--ckpt_path``: an explicit local path must exist; ``last`` must find a checkpoint."""
    if not ckpt_path or ckpt_path in CKPT_PATH_KEYWORDS or str(ckpt_path).startswith("registry") or "://" in str(
            ckpt_path):
        return
    if ckpt_path == "last":
        found, searched = last_checkpoints(trainer)
        if not found:
            where = ", ".join(f"'{d}'" for d in searched) or "no ModelCheckpoint callback is configured"
            raise MissingPathError(
                f"--ckpt_path last: no last checkpoint to resume from (searched: {where}). Check "
                f"trainer.default_root_dir and the ModelCheckpoint dirpath (a typo there would start a new run), or "
                f"drop --ckpt_path to start one on purpose.")
    elif not Path(ckpt_path).exists():
        raise MissingPathError(f"--ckpt_path '{ckpt_path}' does not exist. Pass a checkpoint path, or 'last' to "
                               f"resume from the run's ModelCheckpoint directory.")


class RLHFCLI(LightningCLI):
    """``python -m rlhf_lightning {fit,validate,test,predict} --config configs/<algo>.yaml``.

    ``--model`` takes any :class:`RLHFModule` subclass by ``class_path`` (yours too), ``--data`` any
    ``LightningDataModule``. The data module's ``tokenizer`` follows the model's unless set in the data section.
    ``fit --overwrite true`` lets a new run write into non-empty output directories (see the module docstring).
    """

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=RLHFModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_class=RLHFArgumentParser,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(("model.init_args.model", "model.init_args.tokenizer"), "data.init_args.tokenizer",
                              compute_fn=tokenizer_of)
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: let a new run write into non-empty HFExport / ModelCheckpoint directories "
                                 "(otherwise an error, unless resuming with --ckpt_path); predict: start the "
                                 "output file over instead of resuming it.")

    # ------------------------------------------------------------------------------------------ pre-flight
    def preflight(self, stage: str) -> None:
        """Every check that can fail on a user mistake, before the subcommand loads a model or starts DeepSpeed."""
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        check_ckpt_path(ckpt_path, self.trainer)
        if config.get("overwrite"):
            for callback in self.trainer.callbacks:
                if isinstance(callback, HFExport | JsonlPredictionWriter):
                    callback.overwrite = True
        elif stage == "fit" and not ckpt_path:
            check_output_dirs(self.trainer)
        if isinstance(self.model, RLHFModule):
            self.model.check_config(self.datamodule)
        if self.datamodule is not None:
            self.datamodule.trainer = self.trainer  # as Lightning attaches it; setup may read it
            self.datamodule.setup(stage)

    def before_fit(self) -> None:
        """Pre-flight, then start (or join) Ray in the launching process, before Lightning spawns the other local
        ranks, so they find the cluster through ``RAY_ADDRESS``."""
        self.preflight("fit")
        config = getattr(self.model, "rollout_config", None)
        launching_process = os.environ.get("LOCAL_RANK", "0") == "0"  # Lightning sets LOCAL_RANK in the ranks it spawns
        if config is not None and launching_process:
            from rlhf_lightning.rollout.backends import make_backend

            make_backend(config).start()

    def before_validate(self) -> None:
        self.preflight("validate")

    def before_test(self) -> None:
        self.preflight("test")

    def before_predict(self) -> None:
        self.preflight("predict")
