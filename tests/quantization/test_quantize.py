"""``quantize_model`` and quantized models: which layers swap, QLoRA on top, checkpoints that load back identical,
``from_pretrained(quantize=...)``, bad arguments, the CLI, and the default model's perplexity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from laformer import ConfigError, LaFormerForCausalLM, LaFormerForSequenceClassification
from laformer.ama import AMAConfig
from laformer.cli import main
from laformer.peft import LoraConfig, get_peft_model
from laformer.prune import perplexity
from laformer.quantization import WeightOnlyInt4Linear, WeightOnlyInt8Linear, is_quantized, quantize_model

from .helpers import QUANTIZABLE, relative_error


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_training_on_quantized_base(tiny_model, mode):
    model = quantize_model(tiny_model(seed=5, **QUANTIZABLE).train(), mode, 32)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = model.state_dict()
    for key, value in frozen.items():  # the quantized weights never moved
        if key.endswith(("qweight", "scales", "mins")):
            wrapped = key.replace("_proj.", "_proj.base_layer.").replace("lm_head.", "lm_head.base_layer.")
            assert torch.equal(state.get(key, state.get(wrapped)), value)


def test_quantized_model_with_sparse_attention(tiny_model):
    model = tiny_model(seed=8, **QUANTIZABLE)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    sparse = AMAConfig(slice_len=8, budget=24, local_window=8)
    quantize_model(model, "int4", 32)
    exact = model(ids).logits
    model.decoder.set_attention(sparse)
    approx = model(ids).logits
    assert approx.shape == exact.shape and torch.isfinite(approx).all()
    assert not torch.equal(approx, exact)  # the sparse backend is really in use
    assert relative_error(approx, exact) < 0.5


def test_quantize_model_swaps_all_linears_and_keeps_embedding_float(tiny_model):
    model = tiny_model(seed=0, **QUANTIZABLE)
    ids = torch.randint(0, 128, (2, 12))
    reference = model(ids).logits
    quantized = quantize_model(copy.deepcopy(model), "int4", 32)
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    assert isinstance(quantized.model.layers[0].mlp.down_proj, WeightOnlyInt4Linear)
    assert isinstance(quantized.lm_head, WeightOnlyInt8Linear)  # the head defaults to int8
    assert quantized.model.embed_tokens.weight.dtype == torch.float32
    assert relative_error(quantized(ids).logits, reference) < 0.1
    float_head = quantize_model(copy.deepcopy(model), "int8", head_mode=None)
    assert type(float_head.lm_head) is nn.Linear


def test_classifier_head_stays_float(tiny_model):
    model = tiny_model(model_class=LaFormerForSequenceClassification, id2label={0: "a", 1: "b"}, **QUANTIZABLE)
    quantize_model(model, "int8")
    assert type(model.score) is nn.Linear and is_quantized(model)


@pytest.mark.parametrize("mode, group_size", [("int8", None), ("int8", 32), ("int4", 32), ("int4", 64)])
def test_save_load_roundtrip_is_identical(tiny_model, tmp_path, mode, group_size):
    model = quantize_model(tiny_model(seed=1, **QUANTIZABLE), mode, group_size)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["mode"] == mode
    assert config["laformer"]["quantization_config"]["quant_method"] == "laformer"
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 9))
    assert type(loaded.model.layers[1].self_attn.k_proj) is type(model.model.layers[1].self_attn.k_proj)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(loaded(ids[:1, :1]).logits, model(ids[:1, :1]).logits)  # kernel path too


def test_quantized_causal_checkpoint_loads_as_classifier(tiny_model, tmp_path):
    quantize_model(tiny_model(seed=6, **QUANTIZABLE), "int8").save_pretrained(tmp_path)
    classifier = LaFormerForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert isinstance(classifier.model.layers[0].mlp.up_proj, WeightOnlyInt8Linear)
    assert type(classifier.score) is nn.Linear
    assert classifier(torch.randint(0, 128, (2, 5))).logits.shape == (2, 3)


def test_bfloat16_load_keeps_scales_float16(tiny_model, tmp_path):
    quantize_model(tiny_model(seed=2, **QUANTIZABLE), "int4", 32).save_pretrained(tmp_path)
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.scales.dtype == torch.float16 and layer.mins.dtype == torch.float16
    assert loaded(torch.randint(0, 128, (1, 5))).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_checkpoints_with_float32_scales_still_load(tiny_model, tmp_path, mode):
    """Checkpoints saved before scales became float16 load unchanged (their scales are float16 values)."""
    model = quantize_model(tiny_model(seed=4, **QUANTIZABLE), mode, 32).eval()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    assert state["model.layers.0.mlp.up_proj.scales"].dtype == torch.float16
    save_file({k: v.float() if k.endswith((".scales", ".mins")) else v for k, v in state.items()}, weights,
              metadata={"format": "pt"})
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.layers[0].mlp.up_proj.scales.dtype == torch.float16
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_from_pretrained_quantize_argument(tiny_model, tmp_path):
    model = tiny_model(seed=3, **QUANTIZABLE)
    model.save_pretrained(tmp_path / "float")
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path / "float", quantize="int4", group_size=32)
    expected = quantize_model(copy.deepcopy(model), "int4", 32)
    ids = torch.randint(0, 128, (1, 7))
    assert torch.equal(loaded(ids).logits, expected(ids).logits)
    loaded.save_pretrained(tmp_path / "q")
    with pytest.raises(ConfigError, match="already quantized"):
        LaFormerForCausalLM.from_pretrained(tmp_path / "q", quantize="int8")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="int3"), "not supported"),
        (dict(mode="int4", group_size=48), "multiple of 32"),
        (dict(mode="int4", group_size=128 + 64), "divides in_features"),  # 192 does not divide 64 or 128
        (dict(mode="int8", group_size=0), "group_size"),
        (dict(mode="int8", head_mode="fp8"), "not supported"),
    ],
)
def test_bad_arguments_raise_config_error(tiny_model, kwargs, message):
    model = tiny_model(seed=0, **QUANTIZABLE)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=message):
        quantize_model(model, **kwargs)
    assert not is_quantized(model)  # validated before anything was swapped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_mode_in_from_pretrained(tiny_model, tmp_path):
    tiny_model(seed=0, **QUANTIZABLE).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="int3"):
        LaFormerForCausalLM.from_pretrained(tmp_path, quantize="int3")


def test_cli_quantize_writes_a_loadable_checkpoint(tiny_model, tmp_path, capsys):
    model = tiny_model(seed=4, **QUANTIZABLE)
    model.save_pretrained(tmp_path / "float")
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q"), "--mode", "int4", "--group-size", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path / "q")
    ids = torch.randint(0, 128, (1, 6))
    assert torch.equal(loaded(ids).logits, quantize_model(model, "int4", 32)(ids).logits)
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q")]) == 1  # OUT_DIR not empty


def test_default_model_int8_perplexity_within_one_percent(default_model, eval_ids, fp32_perplexity):
    quantized = quantize_model(copy.deepcopy(default_model), "int8")
    assert perplexity(quantized, eval_ids) < 1.01 * fp32_perplexity

