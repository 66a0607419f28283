import pytest
import torch

from rlhf_lightning.models import TINY_PRESET_DIR, load_causal_lm, load_tokenizer, resolve_model_path


def test_tiny_preset_builds_randomly_initialised_llama():
    model = load_causal_lm("tiny-llama")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert resolve_model_path("tiny-llama") == str(TINY_PRESET_DIR)
    tokenizer = load_tokenizer("tiny-llama")
    assert tokenizer.chat_template and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_load_options_dtype_overrides_and_gradient_checkpointing(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), dtype="bfloat16", attn_implementation="eager",
                           gradient_checkpointing=True, config_overrides={"rms_norm_eps": 1e-3})
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager" and model.config.rms_norm_eps == 1e-3
    assert model.is_gradient_checkpointing


def test_pretrained_weights_are_loaded_not_reinitialised(tiny_model_dir):
    torch.manual_seed(123)
    a = load_causal_lm(str(tiny_model_dir)).state_dict()
    torch.manual_seed(456)
    b = load_causal_lm(str(tiny_model_dir)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_local_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*hub id"):
        load_causal_lm(str(tmp_path / "no-such-model"))


def test_unreachable_hub_id_is_a_clear_error():
    # The test machines have no hub access (HF_HUB_OFFLINE=1): the hub code path must fail with guidance.
    with pytest.raises(OSError, match="option model.*not a local directory"):
        load_causal_lm("some-org/some-model-that-is-not-cached")


def test_directory_without_weights_is_an_error_unless_random_init(tmp_path, tiny_model_dir):
    """An interrupted export (config, no weights) used to load as a random model with only an INFO log."""
    from rlhf_lightning.errors import MissingPathError

    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(MissingPathError, match=r"model\.init_args\.reference_model='.*' has no weights.*random_init"):
        load_causal_lm(str(tmp_path), option="model.init_args.reference_model")
    model = load_causal_lm(str(tmp_path), random_init=True)
    assert model.config.num_hidden_layers == 2


def test_directory_without_config_names_the_option(tmp_path):
    from rlhf_lightning.errors import MissingPathError

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MissingPathError, match=r"model\.init_args\.model='.*' is a directory transformers cannot load"):
        load_causal_lm(str(tmp_path))


def test_hub_kernels_are_off_unless_asked_for(tiny_model_dir, monkeypatch):
    """transformers 5.2x swaps layers for kernels fetched from the hub by default; on an offline GPU node that fetch
    fails and the model does not load (seen on an H200 here). Loading through the project keeps the torch layers;
    ``USE_HUB_KERNELS=1`` hands the choice back to transformers."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if not hasattr(PreTrainedModel, "set_use_kernels"):
        pytest.skip("this transformers has no hub kernels")
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    assert AutoModelForCausalLM.from_pretrained(tiny_model_dir).use_kernels  # transformers' own default: on
    assert not load_causal_lm(str(tiny_model_dir)).use_kernels
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    assert load_causal_lm(str(tiny_model_dir)).use_kernels
