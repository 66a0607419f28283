"""The benchmark harness's arithmetic and summary table (the benchmarks themselves run under benchmarks/)."""

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import common  # noqa: E402
import run_all  # noqa: E402


def test_mfu_by_hand():
    # 1B parameters, 16 layers of width 2048, 1024-token samples: 6e9 + 12*16*2048*1024 = 6.4027e9 FLOP per token.
    flops = common.training_flops_per_token(10**9, 16, 2048, 1024)
    assert flops == 6e9 + 12 * 16 * 2048 * 1024
    # 50k tokens/s on a 989 TFLOP/s GPU.
    assert common.mfu(50_000, flops, 989.0) == pytest.approx(50_000 * flops / 989e12)
    assert common.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert common.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert common.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert common.peak_tflops("Some Future GPU") is None


def test_forward_flops_and_the_measured_matmul_peak():
    # The forward pass is a third of training's 6N + 12·L·H·T: 2N + 4·L·H·T.
    assert common.forward_flops_per_token(10**9, 16, 2048, 1024) == pytest.approx(2e9 + 4 * 16 * 2048 * 1024)
    peak = common.measure_matmul_peak("cpu", "fp32", threads=1, size=256, repeats=2)
    assert peak["size"] == 256 and 1e-4 < peak["tflops"] < 100  # a real timing, between 0.1 GFLOP/s and 100 TFLOP/s


def test_dpo_and_grpo_count_the_model_flops_each_side_does():
    import bench_dpo
    import bench_grpo

    prepared = {"n_params": 1000, "n_layers": 2, "hidden_size": 8, "tokens_per_sequence": 10}
    train, forward = 6 * 1000 + 12 * 2 * 8 * 10, 2 * 1000 + 4 * 2 * 8 * 10
    assert bench_dpo.flops_per_token(prepared, "ours-cached-auto") == pytest.approx(train)
    assert bench_dpo.flops_per_token(prepared, "trl-live") == pytest.approx(train + forward)
    # 2 prompts of 4 tokens, 3 samples each, 5 new tokens: prefill 2 x 4 tokens once, 6 x 5 decoded tokens, and
    # training over 6 sequences of 9 tokens.
    args = type("Args", (), {"prompt_len": 4, "max_new_tokens": 5, "prompts_per_step": 2, "n_samples": 3})()
    flops = bench_grpo.step_flops(args, prepared)
    fwd9, train9 = 2 * 1000 + 4 * 2 * 8 * 9, 6 * 1000 + 12 * 2 * 8 * 9
    assert flops["generate"] == pytest.approx(fwd9 * (2 * 4 + 6 * 5))
    assert flops["train"] == pytest.approx(train9 * 6 * 9) and flops["step"] == flops["generate"] + flops["train"]


def side(value, rss, unit="tokens_per_s", ratio=None, mfu=None):
    summary = {unit: {"min": value, "median": value, "max": value}, "peak_rss_mib": {"median": rss},
               "mfu_measured_peak": {"median": value / 1000}}
    if ratio:
        summary["ratio_vs_trl"] = ratio
    if mfu is not None:
        summary["mfu"] = {"median": mfu}
    return summary


def test_summary_rows_and_table_pair_each_of_our_sides_with_its_trl_counterpart():
    ratio = {"of_medians": 1.5, "paired": {"min": 1.4, "max": 1.6}}
    sft = {"summary": {"ours-auto": side(150.0, 900, ratio=ratio, mfu=0.3), "trl": side(100.0, 1000, mfu=0.2)},
           "runs": {"ours-auto": [{"peak_cuda_mib": 10.0}, {"peak_cuda_mib": 12.0}], "trl": [{"peak_cuda_mib": 20.0}]}}
    dpo = {"summary": {"ours-cached-auto": side(6.0, 800, "pairs_per_s", {**ratio, "trl_side": "trl-cached"}),
                       "trl-cached": side(4.0, 700, "pairs_per_s"), "trl-live": side(3.0, 700, "pairs_per_s")},
           "runs": {"ours-cached-auto": [{}], "trl-cached": [{}], "trl-live": [{}]}}
    rows = run_all.comparison_rows("sft", sft, "tokens_per_s") + run_all.comparison_rows("dpo", dpo, "pairs_per_s")
    assert [(r["ours"], r["trl"]) for r in rows] == [("ours-auto", "trl"), ("ours-cached-auto", "trl-cached")]
    assert rows[0]["ours_peak_cuda_mib"] == 11.0 and rows[0]["ours_mfu"] == 0.3 and rows[1]["trl_value"] == 4.0
    summary = {"date": "2026-11-27", "machine": "test machine", "versions": {"torch": "x"}, "command": "cmd",
               "config": {"model": "tiny", "device": "cuda", "dtype": "bf16"}, "reports": {"sft": "a/sft.json"},
               "rows": rows}
    table = run_all.markdown(summary)
    assert "| sft (tokens/s) | ours-auto | trl | 150.0 | 100.0 | **1.50x** | 1.40-1.60x | 900 / 1,000 " \
           "| 15.0% / 10.0% | 11 / 20 | 30.0% / 20.0% |" in table
    assert "| dpo (pairs/s) | ours-cached-auto | trl-cached |" in table and "2026-11-27; test machine" in table


def test_architecture_preset_builds_random_weights_of_that_config(tmp_path, monkeypatch):
    """``--model smollm2-arch`` (for machines the GGUF cannot reach): the config and tokenizer of a directory
    (``$RLHF_BENCH_ARCH_DIR``), random weights at the benchmarks' fixed seed, the same on every call."""
    from transformers import AutoConfig

    from rlhf_lightning.models import TINY_PRESET_DIR

    monkeypatch.setenv("RLHF_BENCH_ARCH_DIR", str(TINY_PRESET_DIR))
    tokenizer, described = common.build_model(str(REPO), common.SMOLLM2_ARCH, str(tmp_path / "a"))
    _, again = common.build_model(str(REPO), common.SMOLLM2_ARCH, str(tmp_path / "b"))
    config = AutoConfig.from_pretrained(TINY_PRESET_DIR)
    assert described["n_layers"] == config.num_hidden_layers and described["n_params"] > 0
    assert described["model_config"]["weights"] == f"random, seed {common.SEED}"
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert tokenizer("reverse: a b")["input_ids"]
