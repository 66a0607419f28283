"""Batch generation tokens/s: this project's ``predict`` path against a plain ``transformers`` ``generate`` loop.

    python benchmarks/bench_generate.py                    # tiny model (0.2M parameters), CPU, ~2 minutes on 2 cores
    python benchmarks/bench_generate.py --model small      # a 26M-parameter random Llama: a more meaningful ratio
    python benchmarks/bench_generate.py --model-dir DIR    # any saved HF model, e.g. SmolLM2-135M converted from GGUF

Both sides run in fresh child processes (alternating, ``--repeats`` times each) on the same saved weights, the same
prompts (chat template), the same batch size (prompts per batch, each sampled ``n`` times), the same sampling
settings and ``max_new_tokens``:

- ``ours``: ``python -m rlhf_lightning predict --config configs/tiny/generate.yaml`` (Lightning's predict loop,
  ``Generator`` -> ``GenerationWorker.generate`` with per-prompt seeds, the jsonl writer); its time is the predict
  loop's wall time from ``<output>.meta.json`` (start-up and model loading excluded on both sides);
- ``hf``: tokenize with left padding, ``model.generate(do_sample=True, num_return_sequences=n, ...)``, decode.

Ours prefills each prompt once for its ``n`` samples (``rlhf_lightning.generation.shared_prefill``); the plain loop
(like ``generate_responses`` before it) runs the prompt through the model once per sample.

Tokens are the generated tokens up to and including the first EOS, per side; peak RSS is each child's
(``wait4``). Results go to ``benchmarks/results/generate_<model>_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ENV, REPO_ROOT, SMOLLM2, SMOLLM2_ARCH, build_model, machine, now, versions, write_report  # noqa: E402

MODELS = {"tiny": {}, "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
                                 "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64},
          "smollm2": SMOLLM2, "smollm2-arch": SMOLLM2_ARCH}


def describe_model(model_dir: str) -> dict[str, Any]:
    """Parameter count and shape of a saved model (for the report), read without loading its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {"n_params": sum(p.numel() for p in model.parameters()), "model_dir": str(model_dir),
            "n_layers": config.num_hidden_layers, "hidden_size": config.hidden_size}


def hf_side(spec: dict[str, Any]) -> dict[str, Any]:
    """The plain loop (child process): batches of ``batch_size`` prompts, ``n`` return sequences each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).to(spec["device"]).eval()
    prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts"]).read_text().splitlines()]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    torch.manual_seed(0)
    tokens, started = 0, time.perf_counter()
    for start in range(0, len(texts), spec["batch_size"]):
        batch = tokenizer(texts[start:start + spec["batch_size"]], add_special_tokens=False, padding=True,
                          return_tensors="pt").to(spec["device"])
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=spec["temperature"], top_p=1.0, top_k=0,
                                 max_new_tokens=spec["max_new_tokens"], num_return_sequences=spec["n"],
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            tokens += next((i + 1 for i, t in enumerate(row) if t == tokenizer.eos_token_id), len(row))
        tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    seconds = time.perf_counter() - started
    return {"new_tokens": tokens, "responses": len(texts) * spec["n"], "seconds": seconds}


def ours_command(spec: dict[str, Any], output: Path) -> list[str]:
    return [sys.executable, "-m", "rlhf_lightning", "predict", "--config", "configs/tiny/generate.yaml",
            "--model.init_args.model", spec["model_dir"], "--data.init_args.path", spec["prompts"],
            "--data.init_args.label_key", "null", "--data.init_args.batch_size", str(spec["batch_size"]),
            "--data.init_args.max_prompt_len", "1024", "--model.init_args.n", str(spec["n"]),
            "--model.init_args.temperature", str(spec["temperature"]),
            "--model.init_args.max_new_tokens", str(spec["max_new_tokens"]),
            "--trainer.accelerator", "gpu" if spec["device"] == "cuda" else "cpu",
            "--trainer.callbacks.init_args.output", str(output),
            "--trainer.callbacks.init_args.overwrite", "true", "--trainer.enable_progress_bar", "false"]


def run_child(cmd: list[str], threads: int) -> tuple[int, float]:
    """Run ``cmd``; return (exit status, peak RSS in MiB of the child, from ``wait4``)."""
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.stderr.write(proc.stderr.read().decode()[-3000:])
    return status, usage.ru_maxrss / 1024


def run_side(side: str, spec: dict[str, Any], workdir: Path, repeat: int) -> dict[str, Any]:
    if side == "ours":
        output = workdir / f"ours-{repeat}.jsonl"
        status, rss = run_child(ours_command(spec, output), spec["threads"])
        result = json.loads(output.with_name(output.name + ".meta.json").read_text()) if status == 0 else {}
    else:
        result_file = workdir / f"hf-{repeat}.json"
        code = (f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_generate as b; "
                f"open({str(result_file)!r}, 'w').write(json.dumps(b.hf_side(json.loads({json.dumps(spec)!r}))))")
        status, rss = run_child([sys.executable, "-c", code], spec["threads"])
        result = json.loads(result_file.read_text()) if status == 0 else {}
    if status != 0:
        raise RuntimeError(f"{side} run {repeat} failed")
    tokens, seconds = result["new_tokens"], result["seconds"]
    return {"new_tokens": tokens, "responses": result["responses"], "seconds": seconds,
            "tokens_per_s": tokens / seconds, "samples_per_s": result["responses"] / seconds, "peak_rss_mib": rss}


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize_runs(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per side: min/median/max of each measure; ours also gets ``ratio_vs_trl`` against the plain loop (the shape
    ``run_all.py`` reads; the counterpart here is plain transformers, not TRL)."""
    summary = {side: {k: stats([r[k] for r in rs]) for k in rs[0]} for side, rs in runs.items()}
    paired = [o["tokens_per_s"] / h["tokens_per_s"] for o, h in zip(runs["ours"], runs["hf"], strict=True)]
    summary["ours"]["ratio_vs_trl"] = {"trl_side": "hf", "paired": stats(paired) | {"values": paired},
                                       "of_medians": summary["ours"]["tokens_per_s"]["median"]
                                       / summary["hf"]["tokens_per_s"]["median"]}
    return summary


def markdown(report: dict[str, Any]) -> str:
    s, c = report["summary"], report["config"]
    model = c.get("name") or c.get("model_dir") or c["model"]
    lines = [f"### Batch generation, model `{model}` ({report['model']['n_params'] / 1e6:.1f}M parameters), "
             f"{c['device']}", "",
             f"{report['date']}; {report['machine']}. Command: `{report['command']}`. {c['prompts']} prompts x n="
             f"{c['n']}, {c['batch_size']} prompts per batch, temperature {c['temperature']}, max_new_tokens "
             f"{c['max_new_tokens']}; median of {c['repeats']} fresh processes per side.", "",
             "| side | tokens/s | samples/s | new tokens | peak RSS MiB |", "|---|---:|---:|---:|---:|"]
    for side in ("ours", "hf"):
        m = {k: v["median"] for k, v in s[side].items() if k != "ratio_vs_trl"}
        lines.append(f"| {side} | {m['tokens_per_s']:,.0f} | {m['samples_per_s']:,.1f} | {m['new_tokens']:,.0f} | "
                     f"{m['peak_rss_mib']:,.0f} |")
    ratio = s["ours"]["ratio_vs_trl"]
    lines += ["", f"ours / hf tokens/s: **{ratio['of_medians']:.2f}x** (per repeat: "
              + ", ".join(f"{r:.2f}" for r in ratio["paired"]["values"]) + ")", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--model-dir", help="a saved HF model (with tokenizer and chat template) instead of --model")
    parser.add_argument("--name", help="results name (default: --model, or the --model-dir folder's name)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch (each sampled n times)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--dtype", choices=["fp32"], default="fp32", help="(run_all.py passes it; fp32 only)")
    args, ignored = parser.parse_known_args(argv)  # run_all.py's --steps/--warmup/--peak-tflops do not apply
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = workdir / "model"
        if args.model_dir:
            model_dir, model_info = Path(args.model_dir), describe_model(args.model_dir)
        else:
            _, model_info = build_model(str(REPO_ROOT), MODELS[args.model], str(model_dir))
        rng = random.Random(0)
        prompts = workdir / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": "reverse: " + " ".join(
            rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 24)))}) + "\n"
            for _ in range(args.prompts)))
        spec = {"model_dir": str(model_dir), "prompts": str(prompts), "n": args.n, "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "device": args.device,
                "threads": args.threads}
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "hf": []}
        for repeat in range(args.repeats):
            for side in ("ours", "hf") if repeat % 2 == 0 else ("hf", "ours"):
                runs[side].append(run_side(side, spec, workdir, repeat))
                print(f"[bench_generate] {side} #{repeat}: {runs[side][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    summary = summarize_runs(runs)
    report = {"date": now(), "machine": machine(), "versions": versions(), "config": vars(args),
              "command": " ".join(["python benchmarks/bench_generate.py", *(sys.argv[1:] if argv is None else argv)]),
              "model": model_info, "runs": runs, "summary": summary}
    table = markdown(report)
    name = args.name or (Path(args.model_dir).name if args.model_dir else args.model)
    write_report(report, args.out, f"generate_{name}_{args.device}", table)
    print("\n" + table, flush=True)
    return report


if __name__ == "__main__":
    main()
