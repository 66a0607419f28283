"""Rejection sampling (best-of-n fine-tuning): sample n responses per prompt, score them, keep the best, fine-tune.

    python -m rlhf_lightning rejection-sampling --config configs/tiny/rejection_sampling.yaml
    python -m rlhf_lightning rejection-sampling select --scores scores.jsonl --output sft.jsonl   # one step alone

Llama 2 (Touvron et al. 2023, arXiv 2307.09288, sec. 3.2.3) and RAFT (Dong et al. 2023, arXiv 2304.06767) align a
model by repeating, for ``rounds`` rounds, four ordinary CLI calls, each printed (copy-pasteable) before it runs:

1. ``predict --config <generate_config>``: ``n`` samples per prompt from the current policy (batch generation);
2. ``predict --config <score_config>``: a reward model and/or reward functions score every sample;
3. ``rejection-sampling select`` (run in-process, same code): per prompt the highest-scoring sample
   (``selection: best``; the first of equal scores), or every distinct sample scoring at least ``threshold``
   (``selection: threshold``) becomes an SFT row ``{"input": prompt, "output": response, "score": s}`` (a chat
   prompt, i.e. a message list, becomes ``{"messages": prompt + [assistant response], "score": s}``);
4. ``fit --config <sft_config>``: SFT on those rows starting from the current policy; its export is the next
   round's policy, so each round samples from the most recent model (Llama 2; RAFT's iterative mode). Llama 2's
   later rounds also kept the best samples of all earlier rounds; here each round trains on its own only.

Each round writes ``<output_dir>/round-<k>/{samples,scores,sft}.jsonl``, ``selection.json`` (how many rows were
kept, mean score of the kept rows vs of all samples: the gain best-of-n buys, Llama 2 fig. 7) and ``sft/hf`` (the
export); ``<output_dir>/hf`` links to the last round's export and ``summary.json`` lists every round. A step that
finished is recorded next to its outputs (``.<step>.done`` holds its command line): a rerun skips it with a
message, so a killed run continues from the step it was in (a killed generation resumes its own file, other
steps start over); once a step runs, every later step runs again. Rerunning with options that change a
finished step's command is refused (use a new ``output_dir``).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_lightning.errors import ConfigError, MissingPathError
from rlhf_lightning.selection import Selection, select_file


# ------------------------------------------------------------------------------------------------------ the driver
@dataclass
class RejectionSamplingConfig:
    """Options of ``python -m rlhf_lightning rejection-sampling`` (a YAML file via ``--config``, or flags).

    Args:
        policy: the starting policy: an exported model directory, a hub id or ``tiny-llama``.
        prompts: prompt file (jsonl/json/parquet/csv) the samples are drawn for.
        output_dir: one ``round-<k>`` directory per round is written here.
        prompt_key: prompt column (text or a list of chat messages).
        label_key: optional column handed to reward functions (e.g. the reference answer).
        n: samples per prompt (best-of-n).
        temperature: sampling temperature (0 = greedy, which makes every sample the same).
        top_p: nucleus sampling.
        max_new_tokens: longest response.
        reward_models: reward-model exports scoring the samples.
        reward_functions: rule rewards, ``module:function`` or ``file.py:function``.
        reward_weights: one weight per reward model then function (default 1 each); the score is their weighted sum.
        selection: ``best`` keeps each prompt's best sample; ``threshold`` keeps every sample scoring >= threshold.
        threshold: minimum score of a kept sample (with ``best``: optional, drops prompts whose best is below).
        dedup: with ``threshold``, keep a response sampled several times once.
        rounds: generate -> score -> select -> SFT rounds; each starts from the previous round's export.
        seed: sampling seed of round 1 (round k uses seed + k - 1) and the SFT runs' seed.
        generate_config: LightningCLI config of batch generation (``predict``).
        score_config: LightningCLI config of batch scoring (``predict``).
        sft_config: LightningCLI config of the fine-tuning (``fit``); its data options must format prompts as
            the generation did (chat template by default).
        generate_args: extra flags for every generate call.
        score_args: extra flags for every score call.
        sft_args: extra flags for every SFT call, e.g. ``[--trainer.max_epochs, '2']``.
    """

    policy: str
    prompts: str
    output_dir: str = "runs/rejection-sampling"
    prompt_key: str = "prompt"
    label_key: str | None = None
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    reward_models: list[str] = field(default_factory=list)
    reward_functions: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    selection: Selection = "best"
    threshold: float | None = None
    dedup: bool = True
    rounds: int = 1
    seed: int = 42
    generate_config: str = "configs/tiny/generate.yaml"
    score_config: str = "configs/tiny/score.yaml"
    sft_config: str = "configs/tiny/sft.yaml"
    generate_args: list[str] = field(default_factory=list)
    score_args: list[str] = field(default_factory=list)
    sft_args: list[str] = field(default_factory=list)


def check_config(cfg: RejectionSamplingConfig) -> None:
    """Every user mistake the driver can see, before any model loads (each stage checks its own options too)."""
    from rlhf_lightning.models import check_model_path
    from rlhf_lightning.rollout.rewards import load_reward_fn

    for key, value in (("rounds", cfg.rounds), ("n", cfg.n), ("max_new_tokens", cfg.max_new_tokens)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1.")
    if cfg.selection == "threshold" and cfg.threshold is None:
        raise ConfigError("selection: threshold needs a threshold value (option threshold), e.g. threshold: 0.5.")
    if not cfg.reward_models and not cfg.reward_functions:
        raise ConfigError("No reward source: set reward_models and/or reward_functions.")
    n_sources = len(cfg.reward_models) + len(cfg.reward_functions)
    if cfg.reward_weights is not None and len(cfg.reward_weights) != n_sources:
        raise ConfigError(f"reward_weights has {len(cfg.reward_weights)} value(s) for {n_sources} reward sources "
                          f"(reward_models, then reward_functions).")
    check_model_path(cfg.policy, "policy")
    for path in cfg.reward_models:
        check_model_path(path, "reward_models")
    for spec in cfg.reward_functions:
        try:
            load_reward_fn(spec)
        except (ValueError, ImportError, OSError, AttributeError) as err:
            raise ConfigError(f"reward_functions: {err}") from None
    for key in ("generate_config", "score_config", "sft_config"):
        if not Path(getattr(cfg, key)).is_file():
            raise MissingPathError(f"{key}='{getattr(cfg, key)}' does not exist: name a LightningCLI config file.")
    if Path(cfg.prompts).suffix in (".jsonl", ".json", ".parquet", ".csv") and not Path(cfg.prompts).is_file():
        raise MissingPathError(f"prompts='{cfg.prompts}' does not exist: name a prompt file or a hub dataset.")


def python_m(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_lightning", *args]


def generate_command(cfg: RejectionSamplingConfig, policy: str, out: Path, seed: int) -> list[str]:
    """``predict`` with the generation config: ``n`` samples per prompt of ``policy`` into ``out``."""
    return python_m("predict", "--config", cfg.generate_config, "--model.init_args.model", policy,
                    "--data.init_args.path", cfg.prompts, "--data.init_args.prompt_key", cfg.prompt_key,
                    "--data.init_args.label_key", cfg.label_key or "null",
                    "--model.init_args.n", str(cfg.n), "--model.init_args.temperature", str(cfg.temperature),
                    "--model.init_args.top_p", str(cfg.top_p),
                    "--model.init_args.max_new_tokens", str(cfg.max_new_tokens), "--seed_everything", str(seed),
                    "--trainer.callbacks.init_args.output", str(out), *cfg.generate_args)


def score_command(cfg: RejectionSamplingConfig, samples: Path, out: Path) -> list[str]:
    """``predict`` with the scoring config: every sample of ``samples`` scored into ``out``."""
    return python_m("predict", "--config", cfg.score_config, "--data.init_args.path", str(samples),
                    "--model.init_args.reward_models", json.dumps(cfg.reward_models),
                    "--model.init_args.reward_functions", json.dumps(cfg.reward_functions),
                    "--model.init_args.reward_weights", json.dumps(cfg.reward_weights),
                    "--trainer.callbacks.init_args.output", str(out), *cfg.score_args)


def select_command(cfg: RejectionSamplingConfig, scores: Path, out: Path) -> list[str]:
    threshold = ["--threshold", str(cfg.threshold)] if cfg.threshold is not None else []
    return python_m("rejection-sampling", "select", "--scores", str(scores), "--output", str(out),
                    "--selection", cfg.selection, *threshold, "--dedup", str(cfg.dedup).lower())


def sft_command(cfg: RejectionSamplingConfig, policy: str, data: Path, run_dir: Path, chat: bool) -> list[str]:
    """``fit`` with the SFT config from ``policy`` on ``data``; logs and the export under ``run_dir``. No training
    checkpoints (a 7B one per round is large, and a killed SFT step starts over)."""
    callbacks = [{"class_path": "rlhf_lightning.callbacks.HFExport", "init_args": {"dirpath": str(run_dir / "hf")}}]
    columns = ["--data.init_args.messages_key", "messages"] if chat else [
        "--data.init_args.messages_key", "null", "--data.init_args.input_key", "input",
        "--data.init_args.output_key", "output"]
    return python_m("fit", "--config", cfg.sft_config, "--model.init_args.model", policy,
                    "--data.init_args.path", str(data), *columns, "--seed_everything", str(cfg.seed),
                    "--data.init_args.seed", str(cfg.seed),
                    "--trainer.default_root_dir", str(run_dir),
                    "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                    "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", "csv",
                    "--trainer.callbacks", json.dumps(callbacks), "--trainer.enable_checkpointing", "false",
                    *cfg.sft_args)


def printable(cmd: Sequence[str]) -> str:
    """The command as a user would type it (``python`` instead of this interpreter's full path)."""
    return shlex.join(["python", *cmd[1:]] if cmd[0] == sys.executable else cmd)


def finished(name: str, cmd: list[str], done: Path, outputs: Sequence[Path]) -> bool:
    """Whether a step already ran: ``done`` records its command and its outputs exist. A record of another command
    is refused: the options changed since, and skipping would mix two runs."""
    if not (done.is_file() and all(p.exists() for p in outputs)):
        return False
    if done.read_text().strip() != printable(cmd):
        raise ConfigError(f"{done.parent} was made by a different command ({name}); the options changed since. "
                          f"Use a new output_dir (or delete {done.parent}) to start over.\n  recorded: "
                          f"{done.read_text().strip()}\n  now:      {printable(cmd)}")
    print(f"[rejection-sampling] {name}: done, skipped ({', '.join(map(str, outputs))})", flush=True)
    return True


def run_step(name: str, cmd: list[str], done: Path, outputs: Sequence[Path], extra: Sequence[str] = (),
             in_process: Callable[[], object] | None = None) -> None:
    """Print ``cmd`` and run it (``extra`` flags are added to the call but not to the ``done`` record); a failure,
    or ``outputs`` missing after it, stops the run with the command line. ``in_process`` does what ``cmd`` would, in
    this process (the selection: a pure function, not worth a ~9 s interpreter start)."""
    print(f"\n[rejection-sampling] {name}: {printable([*cmd, *extra])}", flush=True)
    start = time.perf_counter()
    if in_process is not None:
        in_process()
    elif (result := subprocess.run([*cmd, *extra])).returncode != 0:
        sys.exit(f"[rejection-sampling] {name} failed (exit status {result.returncode}); its output is above. "
                 f"Rerun it alone with:\n  {printable([*cmd, *extra])}")
    if missing := [str(p) for p in outputs if not p.exists()]:
        sys.exit(f"[rejection-sampling] {name} ended without writing {', '.join(missing)}. Rerun it alone with:\n  "
                 f"{printable([*cmd, *extra])}")
    done.write_text(printable(cmd) + "\n")
    print(f"[rejection-sampling] {name}: finished in {time.perf_counter() - start:.0f} s", flush=True)


def run_round(cfg: RejectionSamplingConfig, k: int, policy: str, rerun: bool) -> tuple[str, dict[str, Any], bool]:
    """Round ``k`` (1-based) from ``policy``: returns the fine-tuned export, the selection statistics and whether
    any step ran. Once a step runs (or ``rerun``: an earlier round changed the policy), every later one runs too."""
    out = Path(cfg.output_dir) / f"round-{k}"
    out.mkdir(parents=True, exist_ok=True)
    samples, scores, data, run_dir = out / "samples.jsonl", out / "scores.jsonl", out / "sft.jsonl", out / "sft"
    tag = f"round {k}/{cfg.rounds}"
    cmd = generate_command(cfg, policy, samples, cfg.seed + k - 1)
    if rerun or not finished(f"{tag} generate", cmd, out / ".generate.done", [samples]):
        # a killed generation resumes by itself; after a new policy it must start over
        run_step(f"{tag} generate", cmd, out / ".generate.done", [samples],
                 ["--trainer.callbacks.init_args.overwrite", "true"] if rerun else [])
        rerun = True
    cmd = score_command(cfg, samples, scores)
    if rerun or not finished(f"{tag} score", cmd, out / ".score.done", [scores]):
        run_step(f"{tag} score", cmd, out / ".score.done", [scores])
        rerun = True
    cmd = select_command(cfg, scores, data)
    if rerun or not finished(f"{tag} select", cmd, out / ".select.done", [data, out / "selection.json"]):
        run_step(f"{tag} select", cmd, out / ".select.done", [data, out / "selection.json"],
                 in_process=lambda: select_file(scores, data, cfg.selection, cfg.threshold, cfg.dedup))
        rerun = True
    cmd = sft_command(cfg, policy, data, run_dir, "messages" in json.loads(data.read_text().partition("\n")[0]))
    if rerun or not finished(f"{tag} sft", cmd, out / ".sft.done", [run_dir / "hf"]):
        if run_dir.exists():  # a killed run's, or made from older data: start over
            print(f"[rejection-sampling] {tag} sft: removing the unfinished or outdated {run_dir}", flush=True)
            shutil.rmtree(run_dir)
        run_step(f"{tag} sft", cmd, out / ".sft.done", [run_dir / "hf"])
        rerun = True
    return str(run_dir / "hf"), json.loads((out / "selection.json").read_text()), rerun


def rejection_sampling(cfg: RejectionSamplingConfig) -> list[dict[str, Any]]:
    """Run every round; print and write (``<output_dir>/summary.json``) each round's selection statistics."""
    check_config(cfg)
    policy, summary, rerun = cfg.policy, [], False
    for k in range(1, cfg.rounds + 1):
        start_policy = policy
        policy, stats, rerun = run_round(cfg, k, policy, rerun)
        summary.append({"round": k, "policy": start_policy, "export": policy} | stats)
    out = Path(cfg.output_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    link = out / "hf"  # the final policy at <output_dir>/hf, where every other stage puts its export
    if link.is_symlink():
        link.unlink()
    if not link.exists():
        link.symlink_to(Path(policy).relative_to(out), target_is_directory=True)
    print("\n[rejection-sampling] round | prompts | samples | kept | mean score: all / best-of-n / kept")
    for s in summary:
        print(f"[rejection-sampling] {s['round']} | {s['prompts']} | {s['samples']} | {s['selected']} | "
              f"{s['mean_score_all']:.3f} / {s['mean_score_best']:.3f} / {s['mean_score_selected']:.3f}")
    print(f"[rejection-sampling] final policy: {policy} (linked as {link})", flush=True)
    return summary


def parser_class() -> type:
    """jsonargparse's parser reporting a bad option in one line, like the Lightning subcommands
    (:class:`~rlhf_lightning.cli.RLHFArgumentParser`), with the module docstring's layout kept in ``--help``."""
    from argparse import RawDescriptionHelpFormatter

    from jsonargparse import ArgumentParser, DefaultHelpFormatter

    from rlhf_lightning.cli import short_parse_error, verbose

    class Formatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
        pass

    class Parser(ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, formatter_class=Formatter, **kwargs)

        def error(self, message: str, ex: Exception | None = None) -> None:
            if not self.exit_on_error or verbose():
                super().error(message, ex)
            sys.stderr.write(f"error: {short_parse_error(message)} (--help lists the options)\n")
            sys.exit(2)

    return Parser


def main(argv: list[str]) -> None:
    """``rejection-sampling --config x.yaml`` (all rounds) or ``rejection-sampling select ...`` (one selection)."""
    from jsonargparse import ActionConfigFile

    ArgumentParser = parser_class()  # noqa: N806
    if argv and argv[0] == "select":
        parser = ArgumentParser(prog="python -m rlhf_lightning rejection-sampling select",
                                description="Keep the best-scoring sample(s) of each prompt as SFT rows.")
        parser.add_function_arguments(select_file)
        args = parser.parse_args(argv[1:])
        stats = select_file(Path(args.scores), Path(args.output), args.selection, args.threshold, args.dedup)
        print(f"[rejection-sampling] kept {stats['selected']} of {stats['samples']} samples "
              f"({stats['prompts']} prompts) -> {args.output}; mean score: all {stats['mean_score_all']:.3f}, "
              f"kept {stats['mean_score_selected']:.3f}", flush=True)
        return
    parser = ArgumentParser(prog="python -m rlhf_lightning rejection-sampling", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(RejectionSamplingConfig)
    args = parser.parse_args(argv)
    rejection_sampling(RejectionSamplingConfig(**{k: v for k, v in vars(args).items() if k != "config"}))
