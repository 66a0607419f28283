"""Outputs of ``evaluate``: ``results.json``, markdown tables (``results.md``, also printed) and a bar chart
(``results.png``: win rate with its confidence interval, pass@k, mean reward per source)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def markdown_tables(results: dict[str, Any]) -> str:
    """The mean-reward, win-rate and pass@k tables of ``results`` (those that were computed)."""
    parts = [f"Evaluation on {results['prompts']} prompts."]
    means = results["mean_reward"]
    columns = list(next(iter(means.values()), {}))
    if columns:
        rows = [f"| {name} | " + " | ".join(f"{per[c]:.4f}" for c in columns) + " |" for name, per in means.items()]
        parts.append("\n".join([f"Mean reward of the greedy answers\n\n| model | {' | '.join(columns)} |",
                                "|---|" + "---:|" * len(columns), *rows]))
    if "win_rate" in results:
        first = next(iter(results["win_rate"].values()))
        level = f"{first['confidence']:.0%} CI ({first['ci_method']})"
        rows = [f"| {name} | {r['win_rate']:.1%} | [{r['ci_low']:.1%}, {r['ci_high']:.1%}] | {r['wins']} | "
                f"{r['ties']} | {r['losses']} |" for name, r in results["win_rate"].items()]
        parts.append("\n".join([
            f"Win rate against {results['baseline']}, judged by {first['judge']} (ties count half)\n",
            f"| model | win rate | {level} | wins | ties | losses |", "|---|---:|---|---:|---:|---:|", *rows]))
    if "pass_at_k" in results:
        ks = list(next(iter(next(iter(results["pass_at_k"].values())).values())))
        rows = [f"| {name} | {fn} | " + " | ".join(f"{by_k[k]:.1%}" for k in ks) + " |"
                for name, per in results["pass_at_k"].items() for fn, by_k in per.items()]
        parts.append("\n".join(["pass@k of sampled answers (unbiased estimator, Chen et al. 2021)\n\n"
                                "| model | reward function | " + " | ".join(f"pass@{k}" for k in ks) + " |",
                                "|---|---|" + "---:|" * len(ks), *rows]))
    return "\n\n".join(parts) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar charts, one panel each: win rate with CI error bars, pass@k per model, mean reward per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [key for key in ("win_rate", "pass_at_k", "mean_reward") if results.get(key)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        if key == "win_rate":
            names, rows = list(results["win_rate"]), list(results["win_rate"].values())
            rates = [r["win_rate"] for r in rows]
            errors = [[r["win_rate"] - r["ci_low"] for r in rows], [r["ci_high"] - r["win_rate"] for r in rows]]
            ax.bar(names, rates, yerr=errors, capsize=6, color="tab:blue")
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1)
            ax.set_title(f"win rate vs {results['baseline']} ({rows[0]['confidence']:.0%} CI)")
        else:
            groups = {name: {f"{fn} pass@{k}": v for fn, by_k in per.items() for k, v in by_k.items()}
                      for name, per in results["pass_at_k"].items()} if key == "pass_at_k" else results[key]
            grouped_bars(ax, groups)
            if key == "pass_at_k":
                ax.set_ylim(0, 1.35)  # room for the legend above the bars
            ax.set_title("pass@k" if key == "pass_at_k" else "mean reward (greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grouped_bars(ax: Any, groups: dict[str, dict[str, float]]) -> None:
    """One group of bars per model, one bar per series (e.g. ``exact_match pass@4``), with a legend."""
    series = list(next(iter(groups.values())))
    width = 0.8 / max(len(series), 1)
    for i, label in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [per[label] for per in groups.values()], width, label=label)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.legend(fontsize="small", ncol=2, loc="upper left")


def write_outputs(results: dict[str, Any], out_dir: Path) -> None:
    """Write results.json, results.md and results.png into ``out_dir`` and print the tables."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    tables = markdown_tables(results)
    (out_dir / "results.md").write_text(tables)
    plot(results, out_dir / "results.png")
    print("\n" + tables)
