"""LoRA through peft: options, adapters-off reference, merged weights and exports, and SFT / RM / DPO / GRPO with
adapters end to end on the tiny model (DeepSpeed ZeRO-2 on CPU, as the tiny configs run)."""

import json

import pytest
import torch
from conftest import REPO, SFT_DATA, base_args, load_weights, metric_series, read_metrics, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_lightning.algorithms import DPO, SFT
from rlhf_lightning.algorithms.preference import sequence_logps
from rlhf_lightning.callbacks import export_hf
from rlhf_lightning.errors import ConfigError
from rlhf_lightning.lora import LoRA, adapters_disabled, apply_lora, lora_layers, merged_state_dict
from rlhf_lightning.losses import shift_labels, token_log_probs
from rlhf_lightning.models import load_causal_lm

CONFIGS = REPO / "configs" / "tiny"
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]])
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])


def adapted(model_dir, score_head=False, **lora):
    """The tiny model with adapters whose B matrices are random (a freshly injected B is 0: nothing to merge)."""
    model = apply_lora(load_causal_lm(str(model_dir), score_head=score_head), LoRA(r=4, **lora), str(model_dir),
                       score_head=score_head)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(("field", "value"), [("r", 0), ("alpha", 0), ("dropout", 1.0), ("target_modules", []),
                                              ("target_modules", [""])])
def test_bad_lora_values_name_the_option(field, value):
    with pytest.raises(ConfigError, match=rf"model\.init_args\.lora\.{field}="):
        SFT(model="tiny-llama", lora=LoRA(**{field: value}))


def test_qlora_without_gpu_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"load_in_4bit=true with model\.init_args\.lora\.export=merged"):
        SFT(model="tiny-llama", lora=LoRA(load_in_4bit=True))
    module = SFT(model="tiny-llama", lora=LoRA(load_in_4bit=True, export="adapter"))  # the hardware check:
    with pytest.raises(ConfigError, match=r"model\.init_args\.lora\.load_in_4bit=true \(QLoRA\) needs .*CUDA GPU"):
        module.check_config(None)
    assert module.model is None


def test_target_modules_that_match_nothing_name_the_option(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"model\.init_args\.lora\.target_modules=\['nope'\]"):
        apply_lora(load_causal_lm(str(tiny_model_dir)), LoRA(target_modules=["nope"]), "x")


def test_lora_block_is_read_from_yaml(tmp_path, tiny_model_dir):
    """`lora: {...}` under model.init_args parses into the typed option (the CLI prints it back)."""
    from rlhf_lightning.cli import RLHFCLI

    config = tmp_path / "c.yaml"
    config.write_text("model:\n  class_path: rlhf_lightning.algorithms.SFT\n  init_args:\n    model: tiny-llama\n"
                      "    lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj], export: adapter}\n")
    cli = RLHFCLI(args=["--config", str(CONFIGS / "sft.yaml"), "--config", str(config)], run=False)
    assert cli.model.lora == LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"], export="adapter")


# -------------------------------------------------------------------------- adapters off, merge, export
def test_only_adapters_train_and_disabled_adapters_are_the_base_model(tiny_model_dir):
    base, model = load_causal_lm(str(tiny_model_dir)).eval(), adapted(tiny_model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not torch.allclose(logits(model), logits(base), atol=1e-3)  # the adapters do something
    model.train()
    with adapters_disabled(model) as reference:
        assert not reference.training
        assert torch.equal(logits(reference), logits(base))
    assert model.training and {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert not torch.allclose(logits(model.eval()), logits(base), atol=1e-3)  # adapters back on


@pytest.mark.parametrize("score_head", [False, True])
def test_merged_weights_are_a_plain_model_with_the_adapted_outputs(tmp_path, tiny_model_dir, score_head):
    model = adapted(tiny_model_dir, score_head=score_head)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model, state)
    plain = load_causal_lm(str(tiny_model_dir), score_head=score_head).eval()
    assert set(merged) == set(plain.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the trained module untouched
    plain.load_state_dict(merged, strict=False)
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-5, rtol=1e-5)

    export_hf(model, None, tmp_path / "merged", rank=0)
    cls = AutoModelForSequenceClassification if score_head else AutoModelForCausalLM
    torch.testing.assert_close(logits(cls.from_pretrained(tmp_path / "merged").eval()), logits(model),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("score_head", [False, True])
def test_adapter_export_loads_with_peft(tmp_path, tiny_model_dir, score_head):
    from peft import PeftModel

    model = adapted(tiny_model_dir, score_head=score_head)
    export_hf(model, None, tmp_path / "adapter", rank=0, adapter_only=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == 4
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(load_causal_lm(str(tiny_model_dir), score_head=score_head),
                                       tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)


def test_kto_and_dpo_with_lora_load_no_reference_model_unless_one_is_named(tiny_model_dir):
    from rlhf_lightning.algorithms import KTO

    for cls, extra in ((KTO, {}), (DPO, {"precompute_reference": False})):
        module = cls(model=str(tiny_model_dir), lora=LoRA(r=2), **extra)
        module.configure_model()
        assert module.reference is None and lora_layers(module.model)
        named = cls(model=str(tiny_model_dir), lora=LoRA(r=2), reference_model=str(tiny_model_dir), **extra)
        named.configure_model()
        assert named.reference is not None and not lora_layers(named.reference)


# --------------------------------------------------------------------------------------------- end to end
def lora_args(*extra: str) -> list[str]:
    return ["--model.init_args.lora", json.dumps({"r": 8, "alpha": 16}), *extra]


def test_sft_with_lora_learns_trains_only_adapters_and_resumes(tmp_path, tiny_model_dir):
    from rlhf_lightning.__main__ import main

    run_dir = tmp_path / "sft"
    args = base_args(run_dir, tiny_model_dir, data=SFT_DATA) + lora_args(
        "--model.init_args.optimizer.init_args.lr", "1e-2", "--trainer.max_epochs", "3", "--trainer.max_steps", "10")
    cli = main(args)
    losses = metric_series(read_metrics(run_dir), "train/loss")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    start, trained = load_weights(tiny_model_dir), load_weights(run_dir / "hf")
    assert set(trained) == set(start)  # merged: the plain model's tensors
    adapted_layers = {f"{name}.weight" for name in lora_layers(cli.model.model)}
    for name, weight in start.items():
        assert torch.equal(weight, trained[name]) == (name not in adapted_layers), name  # frozen base, merged ΔW
    state = torch.load(run_dir / "checkpoints" / "last.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    assert any(".lora_B.default." in k for k in state)
    main(args[:-2] + ["--trainer.max_steps", "13", "--ckpt_path", "last"])
    steps = [int(r["step"]) for r in read_metrics(run_dir) if r.get("train/loss")]
    assert steps[-3:] == [10, 11, 12]


def test_reward_model_with_lora_trains_its_head_and_exports_an_adapter(tmp_path, tiny_model_dir):
    from peft import PeftModel

    from rlhf_lightning.__main__ import main

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What is {i % 50} + {i % 7}?", "chosen": str(i % 50 + i % 7), "rejected": "no idea"}
        for i in range(96)])
    run_dir = tmp_path / "rm"
    cli = main(base_args(run_dir, tiny_model_dir, data=pairs, config=CONFIGS / "rm.yaml") + lora_args(
        "--model.init_args.lora.export", "adapter", "--model.init_args.optimizer.init_args.lr", "1e-2",
        "--trainer.max_epochs", "2"))
    trainable = {n for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert "score.modules_to_save.default.weight" in trainable
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert metric_series(read_metrics(run_dir), "val/accuracy")[-1] >= 0.9
    rm = PeftModel.from_pretrained(load_causal_lm(str(tiny_model_dir), score_head=True), run_dir / "hf").eval()
    ours = cli.model.model.eval()
    torch.testing.assert_close(logits(rm), logits(ours), atol=1e-5, rtol=1e-5)


def test_dpo_with_lora_has_no_reference_model_and_learns(tmp_path, tiny_model_dir):
    from rlhf_lightning.__main__ import main

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What is {i % 50} + {i % 7}?", "chosen": str(i % 50 + i % 7), "rejected": "no idea"}
        for i in range(96)])
    run_dir = tmp_path / "dpo"
    cli = main(base_args(run_dir, tiny_model_dir, data=pairs, config=CONFIGS / "dpo.yaml") + lora_args(
        "--model.init_args.precompute_reference", "false", "--model.init_args.beta", "0.1",
        "--model.init_args.optimizer.init_args.lr", "1e-2", "--trainer.max_epochs", "2"))
    module: DPO = cli.model
    assert module.reference is None
    margins = metric_series(read_metrics(run_dir), "train/margin")
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.05, margins
    batch = next(iter(cli.datamodule.val_dataloader()))
    base = load_causal_lm(str(tiny_model_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(module.reference_logps(batch, "val"), sequence_logps(base, batch)["sum"])
        assert not torch.allclose(sequence_logps(module.model.eval(), batch)["sum"], sequence_logps(base, batch)["sum"])


@pytest.mark.parametrize(("estimator", "share_policy"), [("grpo", "false"), ("gae", "true")])
def test_ppo_with_lora_pushes_merged_weights_and_has_no_reference_worker(tmp_path, tiny_model_dir, estimator,
                                                                         share_policy):
    """A generation worker holding its own copy gets merged weights; a shared policy generates with the adapted module
    itself. Either way no reference worker: the reference log-probs are the policy's with adapters off."""
    from rlhf_lightning.__main__ import main

    prompts = REPO / "examples" / "data" / "prompts_tiny.jsonl"
    rewards = tmp_path / "rewards.py"  # the random model's responses differ in length: nonzero advantages
    rewards.write_text("def length(prompts, responses, labels):\n    return [float(len(r)) for r in responses]\n")
    run_dir = tmp_path / estimator
    args = base_args(run_dir, tiny_model_dir, data=prompts, config=CONFIGS / "grpo.yaml") + lora_args(
        "--model.init_args.reward_functions", json.dumps([f"{rewards}:length"]),
        "--model.init_args.advantage_estimator", estimator, "--model.init_args.kl_coef", "0.05",
        "--data.init_args.batch_size", "4", "--model.init_args.n_samples_per_prompt", "2",
        "--model.init_args.max_new_tokens", "4", "--model.init_args.micro_batch_size", "8",
        "--model.init_args.optimizer.init_args.lr", "1e-2", "--trainer.max_steps", "3",
        "--model.init_args.rollout.share_policy", share_policy)
    cli = main(args)
    module = cli.model
    rows = read_metrics(run_dir)
    assert len(metric_series(rows, "train/kl")) == 3 and metric_series(rows, "train/kl")[-1] != 0  # a real reference
    module.setup("fit")  # the rollout of the run, built again (teardown dropped it), workers at the start weights
    assert "reference" not in module.rollout.workers
    if estimator == "gae":
        trainable = {n for n, p in module.critic.named_parameters() if p.requires_grad}
        assert "score.modules_to_save.default.weight" in trainable and all(
            "lora_" in n or "modules_to_save" in n for n in trainable)
    labels = IDS.masked_fill(MASK == 0, -100)
    expected_ref = token_log_probs(logits(load_causal_lm(str(tiny_model_dir)).eval()), shift_labels(labels),
                                   module.logp_temperature)
    torch.testing.assert_close(module.base_policy_log_probs(IDS, MASK, labels), expected_ref)
    worker = module.rollout.workers["generation"][0]
    if module.rollout.shares_policy:
        assert worker.model is module.model and lora_layers(worker.model)
    else:
        module.sync_weights()  # the trained policy (version 3) to the new worker (version 0)
        assert worker.version == module.policy_version == 3
        expected = merged_state_dict(module.model, module.model.state_dict())
        got = worker.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items())
        torch.testing.assert_close(logits(worker.model), logits(module.model.eval()), atol=1e-5, rtol=1e-5)
