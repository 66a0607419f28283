"""Rollout decoding engines on one model: which one the rollout path should use, measured.

    python benchmarks/bench_decode.py --model smollm2                  # SmolLM2-135M, the GRPO benchmark's shapes
    python benchmarks/bench_decode.py --model tiny --engines ours static

Every engine samples the same ``n`` completions of exactly ``max_new_tokens`` tokens (EOS suppressed) for the same
prompts, fp32, in a fresh child process per engine and repeat (engines interleaved); the first call of each process
is a warm-up, the median of the next ``--calls`` calls is its time. Engines:

- ``ours``: :func:`rlhf_lightning.generation.generate_responses`, what the rollouts use (``generate`` with the
  dynamic KV cache, one prefill per distinct prompt shared by its ``n`` rows);
- ``static``: the same with ``cache_implementation="static"`` (a preallocated cache of fixed shape);
- ``static-compiled``: the static cache with the decode step compiled by ``torch.compile`` (the compile time is
  reported apart; on CPU it takes minutes, so it is not in the default set);
- ``continuous``: transformers' continuous batching (``model.generate_batch``, paged KV cache,
  ``attn_implementation="paged|sdpa"``), the engine ``transformers serve`` uses.

Reports generated tokens/s, time per decode step and each child's peak RSS (``wait4``) to
``benchmarks/results/decode_<model>_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ENV, REPO_ROOT, SMOLLM2, build_model, machine, now, versions, write_report  # noqa: E402

MODELS = {"tiny": {}, "smollm2": SMOLLM2}
ENGINES = ("ours", "static", "static-compiled", "continuous")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine in this process: a warm-up call, then ``calls`` timed calls."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from rlhf_lightning.generation import generate_responses

    torch.set_num_threads(spec["threads"])
    engine, n, new = spec["engine"], spec["n"], spec["max_new_tokens"]
    attention = "paged|sdpa" if engine == "continuous" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                 attn_implementation=attention).eval()
    extra = {"min_new_tokens": new}
    if engine.startswith("static"):
        extra["cache_implementation"] = "static"
    if engine == "static-compiled":
        model.forward = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
    eos, pad = model.config.eos_token_id, spec["pad_token_id"]
    eos = eos if isinstance(eos, list) else [eos]

    def call(seed: int) -> int:
        with torch.no_grad():
            if engine == "continuous":
                config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0,
                                          top_p=1.0, top_k=0, eos_token_id=eos, pad_token_id=pad,
                                          num_return_sequences=n)
                torch.manual_seed(seed)
                out = model.generate_batch(spec["prompts"], generation_config=config, progress_bar=False)
                return sum(len(o.generated_tokens) for o in out.values())
            rows = generate_responses(model, spec["prompts"], n, new, 1.0, 1.0, 0, eos, pad, extra, seed=seed)
            return sum(len(r) for r in rows)

    start = time.perf_counter()
    call(0)
    first_call_s = time.perf_counter() - start
    times, tokens = [], []
    for seed in range(1, spec["calls"] + 1):
        start = time.perf_counter()
        tokens.append(call(seed))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"engine": engine, "seconds": seconds, "first_call_s": first_call_s, "tokens": tokens,
            "tokens_per_s": tokens[0] / seconds, "ms_per_decode_step": 1000 * seconds / new}


def run_child(spec: dict[str, Any], result_file: Path) -> dict[str, Any]:
    code = (f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_decode as b; "
            f"open({str(result_file)!r}, 'w').write(json.dumps(b.child(json.loads({json.dumps(spec)!r}))))")
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"engine {spec['engine']} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return json.loads(result_file.read_text()) | {"peak_rss_mib": usage.ru_maxrss / 1024}


def markdown(report: dict[str, Any]) -> str:
    c, s = report["config"], report["summary"]
    lines = [f"### Decoding engines, model `{c['model']}` ({report['n_params'] / 1e6:.1f}M parameters), {c['device']}, "
             "fp32", "",
             f"{report['date']}; {report['machine']}. Command: `{report['command']}`. {len(c['prompts'])} prompts of "
             f"{len(c['prompts'][0])} tokens x n={c['n']}, exactly {c['max_new_tokens']} new tokens each, "
             f"{c['threads']} threads; median over {c['repeats']} fresh processes x {c['calls']} calls after a "
             "warm-up call.", "",
             "| engine | tokens/s | ms per decode step | vs ours | first call s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for engine, m in s.items():
        lines.append(f"| {engine} | {m['tokens_per_s']:,.1f} | {m['ms_per_decode_step']:,.1f} | "
                     f"{m['tokens_per_s'] / s['ours']['tokens_per_s']:.2f}x | {m['first_call_s']:,.1f} | "
                     f"{m['peak_rss_mib']:,.0f} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=["ours", "static", "continuous"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per engine")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per process, after one warm-up call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if "ours" not in args.engines:
        parser.error("--engines must include ours (the baseline of the ratios)")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, description = build_model(str(REPO_ROOT), MODELS[args.model], str(Path(tmp) / "model"))
        vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
        prompts = [[vocab[(97 * p + 31 * t) % len(vocab)] for t in range(args.prompt_len)]
                   for p in range(args.prompts)]
        spec = {"model_dir": str(Path(tmp) / "model"), "prompts": prompts, "n": args.n,
                "max_new_tokens": args.max_new_tokens, "calls": args.calls, "threads": args.threads,
                "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0}
        runs: dict[str, list[dict[str, Any]]] = {engine: [] for engine in args.engines}
        for repeat in range(args.repeats):
            for engine in args.engines:
                result = run_child(spec | {"engine": engine}, Path(tmp) / f"{engine}-{repeat}.json")
                print(f"[decode] {engine} repeat {repeat}: {result['tokens_per_s']:.1f} tokens/s, "
                      f"{result['peak_rss_mib']:,.0f} MiB", flush=True)
                runs[engine].append(result)
    summary = {engine: {key: statistics.median(r[key] for r in rs) for key in
                        ("tokens_per_s", "ms_per_decode_step", "first_call_s", "peak_rss_mib")}
               for engine, rs in runs.items()}
    report = {"date": now(), "machine": machine(), "versions": versions(), "n_params": description["n_params"],
              "command": "python benchmarks/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": vars(args) | {"device": "cpu", "prompts": prompts}, "runs": runs, "summary": summary}
    path = write_report(report, args.out, f"decode_{args.model}_cpu", markdown(report))
    print(markdown(report), f"\n[decode] wrote {path}.json/.md", sep="")
    return report


if __name__ == "__main__":
    main()
