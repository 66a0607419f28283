"""Batch generation (``predict`` with ``rlhf_lightning.inference.Generator``): rows, determinism, resume, sharding."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, child_env, kill_process_group, run_cli, run_cli_subprocess, write_jsonl

from rlhf_lightning.generation import InverseCdfSampler, row_uniforms
from rlhf_lightning.rollout.workers import GenerationWorker

CONFIG = REPO / "configs" / "tiny" / "generate.yaml"
N_PROMPTS = 39  # odd: two ranks' shards are evened out with a repeated row, which the merge must drop


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(N_PROMPTS):
        letters = [rng.choice("abcdefgh") for _ in range(rng.randint(3, 8))]
        rows.append({"prompt": "reverse: " + " ".join(letters), "answer": " ".join(reversed(letters))})
    return write_jsonl(tmp_path_factory.mktemp("gen-data") / "prompts.jsonl", rows)


def gen_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--config", str(CONFIG), "--model.init_args.model", str(model), "--data.init_args.path",
            str(data), "--trainer.callbacks.init_args.output", str(out), "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", "--model.init_args.n", "2", "--model.init_args.max_new_tokens", "24",
            "--data.init_args.batch_size", "2", "--seed_everything", "7", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, prompts) -> list[dict]:
    """An uninterrupted sampled run (temperature 1, n 2) on one device."""
    out = tmp_path_factory.mktemp("gen-ref") / "ref.jsonl"
    run_cli(gen_args(tiny_model_dir, prompts, out))
    return read(out)


def test_sampled_rows_in_input_order(reference, prompts):
    inputs = read(prompts)
    assert [r["source_line"] for r in reference] == list(range(1, N_PROMPTS + 1))
    assert [r["prompt"] for r in reference] == [r["prompt"] for r in inputs]
    assert [r["label"] for r in reference] == [r["answer"] for r in inputs]
    assert all(len(r["responses"]) == 2 for r in reference)
    assert sum(r["responses"][0] != r["responses"][1] for r in reference) > N_PROMPTS // 2  # really sampled


def test_meta_records_options_and_throughput(tmp_path, tiny_model_dir, prompts, capsys):
    out = tmp_path / "greedy.jsonl"
    run_cli(gen_args(tiny_model_dir, prompts, out, "--model.init_args.temperature", "0", "--model.init_args.n", "3",
                     "--data.init_args.max_samples", "6"))
    rows, meta = read(out), json.loads((tmp_path / "greedy.jsonl.meta.json").read_text())
    assert meta["complete"] and meta["rows"] == 6 and meta["options"]["temperature"] == 0.0
    assert meta["options"]["chat_template"] is True and meta["options"]["n"] == 3
    assert meta["new_tokens"] > 0 and meta["tokens_per_s"] > 0 and meta["samples_per_s"] > 0
    assert "tokens/s" in capsys.readouterr().out
    # greedy: every sample is the one greedy answer, the same as the shared worker's (one generation path)
    assert all(len(set(r["responses"])) == 1 and len(r["responses"]) == 3 for r in rows)
    worker = GenerationWorker(str(tiny_model_dir), device="cpu")
    from rlhf_lightning.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    text = tokenizer.apply_chat_template([{"role": "user", "content": rows[0]["prompt"]}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    greedy = worker.generate([ids], n=1, max_new_tokens=24, temperature=0.0, top_p=1.0, top_k=0,
                             eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    assert rows[0]["responses"][0] == tokenizer.decode(greedy["responses"][0], skip_special_tokens=True)


def test_killed_run_resumes_to_the_uninterrupted_rows(tmp_path, tiny_model_dir, prompts, reference):
    out = tmp_path / "resumed.jsonl"
    cmd = [sys.executable, "-m", "rlhf_lightning", *gen_args(tiny_model_dir, prompts, out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    part = tmp_path / "resumed.jsonl.part0"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if part.exists() and part.read_text().count("\n") >= 2:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        kill_process_group(proc)
    written = part.read_text().count("\n")
    assert 2 <= written < N_PROMPTS and not out.exists(), "the run was not killed mid-way"
    with part.open("a") as handle:  # as if the kill had hit in the middle of a write
        handle.write('{"order": 38, "row": {"prompt": "rev')
    run_cli(gen_args(tiny_model_dir, prompts, out))
    assert read(out) == reference
    meta = json.loads((tmp_path / "resumed.jsonl.meta.json").read_text())
    assert meta["skipped_prompts"] == written and meta["rows"] == N_PROMPTS
    assert not list(tmp_path.glob("*.part*"))


def test_resume_refuses_other_options_and_overwrite_starts_over(tmp_path, tiny_model_dir, prompts, capsys):
    out = tmp_path / "out.jsonl"
    small = ["--data.init_args.max_samples", "4"]
    run_cli(gen_args(tiny_model_dir, prompts, out, *small))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(gen_args(tiny_model_dir, prompts, out, *small, "--model.init_args.temperature", "0.5"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "temperature: 1.0 -> 0.5" in err and "--trainer.callbacks.init_args.overwrite true" in err
    run_cli(gen_args(tiny_model_dir, prompts, out, *small, "--model.init_args.temperature", "0",
                     "--trainer.callbacks.init_args.overwrite", "true"))
    assert all(len(set(r["responses"])) == 1 for r in read(out)) and len(read(out)) == 4
    run_cli(gen_args(tiny_model_dir, prompts, out, *small, "--model.init_args.temperature", "0.5",
                     "--overwrite", "true"))  # the CLI-wide flag does the same for predict
    assert json.loads(out.with_name("out.jsonl.meta.json").read_text())["options"]["temperature"] == 0.5


def test_foreign_output_and_changed_prompts_are_refused(tmp_path, tiny_model_dir, prompts, capsys):
    """Resuming never mixes two runs: an output this command did not write, or prompts that changed at a line
    already written, stop the run with one line instead of appending to (or silently mixing into) the file."""
    small = ["--data.init_args.max_samples", "3", "--model.init_args.temperature", "0"]
    foreign = write_jsonl(tmp_path / "foreign.jsonl", [{"text": "someone else's file"}])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(gen_args(tiny_model_dir, prompts, foreign, *small))
    assert exit_info.value.code == 2
    assert "has no foreign.jsonl.meta.json" in capsys.readouterr().err.strip().splitlines()[-1]
    assert read(foreign) == [{"text": "someone else's file"}]  # left as it was

    out, inputs = tmp_path / "out.jsonl", read(prompts)[:3]
    mine = write_jsonl(tmp_path / prompts.name, inputs)
    run_cli(gen_args(tiny_model_dir, mine, out, *small))
    part = out.with_name(out.name + ".part0")  # as if killed after two rows: the third is still to do
    rows = read(out)
    out.unlink()
    part.write_text("".join(json.dumps({"order": i, "row": row}) + "\n" for i, row in enumerate(rows[:2])))
    inputs[1]["prompt"] = "reverse: z z z"
    write_jsonl(mine, inputs)  # the same file, edited at a line already written
    with pytest.raises(SystemExit) as exit_info:
        run_cli(gen_args(tiny_model_dir, mine, out, *small))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "line 2: the prompt differs" in err and "overwrite true" in err


def test_two_devices_write_the_same_rows(tmp_path, tiny_model_dir, prompts, reference):
    out = tmp_path / "ddp.jsonl"
    run_cli_subprocess(gen_args(tiny_model_dir, prompts, out, "--trainer.devices", "2", "--trainer.strategy", "ddp"),
                       timeout=600)
    assert read(out) == reference
    assert json.loads((tmp_path / "ddp.jsonl.meta.json").read_text())["devices"] == 2


def test_inverse_cdf_sampler_matches_the_softmax_distribution():
    """Each row's token comes from its own seed, with the probabilities ``softmax(logits / T)`` (top-k kept)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 20_000
    sampler = InverseCdfSampler(row_uniforms(list(range(rows)), n=1, max_new_tokens=1), temperature=0.7, top_p=1.0,
                                top_k=4)
    out = sampler(torch.zeros(rows, 3, dtype=torch.long), logits.expand(rows, -1).clone())
    picked = out.argmax(-1)
    assert torch.isfinite(out).sum(-1).eq(1).all()
    expected = torch.softmax(torch.where(torch.arange(6) < 4, logits / 0.7, -torch.inf), -1)
    frequency = torch.bincount(picked, minlength=6).float() / rows
    assert torch.allclose(frequency, expected, atol=0.01) and frequency[4:].sum() == 0
    again = InverseCdfSampler(row_uniforms(list(range(100, 200)), n=1, max_new_tokens=1), 0.7, 1.0, 4)
    alone = again(torch.zeros(100, 3, dtype=torch.long), logits.expand(100, -1).clone()).argmax(-1)
    assert torch.equal(alone, picked[100:200])  # a row's pick does not depend on the other rows


def test_inverse_cdf_sampler_applies_top_p_and_min_p():
    """top-p 0.8 then min-p 0.3 of the surviving mass, as transformers orders them: only the tokens both keep."""
    logits = torch.tensor([1.5, 1.0, 0.5, 0.0, -0.5])
    rows = 20_000
    sampler = InverseCdfSampler(torch.rand(rows, 1, generator=torch.Generator().manual_seed(0)), temperature=1.0,
                                top_p=0.8, top_k=0, warper_kwargs={"min_p": 0.3})
    picked = sampler(torch.zeros(rows, 2, dtype=torch.long), logits.expand(rows, -1).clone()).argmax(-1)
    probs = logits.softmax(-1)
    kept = (probs.cumsum(-1) - probs < 0.8) & (probs >= 0.3 * probs.max())  # top-p keeps 0..3; min-p drops 3
    expected = torch.where(kept, probs, 0.0) / torch.where(kept, probs, 0.0).sum()
    frequency = torch.bincount(picked, minlength=5).float() / rows
    assert torch.allclose(frequency, expected, atol=0.01) and frequency[~kept].sum() == 0


def test_beam_search_keeps_transformers_sampling():
    assert InverseCdfSampler.handles({"min_new_tokens": 4, "repetition_penalty": 1.2})
    assert not InverseCdfSampler.handles({"num_beams": 2}) and not InverseCdfSampler.handles({"penalty_alpha": 0.6})


def test_inverse_cdf_sampler_applies_epsilon_and_eta_cutoffs():
    """``epsilon_cutoff`` drops tokens under that probability; ``eta_cutoff`` runs too (its threshold depends on
    the entropy); the kept tokens are sampled in proportion to their probabilities."""
    logits = torch.tensor([2.0, 1.5, 0.0, -2.0, -4.0])
    probs = logits.softmax(-1)
    rows = 20_000
    uniforms = torch.rand(rows, 1, generator=torch.Generator().manual_seed(0))
    for kwargs in ({"epsilon_cutoff": 0.05}, {"eta_cutoff": 0.05}):
        sampler = InverseCdfSampler(uniforms, 1.0, 1.0, 0, warper_kwargs=kwargs)
        picked = sampler(torch.zeros(rows, 2, dtype=torch.long), logits.expand(rows, -1).clone()).argmax(-1)
        frequency = torch.bincount(picked, minlength=5).float() / rows
        kept = frequency > 0
        assert kept[:3].all() and not kept[3:].any(), (kwargs, frequency)  # p = 0.53, 0.32, 0.09 | 0.01, 0.002
        assert torch.allclose(frequency[kept], probs[kept] / probs[kept].sum(), atol=0.01), kwargs
