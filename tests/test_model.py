"""Parity with Hugging Face's reference LLaMA on random small configurations, and model-level behaviour (which
needs no ``transformers``: those tests build laformer's own models)."""

from __future__ import annotations

import pytest
import torch

from laformer import (
    CheckpointError,
    ConfigError,
    GenerationError,
    LaFormerConfig,
    LaFormerForCausalLM,
    LaFormerForSequenceClassification,
    LaFormerModel,
)

import tiny

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CONFIGS = {
    "gqa-untied-llama3": dict(
        vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False, rope_scaling=LLAMA3_SCALING,
    ),
    "mha-tied-odd": dict(
        vocab_size=131, hidden_size=40, intermediate_size=104, num_hidden_layers=3, num_attention_heads=5,
        num_key_value_heads=5, rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "mqa-linear-rope": dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False,
    ),
}


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def ours(name: str, model_class: type = LaFormerForCausalLM, folder=None):
    """A random laformer model of ``CONFIGS[name]`` (saved to ``folder`` when given)."""
    model = tiny.tiny_model(seed=0, model_class=model_class, max_position_embeddings=128, **CONFIGS[name])
    if folder is not None:
        model.save_pretrained(folder)
    return model


def hf_reference(transformers, tmp_path, kwargs, cls_name="LlamaForCausalLM", **extra):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(max_position_embeddings=128, **kwargs, **extra)
    model = getattr(transformers, cls_name)(config).eval()
    model.save_pretrained(tmp_path)
    return model


def padded_batch(vocab_size: int):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab_size, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    mask[2, 12:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_lm_logits_match_transformers(transformers, tmp_path, name):
    hf = hf_reference(transformers, tmp_path, CONFIGS[name])
    ours = LaFormerForCausalLM.from_pretrained(tmp_path)
    ids, mask = padded_batch(CONFIGS[name]["vocab_size"])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        actual = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (expected - actual)[real].abs().max() < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_loss_matches_transformers(transformers, tmp_path, name):
    hf = hf_reference(transformers, tmp_path, CONFIGS[name])
    ours = LaFormerForCausalLM.from_pretrained(tmp_path)
    ids, _ = padded_batch(CONFIGS[name]["vocab_size"])
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        assert torch.allclose(hf(ids, labels=labels).loss, ours(ids, labels=labels).loss, atol=1e-5)


def test_padding_does_not_change_real_tokens():
    model = ours("gqa-untied-llama3")
    ids, mask = padded_batch(97)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        left = model(ids[1:2, 6:]).logits
        right = model(ids[2:3, :12]).logits
    assert (batch[1, 6:] - left[0]).abs().max() < 1e-5
    assert (batch[2, :12] - right[0]).abs().max() < 1e-5


def test_kv_cache_matches_full_forward():
    model = ours("gqa-untied-llama3")
    ids, mask = padded_batch(97)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        first = model(ids[:, :10], attention_mask=mask[:, :10], use_cache=True)
        logits = [first.logits]
        cache = first.past_key_values
        for t in range(10, ids.shape[1]):
            step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
            logits.append(step.logits)
    incremental = torch.cat(logits, dim=1)
    assert (full - incremental)[mask.bool()].abs().max() < 1e-5


def test_save_pretrained_loads_in_transformers(transformers, tmp_path):
    hf_reference(transformers, tmp_path / "src", CONFIGS["mha-tied-odd"])
    ours = LaFormerForCausalLM.from_pretrained(tmp_path / "src")
    ours.save_pretrained(tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, _ = padded_batch(131)
    with torch.no_grad():
        assert (reloaded(ids).logits - ours(ids).logits).abs().max() < 1e-5


def test_sharded_safetensors_load(transformers, tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(max_position_embeddings=64, **CONFIGS["gqa-untied-llama3"]))
    hf.eval().save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = LaFormerForCausalLM.from_pretrained(tmp_path)
    ids, _ = padded_batch(97)
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() < 1e-4


def test_sequence_classification_matches_transformers(transformers, tmp_path):
    hf = hf_reference(transformers, tmp_path, CONFIGS["gqa-untied-llama3"], "LlamaForSequenceClassification",
                      num_labels=3, pad_token_id=0)
    ours = LaFormerForSequenceClassification.from_pretrained(tmp_path)
    assert ours.config.num_labels == 3
    ids, mask = padded_batch(97)
    ids = ids.clamp_min(1).masked_fill(mask == 0, 0)  # pad id 0 only on padding, as transformers pools by pad id
    mask[1] = 1  # transformers finds the last non-pad token by id: use right padding only
    ids[1] = ids[1].clamp_min(1)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, labels=labels)
        actual = ours(ids, attention_mask=mask, labels=labels)
    assert (expected.logits - actual.logits).abs().max() < 1e-4
    assert torch.allclose(expected.loss, actual.loss, atol=1e-5)


def test_classifier_from_causal_checkpoint_gets_new_head(tmp_path):
    ours("mha-tied-odd", folder=tmp_path)
    model = LaFormerForSequenceClassification.from_pretrained(tmp_path, id2label={0: "neg", 1: "pos"})
    assert model.config.label2id == {"neg": 0, "pos": 1}
    assert model.score.weight.shape == (2, 40) and model.score.weight.std() > 0
    ids, mask = padded_batch(131)
    assert model(ids, attention_mask=mask).logits.shape == (3, 2)


def test_decoder_only_model_returns_hidden_states(tmp_path):
    causal = ours("gqa-untied-llama3", folder=tmp_path)
    decoder = LaFormerModel.from_pretrained(tmp_path)
    ids, _ = padded_batch(97)
    with torch.no_grad():
        out = decoder(ids, output_hidden_states=True)
        assert out.last_hidden_state.shape == (3, 17, 48)
        assert len(out.hidden_states) == 3
        assert torch.equal(causal.lm_head(out.last_hidden_state), causal(ids).logits)


def test_bfloat16_is_close_to_float32(tmp_path):
    fp32 = ours("gqa-untied-llama3", folder=tmp_path)
    bf16 = LaFormerForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    ids, _ = padded_batch(97)
    with torch.no_grad():
        a, b = fp32(ids).logits, bf16(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_logits_to_keep_returns_last_positions():
    model = ours("gqa-untied-llama3")
    ids, _ = padded_batch(97)
    with torch.no_grad():
        assert torch.allclose(model(ids, logits_to_keep=1).logits[:, 0], model(ids).logits[:, -1], atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients(tiny_model):
    model = tiny_model().train()
    ids = torch.randint(0, 64, (2, 9))
    model(ids, labels=ids).loss.backward()
    plain = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    model.model.gradient_checkpointing = True
    model(ids, labels=ids).loss.backward()
    assert torch.allclose(plain, model.model.layers[0].mlp.up_proj.weight.grad, atol=1e-6)


def test_bad_configs_and_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="multiple of"):
        LaFormerConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="rope_scaling"):
        LaFormerConfig(hidden_size=64, num_attention_heads=4, rope_scaling={"rope_type": "yarn", "factor": 2})
    with pytest.raises(CheckpointError, match="no model at"):
        LaFormerForCausalLM.from_pretrained(tmp_path / "missing")
    ours("mqa-linear-rope", folder=tmp_path / "m")
    with pytest.raises(ConfigError, match="unknown from_pretrained argument"):
        LaFormerForCausalLM.from_pretrained(tmp_path / "m", not_a_field=1)
    with pytest.raises(ConfigError, match="dtype"):
        LaFormerForCausalLM.from_pretrained(tmp_path / "m", dtype="int8")
    model = LaFormerForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(GenerationError, match="attention_mask has shape"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_wrongly_shaped_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    ours("mqa-linear-rope", folder=tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 5)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        LaFormerForCausalLM.from_pretrained(tmp_path)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks 1 tensor"):
        LaFormerForCausalLM.from_pretrained(tmp_path)
