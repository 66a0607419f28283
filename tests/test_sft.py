"""SFT end to end through ``python -m rlhf_lightning fit`` on the tiny model, on DeepSpeed ZeRO-2 (CPU)."""

import torch
from conftest import CHAT_DATA, base_args, load_weights, metric_series, read_metrics, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_sft_learns_exports_and_reloads(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    args = base_args(run_dir, tiny_model_dir) + ["--trainer.max_epochs", "2", "--data.init_args.val_split", "0.1"]
    args[args.index("--trainer.callbacks") + 1] = args[args.index("--trainer.callbacks") + 1].replace(
        '"dirpath": "' + str(run_dir / "hf") + '"', '"dirpath": "' + str(run_dir / "hf") + '", "every_n_steps": 50')
    run_cli(args)
    assert (run_dir / "hf" / "step-50" / "model.safetensors").exists()  # periodic export, besides the final one
    rows = read_metrics(run_dir)
    losses = metric_series(rows, "train/loss")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    val = metric_series(rows, "val/loss")
    assert len(val) == 2 and val[1] < val[0]
    assert metric_series(rows, "train/tokens_per_sec")[-1] > 0 and metric_series(rows, "val/ppl")
    assert metric_series(rows, "train/lr")

    before, after = load_weights(tiny_model_dir), load_weights(run_dir / "hf")
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if "norm" not in k)

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_sft_on_multi_turn_chat(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "chat"
    run_cli(base_args(run_dir, tiny_model_dir, data=CHAT_DATA)
            + ["--data.init_args.messages_key", "messages", "--trainer.max_steps", "8"])
    losses = metric_series(read_metrics(run_dir), "train/loss")
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))


def test_resume_from_last_checkpoint_continues_exactly(tmp_path, tiny_model_dir):
    """Stopping at step 10 and resuming to 15 (mid-epoch) ends with the weights of an uninterrupted 15-step run:
    weights, optimizer, scheduler, step counter and the data position are all restored."""
    run_dir, reference_dir = tmp_path / "resume", tmp_path / "uninterrupted"
    # A constant LR: a cosine schedule depends on max_steps, which the interrupted run sets to 10.
    constant = ["--model.init_args.lr_scheduler", "constant", "--model.init_args.warmup_steps", "0"]
    run_cli(base_args(run_dir, tiny_model_dir) + constant + ["--trainer.max_steps", "10"])
    assert (run_dir / "checkpoints" / "last.ckpt").is_dir()  # DeepSpeed writes a directory checkpoint
    run_cli(base_args(run_dir, tiny_model_dir) + constant + ["--trainer.max_steps", "15", "--ckpt_path", "last"])
    rows = [r for r in read_metrics(run_dir) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == list(range(10, 15))  # step counter restored, 5 more steps
    run_cli(base_args(reference_dir, tiny_model_dir) + constant + ["--trainer.max_steps", "15"])
    resumed, uninterrupted = load_weights(run_dir / "hf"), load_weights(reference_dir / "hf")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=1e-5)


def test_custom_loss_example_runs_through_the_cli(tmp_path, tiny_model_dir, monkeypatch):
    import sys

    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "examples"))
    run_dir = tmp_path / "custom"
    run_cli(base_args(run_dir, tiny_model_dir) + [
        "--model", "custom_sft_loss.LabelSmoothedSFT", "--model.init_args.label_smoothing", "0.2",
        "--trainer.max_steps", "4"])
    config = (run_dir / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "label_smoothing: 0.2" in config
    assert len(metric_series(read_metrics(run_dir), "train/loss")) == 4
    sys.modules.pop("custom_sft_loss", None)


def test_generation_samples_callback_example(tmp_path, tiny_model_dir, monkeypatch):
    """examples/generation_samples.py, added with ``--trainer.callbacks+=`` as its docstring shows."""
    import csv

    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "examples"))
    from rlhf_lightning.__main__ import main

    run_dir = tmp_path / "samples"
    cli = main(base_args(run_dir, tiny_model_dir) + [
        "--trainer.callbacks+=generation_samples.GenerationSamples",
        "--trainer.callbacks.prompts", '["What is 2 + 3?", "What is 40 + 2?"]',
        "--trainer.callbacks.every_n_steps", "2", "--trainer.callbacks.max_new_tokens", "4",
        "--trainer.max_steps", "4"])
    with open(run_dir / "csv" / "version_0" / "generations.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 2, 4, 4]
    assert {r["prompt"] for r in rows} == {"What is 2 + 3?", "What is 40 + 2?"}
    assert cli.model.tokenizer.padding_side == "right"  # generation pads on the left; training's side is restored


def test_gradients_are_freed_right_after_each_optimizer_step(tmp_path, tiny_model_dir):
    """Every step's forward runs without the previous step's gradients (they would add a model's worth of memory
    at the activation peak), on Lightning's plain strategy as under DeepSpeed; training still learns."""
    from lightning.pytorch.callbacks import Callback

    from rlhf_lightning.cli import RLHFCLI

    class GradientsAtStepStart(Callback):
        def __init__(self) -> None:
            self.held: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.held.append(sum(p.grad is not None for p in pl_module.parameters()))

    probe = GradientsAtStepStart()
    args = base_args(tmp_path, tiny_model_dir)[1:]  # no subcommand with run=False
    args += ["--trainer.strategy", "auto", "--trainer.max_steps", "4", "--trainer.accelerator", "cpu"]
    cli = RLHFCLI(args=args, run=False)
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert probe.held == [0, 0, 0, 0]
    losses = metric_series(read_metrics(tmp_path), "train/loss")
    assert all(torch.isfinite(torch.tensor(losses)))
