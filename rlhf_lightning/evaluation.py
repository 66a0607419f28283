"""Evaluate policies on a prompt set: RM win rate against a baseline, pass@k and mean reward under reward functions.

    python -m rlhf_lightning evaluate --config configs/tiny/evaluate.yaml
    python -m rlhf_lightning evaluate --config configs/tiny/evaluate.yaml --baseline ppo --pass_at_k.n 16

For every model in ``models`` (one loaded at a time) the prompts are rendered as ``PromptDataModule`` renders them
for PPO and answered through the rollout workers' generation path (``GenerationWorker.generate``): one greedy
answer each (``generation``; temperature 0 by default) and, with ``pass_at_k.n > 0``, ``n`` sampled ones. Then

- **mean reward** of the greedy answers per source (the reward model's normalised score, each reward function) and
  combined as PPO combines them (``reward_weights``, ``reward_clip``);
- **win rate** of each model against ``baseline`` (default: the first model), judged by the reward model on the
  same prompts: a prompt is a win, a tie (``|score difference| <= tie_margin``; identical answers always tie) or a
  loss; win rate = (wins + ties / 2) / N with a 95% confidence interval (:mod:`rlhf_lightning.eval_stats`);
- **pass@k** of the sampled answers under each reward function, a sample passing when its reward is
  ``>= pass_at_k.threshold`` (Chen et al. 2021's unbiased estimator, averaged over prompts).

Written to ``output_dir``: ``results.json`` (everything, per-prompt answers, scores and outcomes included unless
``save_per_prompt: false``), ``results.md`` (the tables, also printed) and ``results.png`` (bar charts). Mistakes in
the config (a missing model or prompt file, an unknown reward function, ``k > n``, a win rate without a reward
model, a baseline that is not a model) stop the command with one line before any model loads.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from rlhf_lightning.errors import ConfigError
from rlhf_lightning.eval_stats import mean_pass_at_k, outcomes, win_rate
from rlhf_lightning.eval_steps import (
    PromptSet,
    RewardModelScorer,
    Sampling,
    encode_prompts,
    generate_texts,
    load_prompt_records,
)
from rlhf_lightning.models import check_model_path, has_score_head, load_tokenizer


@dataclass
class ModelSpec:
    """A policy to evaluate: ``name`` (in tables) and ``path`` (an export directory, hub id or ``tiny-llama``)."""

    name: str
    path: str


@dataclass
class PassAtK:
    """Sampled answers for pass@k: ``n`` per prompt (0: no pass@k), ``k`` values (each <= n), the sampling options
    (the others, ``max_new_tokens`` included, are ``generation``'s), and the reward (of each reward function) at or
    above which a sample passes."""

    n: int = 0
    k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    threshold: float = 1.0


@dataclass
class EvalConfig:
    """Options of ``python -m rlhf_lightning evaluate`` (see the module docstring).

    Args:
        models: the policies, each ``{name: ..., path: ...}``.
        prompts: the prompt file and how to render it (keys, chat template or ``input_template``, ``max_samples``).
        baseline: name of the model the others are compared with (default: the first).
        generation: options of the greedy (``temperature: 0``) answers judged by win rate and mean reward.
        pass_at_k: sampled answers for pass@k (``n: 0`` turns it off).
        reward_model: a reward-model export; its normalised score judges the win rate.
        reward_functions: ``module:function`` or ``file.py:function`` rules, as in PPO.
        reward_weights: weight of each source (reward model first, then functions) in the combined reward.
        reward_clip: bound of the combined reward (as PPO's ``reward_clip``).
        win_rate: compare against ``baseline``; ``null``: whenever there is a reward model and two models.
        tie_margin: score differences up to this are ties (0: only equal scores).
        ci_method: ``wilson`` (score interval, ties as half wins) or ``normal`` (on the per-prompt mean).
        confidence: level of the win-rate interval.
        seed: seed of the sampled answers (each prompt samples from its own seed, derived from this one and its file
            and line as batch generation derives it, so samples do not depend on ``batch_size``).
        device: ``cuda``, ``cpu``... (default: a GPU if there is one).
        dtype: weights' dtype (``float32``, ``bf16``...).
        batch_size: prompts generated (and sequences scored) per batch.
        output_dir: where results.json, results.md and results.png go.
        save_per_prompt: keep every prompt's answers, scores and outcomes in results.json.
    """

    models: list[ModelSpec] = field(default_factory=list)
    prompts: PromptSet = field(default_factory=PromptSet)
    baseline: str | None = None
    generation: Sampling = field(default_factory=Sampling)
    pass_at_k: PassAtK = field(default_factory=PassAtK)
    reward_model: str | None = None
    reward_functions: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    reward_clip: float | None = None
    win_rate: bool | None = None
    tie_margin: float = 0.0
    ci_method: Literal["wilson", "normal"] = "wilson"
    confidence: float = 0.95
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    batch_size: int = 32
    output_dir: str = "runs/eval"
    save_per_prompt: bool = True


def check_config(config: EvalConfig) -> dict[str, Any]:
    """Every check that needs no model: raise a :class:`UserError` naming the option, or return what the run needs
    (prompt records, reward functions, the baseline's name, whether a win rate is computed, source names)."""
    from rlhf_lightning.rollout.rewards import load_reward_fn, source_names

    if not config.models:
        raise ConfigError("models is empty: list the policies to evaluate, e.g. models: [{name: sft, path: ...}].")
    names = [m.name for m in config.models]
    if len(set(names)) < len(names) or not all(names):
        raise ConfigError(f"models[*].name must be distinct and non-empty; got {names}.")
    for i, spec in enumerate(config.models):
        check_model_path(spec.path, option=f"models[{i}].path")
    baseline = config.baseline or names[0]
    if baseline not in names:
        raise ConfigError(f"baseline='{baseline}' is not among the models {names}: set it to one of their names.")
    if config.reward_model is None and not config.reward_functions:
        raise ConfigError("Nothing to measure: set reward_model (win rate, mean score) and/or reward_functions "
                          "(mean reward, pass@k).")
    if config.reward_model is not None:
        check_model_path(config.reward_model, option="reward_model")
        if has_score_head(config.reward_model) is False:
            raise ConfigError(f"reward_model='{config.reward_model}' has no score head (a causal LM?): point it at a "
                              f"reward-model export (e.g. runs/tiny-rm/hf).")
    wants_win_rate = config.win_rate if config.win_rate is not None else (
        config.reward_model is not None and len(names) > 1)
    if wants_win_rate and config.reward_model is None:
        raise ConfigError("win_rate needs a judge: set reward_model to a reward-model export, or win_rate: false.")
    if wants_win_rate and len(names) < 2:
        raise ConfigError("win_rate needs at least two models (one is the baseline), or set win_rate: false.")
    fns = []
    for i, spec in enumerate(config.reward_functions):
        try:
            fns.append(load_reward_fn(spec))
        except (ValueError, OSError, ImportError, AttributeError) as err:
            raise ConfigError(f"reward_functions[{i}]='{spec}' cannot be loaded: {err}") from err
    sources = source_names([config.reward_model] if config.reward_model else [], config.reward_functions, None)
    if config.reward_weights is not None and len(config.reward_weights) != len(sources):
        raise ConfigError(f"reward_weights has {len(config.reward_weights)} values for {len(sources)} reward "
                          f"sources {sources} (reward model first, then reward_functions).")
    checks = {"tie_margin": (config.tie_margin, config.tie_margin >= 0),
              "batch_size": (config.batch_size, config.batch_size >= 1),
              "confidence": (config.confidence, 0 < config.confidence < 1),
              "generation.max_new_tokens": (config.generation.max_new_tokens, config.generation.max_new_tokens >= 1),
              "pass_at_k.n": (config.pass_at_k.n, config.pass_at_k.n >= 0)}
    for option, (value, ok) in checks.items():
        if not ok:
            raise ConfigError(f"{option}={value} is out of range (tie_margin >= 0, confidence in (0, 1), others "
                              f">= 1; pass_at_k.n >= 0).")
    check_pass_at_k(config.pass_at_k, config.reward_functions)
    if Path(config.output_dir).exists() and not Path(config.output_dir).is_dir():
        raise ConfigError(f"output_dir='{config.output_dir}' is a file: point output_dir at a directory.")
    records = load_prompt_records(config.prompts)
    encode_prompts(records, load_tokenizer(check_model_path(config.models[0].path)), config.prompts)  # bad rows
    fn_names = sources[len(sources) - len(fns):]  # the functions' names come after the reward model's
    return {"records": records, "reward_fns": list(zip(fn_names, fns, strict=True)),
            "baseline": baseline, "win_rate": wants_win_rate, "sources": sources}


def check_pass_at_k(options: PassAtK, reward_functions: list[str]) -> None:
    """pass@k needs rule rewards, k values in [1, n], and sampling (identical greedy samples would make pass@k
    equal pass@1)."""
    if options.n == 0:
        return
    if not reward_functions:
        raise ConfigError("pass_at_k.n > 0 needs reward_functions (a sample passes when its reward >= "
                          "pass_at_k.threshold); add one or set pass_at_k.n: 0.")
    bad = [k for k in options.k if not 1 <= k <= options.n]
    if bad or not options.k:
        raise ConfigError(f"pass_at_k.k={options.k}: every k must be between 1 and pass_at_k.n={options.n} "
                          f"(pass@k draws k of the n samples); lower k or raise n.")
    if options.n > 1 and options.temperature <= 0:
        raise ConfigError("pass_at_k.temperature must be > 0 when pass_at_k.n > 1 (greedy samples are identical).")


def run_evaluation(config: EvalConfig) -> dict[str, Any]:
    """Check ``config``, answer the prompts with every model, score the answers, compute the metrics and write the
    outputs; returns the content of results.json."""
    from rlhf_lightning.eval_report import write_outputs

    plan, started = check_config(config), time.perf_counter()
    records, sources, fns = plan["records"], plan["sources"], plan["reward_fns"]
    answers, samples, prompt_texts = generate_answers(config, records)
    scores = score_answers(config, records, answers, prompt_texts, sources, fns)
    results: dict[str, Any] = {
        "models": {m.name: m.path for m in config.models}, "baseline": plan["baseline"], "prompts": len(records),
        "reward_sources": sources,
        "mean_reward": {name: {s: sum(v) / len(v) for s, v in per.items()} for name, per in scores.items()}}
    per_prompt_outcomes = {}
    if plan["win_rate"]:
        judge, base = sources[0], scores[plan["baseline"]][sources[0]]  # the reward model comes first
        per_prompt_outcomes = {name: outcomes(per[judge], base, config.tie_margin)
                               for name, per in scores.items() if name != plan["baseline"]}
        results["win_rate"] = {name: {**win_rate(o, config.ci_method, config.confidence), "judge": judge}
                               for name, o in per_prompt_outcomes.items()}
    sample_scores = score_samples(config, records, samples, prompt_texts, fns)
    if sample_scores:
        results["pass_at_k"] = {name: {fn: {str(k): mean_pass_at_k(
            [[s >= config.pass_at_k.threshold for s in row] for row in rows], k) for k in config.pass_at_k.k}
            for fn, rows in per.items()} for name, per in sample_scores.items()}
    results["seconds"] = time.perf_counter() - started
    results["config"] = asdict(config)
    if config.save_per_prompt:
        results["per_prompt"] = [{
            **{key: r[key] for key in ("prompt", "label", "source_file", "source_line")},
            "answers": {m: answers[m][i] for m in answers},
            "scores": {m: {s: v[i] for s, v in scores[m].items()} for m in scores},
            **({"outcomes": {m: o[i] for m, o in per_prompt_outcomes.items()}} if per_prompt_outcomes else {}),
            **({"samples": {m: samples[m][i] for m in samples},
                "sample_scores": {m: {f: v[i] for f, v in per.items()} for m, per in sample_scores.items()}}
               if samples else {}),
        } for i, r in enumerate(records)]
    write_outputs(results, Path(config.output_dir))
    return results


def generate_answers(config: EvalConfig, records: list[dict[str, Any]]) -> tuple[dict, dict, dict]:
    """Per model name: the greedy answer to each prompt, ``pass_at_k.n`` sampled answers to each (when asked) and
    the prompt texts reward functions get. Models are loaded one at a time."""
    from rlhf_lightning.inference.generate import prompt_seed
    from rlhf_lightning.rollout.workers import GenerationWorker

    answers, samples, prompt_texts = {}, {}, {}
    pk = config.pass_at_k
    seeds = [prompt_seed(config.seed, r["source_file"], r["source_line"]) for r in records]  # as batch generation
    sampling = replace(config.generation, temperature=pk.temperature, top_p=pk.top_p, top_k=pk.top_k)
    for spec in config.models:
        tokenizer = load_tokenizer(check_model_path(spec.path))
        prompt_ids, prompt_texts[spec.name] = encode_prompts(records, tokenizer, config.prompts)
        worker = GenerationWorker(spec.path, dtype=config.dtype, device=config.device, seed=config.seed)
        answers[spec.name] = [r[0] for r in generate_texts(worker, tokenizer, prompt_ids, config.generation, 1,
                                                           config.batch_size, seeds, f"{spec.name} greedy")]
        if pk.n:
            samples[spec.name] = generate_texts(worker, tokenizer, prompt_ids, sampling, pk.n, config.batch_size,
                                                seeds, f"{spec.name} samples")
        del worker
        gc.collect()
    return answers, samples, prompt_texts


def score_answers(config: EvalConfig, records: list[dict[str, Any]], answers: dict[str, list[str]],
                  prompt_texts: dict[str, list[str]], sources: list[str],
                  fns: list[tuple[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per model and source (reward model, each function, ``combined`` as PPO combines them), each greedy answer's
    reward."""
    import torch

    from rlhf_lightning.rollout.rewards import checked_scores, combine_rewards

    scores: dict[str, dict[str, list[float]]] = {name: {} for name in answers}
    if config.reward_model is not None:
        scorer = RewardModelScorer(config.reward_model, config.prompts, config.device, config.dtype, config.batch_size)
        for name in answers:
            scores[name][sources[0]] = scorer([r["prompt"] for r in records], answers[name], f"{name} reward model")
        del scorer
    labels = [r["label"] for r in records]
    for name in answers:
        for fn_name, fn in fns:
            scores[name][fn_name] = checked_scores(fn, fn_name, prompt_texts[name], answers[name], labels)
        stacked = torch.tensor([scores[name][s] for s in sources], dtype=torch.float64)
        scores[name]["combined"] = combine_rewards(stacked, config.reward_weights, config.reward_clip).tolist()
    return scores


def score_samples(config: EvalConfig, records: list[dict[str, Any]], samples: dict[str, list[list[str]]],
                  prompt_texts: dict[str, list[str]], fns: list[tuple[str, Any]]) -> dict[str, dict[str, list]]:
    """Per model and reward function, the rewards of each prompt's sampled answers (one list per prompt)."""
    from rlhf_lightning.rollout.rewards import checked_scores

    n, out = config.pass_at_k.n, {}
    for name, texts in samples.items():
        prompts = [p for p in prompt_texts[name] for _ in range(n)]
        labels = [r["label"] for r in records for _ in range(n)]
        flat = [t for row in texts for t in row]
        out[name] = {}
        for fn_name, fn in fns:
            got = checked_scores(fn, fn_name, prompts, flat, labels)
            out[name][fn_name] = [got[i:i + n] for i in range(0, len(got), n)]
    return out


def parse_config(argv: list[str] | None) -> EvalConfig:
    """``--config file.yaml`` (repeatable) and dotted overrides (``--prompts.path``, ``--pass_at_k.k '[1,4]'``)
    into an :class:`EvalConfig`; ``--print_config`` prints the merged config and exits."""
    import argparse

    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """jsonargparse's help, with this module's docstring kept as written."""

    parser = ArgumentParser(prog="python -m rlhf_lightning evaluate", description=__doc__, formatter_class=Formatter)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config (configs/tiny/evaluate.yaml)")
    parser.add_class_arguments(EvalConfig, as_group=False)
    namespace = parser.instantiate(parser.parse_args(argv))
    return EvalConfig(**{key: value for key, value in vars(namespace).items() if key != "config"})


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m rlhf_lightning evaluate``."""
    results = run_evaluation(parse_config(argv))
    print(f"\nwritten: {Path(results['config']['output_dir']) / 'results.json'}, results.md, results.png")


if __name__ == "__main__":
    main()
