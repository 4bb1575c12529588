"""LoRA: wrapping, freezing, merging, biases, summaries, save/load and the errors on bad input."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from tiny import train_steps

from laformer import (
    CheckpointError,
    ConfigError,
    LaFormerForSequenceClassification,
)
from laformer.peft import (
    LoraConfig,
    LoRALinear,
    get_peft_model,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    save_adapter,
    trainable_summary,
    unload,
    unmerge_adapter,
)
from laformer.quantization import QuantizedLinear, quantize_model, set_int8_activations

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8], [9, 7, 9, 3, 2, 38, 4, 6]])


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Give every B a non-zero value so the adapter changes the output (as after training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=generator) * 0.1)


def test_wraps_targets_starts_at_base_and_trains_only_lora(tiny_model):
    model = tiny_model()
    with torch.no_grad():
        before = model(TOKENS).logits
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q.base_layer, nn.Linear) and q.scaling == 2.0
    assert not isinstance(model.model.layers[0].self_attn.k_proj, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{proj}.lora_{ab}.weight"
                         for i in range(2) for proj in ("q_proj", "v_proj") for ab in "AB"}
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, before, atol=0, rtol=0)  # B = 0 at init
    train_steps(model, TOKENS)
    with torch.no_grad():
        assert (model(TOKENS).logits - before).abs().max() > 1e-4
    for name, param in model.named_parameters():  # the base never moves
        base_name = name.replace(".base_layer", "")
        if base_name in base_weights:
            torch.testing.assert_close(param, base_weights[base_name], atol=0, rtol=0)


def test_summary_line_counts_trainable_and_total(capsys, tiny_model):
    model = get_peft_model(tiny_model(), LoraConfig(r=4))
    lora = 2 * (4 * (32 + 32) + 4 * (32 + 16))  # per layer: q (32->32) and v (32->16)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    line = trainable_summary(model)
    assert line == f"trainable params: {lora:,} || all params: {total:,} || trainable%: {100 * lora / total:.4f}"
    print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == line


def test_merge_unmerge_and_merge_and_unload_are_exact(tiny_model):
    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules="all-linear"))
    assert not isinstance(model.lm_head, LoRALinear)  # "all-linear" leaves the output head alone
    randomize_lora(model)
    weight = model.model.layers[1].mlp.up_proj.base_layer.weight
    original = weight.detach().clone()
    with torch.no_grad():
        adapted = model(TOKENS).logits
        merge_adapter(model)
        assert (weight - original).abs().max() > 1e-4
        torch.testing.assert_close(model(TOKENS).logits, adapted, atol=1e-5, rtol=0)
        unmerge_adapter(model)
        torch.testing.assert_close(weight, original, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(TOKENS).logits, adapted, atol=1e-6, rtol=0)
        plain = merge_and_unload(model)
        assert not any(isinstance(m, LoRALinear) for m in plain.modules())
        assert not hasattr(plain, "peft_config") and all(p.requires_grad for p in plain.parameters())
        torch.testing.assert_close(plain(TOKENS).logits, adapted, atol=1e-5, rtol=0)


def test_regex_targets_and_unload_restores_base(tiny_model):
    model = tiny_model()
    with torch.no_grad():
        before = model(TOKENS).logits
    get_peft_model(model, LoraConfig(r=2, target_modules=r"model\.layers\.1\.mlp\.(gate|up)_proj"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    randomize_lora(model)
    unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, before, atol=0, rtol=0)


def test_bias_modes_train_existing_biases():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(q_proj=nn.Linear(8, 8), act=nn.ReLU(), out=nn.Linear(8, 4)))

    def trainable(bias):
        model = get_peft_model(net(), LoraConfig(r=2, target_modules=["q_proj"], bias=bias))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    lora = {"q_proj.lora_A.weight", "q_proj.lora_B.weight"}
    assert trainable("none") == lora
    assert trainable("lora_only") == lora | {"q_proj.base_layer.bias"}
    assert trainable("all") == lora | {"q_proj.base_layer.bias", "out.bias"}


def test_classifier_head_is_trained_and_saved(tmp_path, tiny_model):
    labels = {0: "neg", 1: "pos", 2: "neutral"}
    model = get_peft_model(tiny_model(model_class=LaFormerForSequenceClassification, id2label=labels), LoraConfig(r=2))
    assert model.score.weight.requires_grad
    with torch.no_grad():
        model.score.weight.mul_(3.0)
    randomize_lora(model)
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_model(model_class=LaFormerForSequenceClassification, id2label=labels), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(TOKENS).logits, model.eval()(TOKENS).logits, atol=1e-6, rtol=0)


def test_save_load_round_trip_small_files(tmp_path, tiny_model):
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "down_proj"]))
    train_steps(model, TOKENS)
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 10_000
    fresh = load_adapter(tiny_model(), tmp_path)
    assert fresh.peft_config == model.peft_config
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(TOKENS).logits, model(TOKENS).logits, atol=0, rtol=0)


def test_dropout_only_in_training(tiny_model):
    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_dropout=0.5))
    randomize_lora(model)
    with torch.no_grad():
        eval_a, eval_b = model(TOKENS).logits, model(TOKENS).logits
        model.train()
        train_a, train_b = model(TOKENS).logits, model(TOKENS).logits
    torch.testing.assert_close(eval_a, eval_b, atol=0, rtol=0)
    assert (train_a - train_b).abs().max() > 0


def test_bfloat16_base_keeps_its_dtype(tiny_model):
    model = tiny_model().to(torch.bfloat16)
    get_peft_model(model, LoraConfig(r=4))
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float32
    assert model(TOKENS).logits.dtype == torch.bfloat16


class FakeQuantLinear(nn.Module):
    """A linear-like module without a float weight, standing in for a weight-only quantized layer."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.abs().amax(1, keepdim=True) / 127
        self.register_buffer("weight", torch.round(linear.weight / scale).to(torch.int8))
        self.register_buffer("scales", scale.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight.to(x.dtype) * self.scales).T


def test_lora_trains_over_a_quantized_base(tiny_model):
    model = tiny_model()
    for layer in model.model.layers:
        layer.self_attn.q_proj = FakeQuantLinear(layer.self_attn.q_proj)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, FakeQuantLinear)
    train_steps(model, TOKENS)
    assert model.model.layers[0].self_attn.q_proj.lora_B.weight.abs().sum() > 0
    with pytest.raises(ConfigError, match="quantized base"):
        merge_adapter(model)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_on_laformer_quantized_model(mode, tiny_model):
    model = tiny_model()
    quantize_model(model, mode, group_size=32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, QuantizedLinear)
    train_steps(model, TOKENS, steps=2)
    assert model.model.layers[0].self_attn.q_proj.lora_B.weight.abs().sum() > 0
    set_int8_activations(model, False)  # the per-channel int8 head would round its activations
    with torch.no_grad():
        adapted = model(TOKENS).logits
        merged = merge_and_unload(model)  # dequantized + merged: a float model with the same function
        assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
        torch.testing.assert_close(merged(TOKENS).logits, adapted, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(target_modules=["q_proj", "qkv_proj"]), "'qkv_proj' is not in the model"),
        (dict(target_modules=r"layers\.\d+\.attn\.q"), "matches no module"),
        (dict(target_modules=["mlp"]), "can only wrap linear layers"),
        (dict(target_modules="q_proj(["), "not a valid regex"),
    ],
)
def test_bad_targets_raise_config_error(config, match, tiny_model):
    with pytest.raises(ConfigError, match=match):
        get_peft_model(tiny_model(), LoraConfig(**config))


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(bias="some"), dict(lora_dropout=1.0)])
def test_bad_config_values_raise(kwargs):
    with pytest.raises(ConfigError):
        LoraConfig(**kwargs)


def test_second_adapter_and_merge_without_adapter_raise(tiny_model):
    model = get_peft_model(tiny_model(), LoraConfig())
    with pytest.raises(ConfigError, match="already has a LORA adapter"):
        get_peft_model(model, LoraConfig())
    with pytest.raises(ConfigError, match="no adapter"):
        merge_adapter(tiny_model())
    with pytest.raises(ConfigError, match="no adapter to save"):
        save_adapter(tiny_model(), "unused")


def test_adapter_for_another_base_model_raises(tmp_path, tiny_model):
    model = get_peft_model(tiny_model(), LoraConfig(r=4))
    save_adapter(model, tmp_path)
    with pytest.raises(CheckpointError, match="has shape .* different base model"):
        load_adapter(tiny_model(hidden_size=48, num_attention_heads=4), tmp_path)
    other = tiny_model(num_hidden_layers=1)
    with pytest.raises(CheckpointError, match="which this model lacks"):
        load_adapter(other, tmp_path)
    assert not hasattr(other, "peft_config") and not any(isinstance(m, LoRALinear) for m in other.modules())
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapter(tiny_model(), tmp_path / "missing")


def test_peft_only_options_are_refused(tmp_path, tiny_model):
    model = get_peft_model(tiny_model(), LoraConfig(r=4))
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ConfigError, match="use_dora"):
        load_adapter(tiny_model(), tmp_path)


def test_default_model_summary(default_model):
    model = get_peft_model(copy.deepcopy(default_model), LoraConfig(r=8))
    per_layer = 8 * (576 + 576) + 8 * (576 + 192)
    assert trainable_summary(model).startswith(f"trainable params: {30 * per_layer:,} || all params: ")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, default_model(ids).logits, atol=0, rtol=0)


def test_tied_output_head_is_refused(tiny_model):
    model = tiny_model(tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="tied"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "lm_head"]))
