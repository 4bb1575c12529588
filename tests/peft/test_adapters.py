"""Houlsby bottleneck adapters after attention and MLP: identity at init, training, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from tiny import train_steps

from laformer import CheckpointError, ConfigError
from laformer.peft import (
    AdapterConfig,
    BottleneckAdapter,
    get_peft_model,
    load_adapter,
    merge_and_unload,
    save_adapter,
    unload,
)

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8], [9, 7, 9, 3, 2, 38, 4, 6]])


def test_adapters_sit_after_attention_and_mlp_and_start_as_identity(tiny_model):
    model = tiny_model()
    with torch.no_grad():
        before = model(TOKENS).logits
    get_peft_model(model, AdapterConfig(bottleneck=8))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, BottleneckAdapter) and isinstance(layer.mlp.down_proj, BottleneckAdapter)
    assert layer.mlp.down_proj.adapter_down.in_features == 32  # acts on the sub-layer's output (hidden size)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.o_proj.adapter_up.weight" in trainable
    assert "model.layers.1.post_attention_layernorm.weight" in trainable and "model.norm.weight" in trainable
    assert not any("q_proj" in n or "embed" in n or "base_layer" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, before, atol=0, rtol=0)


def test_gradients_reach_adapters_and_training_changes_output(tiny_model):
    model = get_peft_model(tiny_model(), AdapterConfig(bottleneck=8, train_norms=False))
    assert not model.model.norm.weight.requires_grad
    model(TOKENS, labels=TOKENS).loss.backward()
    up = model.model.layers[0].mlp.down_proj.adapter_up
    assert up.weight.grad.abs().sum() > 0 and up.bias.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)
    model.zero_grad()
    with torch.no_grad():
        before = model(TOKENS).logits
    train_steps(model, TOKENS)
    assert model.model.layers[0].mlp.down_proj.adapter_down.weight.grad is None  # zero_grad(set_to_none)
    with torch.no_grad():
        assert (model(TOKENS).logits - before).abs().max() > 1e-4


def test_save_load_round_trip_and_small_files(tmp_path, tiny_model):
    model = train_steps(get_peft_model(tiny_model(), AdapterConfig(bottleneck=8, activation="gelu")), TOKENS)
    save_adapter(model, tmp_path)
    full_size = sum(p.numel() * 4 for p in model.parameters())
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < full_size / 3
    fresh = load_adapter(tiny_model(), tmp_path)
    assert fresh.peft_config == model.peft_config
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(TOKENS).logits, model(TOKENS).logits, atol=0, rtol=0)


def test_unload_restores_base_and_merge_is_refused(tiny_model):
    model = tiny_model()
    with torch.no_grad():
        before = model(TOKENS).logits
    get_peft_model(model, AdapterConfig(bottleneck=4, train_norms=False))
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.adapter_up.weight.normal_()
    with pytest.raises(ConfigError, match="cannot be merged"):
        merge_and_unload(model)
    unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, before, atol=0, rtol=0)


def test_errors(tiny_model):
    with pytest.raises(ConfigError, match="bottleneck"):
        AdapterConfig(bottleneck=0)
    with pytest.raises(ConfigError, match="activation"):
        AdapterConfig(activation="swish")
    with pytest.raises(ConfigError, match="'out_proj' is not in the model"):
        get_peft_model(tiny_model(), AdapterConfig(target_modules=["out_proj"]))


def test_adapter_for_another_base_model_raises(tmp_path, tiny_model):
    save_adapter(get_peft_model(tiny_model(), AdapterConfig(bottleneck=4)), tmp_path)
    with pytest.raises(CheckpointError, match="different base model"):
        load_adapter(tiny_model(hidden_size=48), tmp_path)
