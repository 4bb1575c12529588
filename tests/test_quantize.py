"""Weight-only quantization: layer accuracy, kernel vs fallback, checkpoints, GGUF blocks taken over exactly."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from laformer import ConfigError, LaFormerConfig, LaFormerForCausalLM, LaFormerForSequenceClassification
from laformer import native
from laformer.quantization import (
    WeightOnlyInt4Linear,
    WeightOnlyInt8Linear,
    is_quantized,
    kernels,
    quantize_model,
    set_int8_activations,
)
from laformer.quantization.linear import PEAKED_ROWS, pack_int4, unpack_int4

TEXT = (
    "The history of the city begins in the Roman period, when a small settlement grew up at a crossing of the "
    "river. Over the following centuries it became a market town, and by the middle ages it was one of the "
    "largest ports of the region. Its cathedral, begun in the twelfth century, took almost two hundred years to "
    "complete, and the old town around it still follows the street plan of that time."
)


def require_kernel(available=kernels.available) -> None:
    """Skip where a kernel cannot exist (no AVX2, no C compiler, LAFORMER_NO_KERNELS); fail where it could but
    did not build, so a broken build never passes as a skip."""
    if available():
        return
    if native.kernels_disabled():
        pytest.skip("LAFORMER_NO_KERNELS is set: the fallback is tested alone")
    if not native.has_avx2():
        pytest.skip("no AVX2 on this CPU: the kernel cannot run here")
    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler: the kernel cannot be built here")
    pytest.fail("a C compiler and AVX2 are here, yet the kernel did not build (see the warning above)")


def tiny_config(**overrides) -> LaFormerConfig:
    values = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)
    values.update(overrides)
    return LaFormerConfig(**values)


def random_linear(in_features: int = 128, out_features: int = 96, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(linear.weight, std=0.05)
    return linear


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "make, tolerance",
    [
        (lambda l: WeightOnlyInt8Linear.from_float(l), 0.01),
        (lambda l: WeightOnlyInt8Linear.from_float(l, 32), 0.01),
        (lambda l: WeightOnlyInt4Linear.from_float(l, 32), 0.10),
        (lambda l: WeightOnlyInt4Linear.from_float(l, 64), 0.12),
    ],
    ids=["int8-channel", "int8-g32", "int4-g32", "int4-g64"],
)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 40])  # x is (2, rows, 128): kernel (blocks of 8, 4, 1 rows) and matmul
def test_quantized_linear_close_to_float(make, tolerance, rows):
    linear = random_linear()
    quantized = make(linear)
    x = torch.randn(2, rows, 128)
    with torch.no_grad():
        y, reference = quantized(x), linear(x)
        exact = F.linear(x, quantized.dequantize())
        quantized.int8_activations = False
        weight_only = quantized(x)
    assert y.shape == reference.shape
    assert relative_error(y, reference) < tolerance
    assert relative_error(y, exact) < 0.01  # int8 activations (per-channel int8 above 8 rows) cost ~0.4%
    torch.testing.assert_close(weight_only, exact, rtol=1e-5, atol=1e-5)  # kernel == its own dequantized weights


def per_channel_weights(layer) -> torch.Tensor:
    """The weights ``int8_matmul`` multiplies: a per-channel int8 layer's own; a grouped layer's dequantized and
    rounded to one int8 scale per output row."""
    w = layer.dequantize()
    if layer.bits == 8 and layer.group_size == layer.in_features:
        return w
    scale = w.abs().amax(1, keepdim=True) / 127
    return torch.round(w * (1 / scale)) * scale


def int8_matmul_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``int8_matmul``'s arithmetic in float: the 16 largest input channels exact, the rest rounded per row to
    int8, and the rounding residual rounded again when the rows are peaked."""

    def round_rows(v: torch.Tensor) -> torch.Tensor:
        scale = v.abs().amax(1, keepdim=True) / 127
        return torch.round(v * torch.where(scale > 0, 1 / scale, 0)) * scale

    outliers = x.abs().amax(0).topk(16).indices
    inner = x.clone()
    inner[:, outliers] = 0
    rounded = round_rows(inner)
    square_mean = inner.square().mean(1)
    peak = torch.where(square_mean > 0, inner.abs().amax(1).square() / square_mean, 0).mean()
    if peak > PEAKED_ROWS**2:
        rounded += round_rows(inner - rounded)
    rounded[:, outliers] = x[:, outliers]
    return F.linear(rounded, weight)


@pytest.mark.parametrize("kind", ["int8-channel", "int8-g32", "int4-g32"])
@pytest.mark.parametrize("peaked", [False, True], ids=["one-product", "with-residual"])
@pytest.mark.parametrize("rows", [9, 64])
def test_int8_matmul_for_many_rows(kind, rows, peaked):
    """Above 8 rows quantized layers multiply int8 activations by per-channel int8 weights with torch._int_mm,
    outlier channels in float; gradients and set_int8_activations(False) keep the float path."""
    require_kernel(kernels.int8_rows_available)
    in_features = 260 if kind == "int8-channel" else 256  # 260: a tail after 8-wide rows
    linear = random_linear(in_features, 83)  # 83: a tail after the 8-wide columns
    layer = {"int8-channel": lambda: WeightOnlyInt8Linear.from_float(linear),
             "int8-g32": lambda: WeightOnlyInt8Linear.from_float(linear, 32),
             "int4-g32": lambda: WeightOnlyInt4Linear.from_float(linear, 32)}[kind]()
    torch.manual_seed(1)
    x = torch.randn(rows, in_features)
    if peaked:  # a few large values per row beyond the outlier channels, as the SwiGLU product entering down_proj
        x = torch.where(torch.rand(rows, in_features) < 0.02, 60 * x, x)
    x[:, [3, 77, 200]] *= 40  # outlier channels, as in LLaMA activations
    x[1] = 0  # an all-zero row: scale 0, no division by zero
    with torch.no_grad():
        y = layer(x)
        torch.testing.assert_close(y, int8_matmul_reference(x, per_channel_weights(layer)), rtol=1e-4, atol=1e-4)
        exact = F.linear(x, layer.dequantize())
        assert relative_error(y, exact) < (1e-4 if peaked and kind == "int8-channel" else 0.01)
        assert torch.equal(y[1], torch.zeros(83))
        assert set_int8_activations(nn.Sequential(layer), False) == 1
        torch.testing.assert_close(layer(x), exact, rtol=1e-5, atol=1e-5)
    layer.int8_activations = True
    x.requires_grad_(True)
    layer(x).sum().backward()  # training keeps the differentiable float path (QLoRA)
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(rows, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 8])
def test_kernel_matches_fallback(monkeypatch, rows):
    """The kernel (which must run) against the dequantize-then-matmul fallback (which must run too)."""
    require_kernel()
    linear = random_linear(256, 80)
    layers = [WeightOnlyInt8Linear.from_float(linear), WeightOnlyInt8Linear.from_float(linear, 64),
              WeightOnlyInt4Linear.from_float(linear, 64), WeightOnlyInt4Linear.from_float(linear, 32)]
    x = torch.randn(rows, 256)
    calls = []
    qgemm = kernels.qgemm
    monkeypatch.setattr(kernels, "qgemm", lambda *args: calls.append(args[4]) or qgemm(*args))
    with torch.no_grad():
        fast = [layer(x) for layer in layers]
        assert calls == [8, 8, 4, 4], "every layer must have gone through the kernel"
        monkeypatch.setattr(kernels, "available", lambda: False)
        slow = [layer(x) for layer in layers]
    assert len(calls) == 4, "the fallback must not call the kernel"
    for layer, a, b in zip(layers, fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, F.linear(x, layer.dequantize()))


def test_kernel_is_built_on_x86():
    require_kernel()
    if shutil.which("g++") or shutil.which("c++"):
        assert kernels.backend() == "native"  # the C++ operator, not the slower-to-call ctypes one


@pytest.mark.parametrize("bits", [8, 4])
def test_ctypes_kernel_equals_the_operator(bits):
    """The ctypes build is the fallback when the C++ operator cannot be built: same kernel, same numbers."""
    require_kernel()
    layer = (WeightOnlyInt8Linear.from_float(random_linear(256, 80), 64) if bits == 8
             else WeightOnlyInt4Linear.from_float(random_linear(256, 80), 64))
    args = (torch.randn(6, 256), layer.qweight, layer.scales, getattr(layer, "mins", None), bits, 64)
    assert torch.equal(kernels.qgemm(*args), kernels.ctypes_kernel()(*args))


def int8_activation_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The native decode step's arithmetic: activations rounded to ggml Q8_0 blocks (per 32 values, scale
    max |x| / 127, round half to even) times the dequantized weights, 4-bit minimums applied to the float x."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    rounded = (torch.round(blocks * inverse) * (amax / 127)).reshape(x.shape)
    y = F.linear(rounded, layer.dequantize())
    if layer.bits == 4:
        y = y + F.linear(x - rounded, layer.mins.float().repeat_interleave(layer.group_size, dim=1))
    return y


@pytest.mark.parametrize("rows", [1, 3, 4, 8])  # the kernel's row blocks: 8, 4 and single rows
@pytest.mark.parametrize("bits, group_size", [(8, 32), (8, None), (4, 32), (4, 64)])
def test_int8_activation_kernels(bits, group_size, rows):
    """The native decode step's kernels (ggml Q8_0 activations, as llama.cpp) against their arithmetic in torch."""
    require_kernel()
    linear = random_linear(256, 80)
    layer = (WeightOnlyInt8Linear.from_float(linear, group_size) if bits == 8
             else WeightOnlyInt4Linear.from_float(linear, group_size))
    x = torch.randn(rows, 256)
    x[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    y = kernels.ctypes_kernel()(x, layer.qweight, layer.scales, getattr(layer, "mins", None), bits, layer.group_size,
                                int8_activations=True)
    torch.testing.assert_close(y, int8_activation_reference(layer, x), rtol=1e-4, atol=1e-5)
    assert relative_error(y, F.linear(x, layer.dequantize())) < 0.015  # the rounding's cost: ~0.5%


def test_int4_pack_roundtrip_and_ggml_order():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 32)
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[:, 0] & 0x0F, q[:, 0]) and torch.equal(packed[:, 0] >> 4, q[:, 16])


def test_gradients_reach_inputs_for_qlora():
    from laformer.peft.lora import LoRALinear

    base = WeightOnlyInt4Linear.from_float(random_linear(), 32)
    lora = LoRALinear(base, r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(3, 128, requires_grad=True)
    lora(x).square().sum().backward()
    assert x.grad is not None and lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_training_on_quantized_base(mode):
    from laformer.peft import LoraConfig, get_peft_model

    model = quantize_model(LaFormerForCausalLM.from_config(tiny_config(), seed=5), mode, 32)
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


def test_quantized_model_with_sparse_attention():
    from laformer.ama import AMAConfig

    model = LaFormerForCausalLM.from_config(tiny_config(), seed=8).eval()
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    sparse = AMAConfig(slice_len=8, budget=24, local_window=8)
    quantize_model(model, "int4", 32)
    exact = model(ids).logits
    model.decoder.set_attention(sparse)
    approx = model(ids).logits
    assert approx.shape == exact.shape and torch.isfinite(approx).all()
    assert not torch.equal(approx, exact)  # the sparse backend is really in use
    assert relative_error(approx, exact) < 0.5


def test_quantize_model_swaps_all_linears_and_keeps_embedding_float():
    model = LaFormerForCausalLM.from_config(tiny_config(), seed=0).eval()
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


def test_classifier_head_stays_float():
    model = LaFormerForSequenceClassification.from_config(tiny_config(id2label={0: "a", 1: "b"}), seed=0)
    quantize_model(model, "int8")
    assert type(model.score) is nn.Linear and is_quantized(model)


@pytest.mark.parametrize("mode, group_size", [("int8", None), ("int8", 32), ("int4", 32), ("int4", 64)])
def test_save_load_roundtrip_is_identical(tmp_path, mode, group_size):
    model = quantize_model(LaFormerForCausalLM.from_config(tiny_config(), seed=1).eval(), mode, group_size)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["mode"] == mode
    assert config["laformer"]["quantization_config"]["quant_method"] == "laformer"
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 9))
    assert type(loaded.model.layers[1].self_attn.k_proj) is type(model.model.layers[1].self_attn.k_proj)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(loaded(ids[:1, :1]).logits, model(ids[:1, :1]).logits)  # kernel path too


def test_quantized_causal_checkpoint_loads_as_classifier(tmp_path):
    quantize_model(LaFormerForCausalLM.from_config(tiny_config(), seed=6), "int8").save_pretrained(tmp_path)
    classifier = LaFormerForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert isinstance(classifier.model.layers[0].mlp.up_proj, WeightOnlyInt8Linear)
    assert type(classifier.score) is nn.Linear
    assert classifier(torch.randint(0, 128, (2, 5))).logits.shape == (2, 3)


def test_bfloat16_load_keeps_scales_float16(tmp_path):
    quantize_model(LaFormerForCausalLM.from_config(tiny_config(), seed=2), "int4", 32).save_pretrained(tmp_path)
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.scales.dtype == torch.float16 and layer.mins.dtype == torch.float16
    assert loaded(torch.randint(0, 128, (1, 5))).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_checkpoints_with_float32_scales_still_load(tmp_path, mode):
    """Checkpoints saved before scales became float16 load unchanged (their scales are float16 values)."""
    from safetensors.torch import load_file, save_file

    model = quantize_model(LaFormerForCausalLM.from_config(tiny_config(), seed=4), mode, 32).eval()
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


def test_from_pretrained_quantize_argument(tmp_path):
    model = LaFormerForCausalLM.from_config(tiny_config(), seed=3).eval()
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
def test_bad_arguments_raise_config_error(kwargs, message):
    model = LaFormerForCausalLM.from_config(tiny_config(), seed=0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=message):
        quantize_model(model, **kwargs)
    assert not is_quantized(model)  # validated before anything was swapped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_mode_in_from_pretrained(tmp_path):
    LaFormerForCausalLM.from_config(tiny_config(), seed=0).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="int3"):
        LaFormerForCausalLM.from_pretrained(tmp_path, quantize="int3")


@pytest.mark.parametrize("qtype_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_ggml_blocks_dequantize_exactly_like_gguf(tmp_path, qtype_name):
    """A tiny GGUF written with gguf.GGUFWriter: our layer's weight equals gguf's own dequantization bit for bit."""
    gguf = pytest.importorskip("gguf")
    from laformer.quantization.gguf import linear_from_ggml

    qtype = gguf.GGMLQuantizationType[qtype_name]
    weight = np.random.default_rng(0).normal(0, 0.05, (48, 96)).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(str(path)).tensors[0]
    layer = linear_from_ggml(np.asarray(tensor.data), qtype, (48, 96))
    expected = torch.from_numpy(gguf.quants.dequantize(np.asarray(tensor.data), qtype).astype(np.float32))
    assert isinstance(layer, WeightOnlyInt8Linear if qtype_name == "Q8_0" else WeightOnlyInt4Linear)
    assert torch.equal(layer.dequantize(), expected.reshape(48, 96))
    x = torch.randn(2, 96)
    torch.testing.assert_close(layer(x), x @ expected.reshape(48, 96).T, rtol=1e-5, atol=1e-5)


def test_cli_quantize_writes_a_loadable_checkpoint(tmp_path, capsys):
    from laformer.cli import main

    model = LaFormerForCausalLM.from_config(tiny_config(), seed=4).eval()
    model.save_pretrained(tmp_path / "float")
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q"), "--mode", "int4", "--group-size", "32"]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path / "q")
    ids = torch.randint(0, 128, (1, 6))
    assert torch.equal(loaded(ids).logits, quantize_model(model, "int4", 32)(ids).logits)
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q")]) == 1  # OUT_DIR not empty


# ------------------------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def eval_ids(default_tokenizer):
    return torch.tensor(default_tokenizer.encode(TEXT))


@pytest.fixture(scope="module")
def fp32_perplexity(default_model, eval_ids):
    from laformer.prune import perplexity

    return perplexity(default_model, eval_ids)


def test_default_model_int8_perplexity_within_one_percent(default_model, eval_ids, fp32_perplexity):
    from laformer.prune import perplexity

    quantized = quantize_model(copy.deepcopy(default_model), "int8")
    assert perplexity(quantized, eval_ids) < 1.01 * fp32_perplexity


def test_default_model_int4_takes_gguf_blocks_exactly(default_model, default_gguf_path, eval_ids, fp32_perplexity):
    from laformer.formats.gguf import read_gguf_tensors
    from laformer.prune import perplexity

    raw = read_gguf_tensors(default_gguf_path)
    quantized = quantize_model(copy.deepcopy(default_model), "int4", gguf_tensors=raw)
    q_proj = quantized.model.layers[3].self_attn.q_proj  # rows un-permuted at the GGUF boundary, blocks intact
    assert isinstance(q_proj, WeightOnlyInt4Linear) and q_proj.group_size == 32
    assert torch.equal(q_proj.dequantize(), default_model.model.layers[3].self_attn.q_proj.weight)
    assert torch.equal(quantized.lm_head.dequantize(), default_model.model.embed_tokens.weight)  # Q8_0, tied
    assert perplexity(quantized, eval_ids) < 1.05 * fp32_perplexity


@pytest.mark.parametrize("mode, qtype_name", [("int8", "Q8_0"), ("int4", "Q4_1"), ("int4", "Q4_0")])
def test_from_pretrained_gguf_takes_blocks_over(tmp_path, write_gguf, mode, qtype_name):
    """End to end on a tiny llama.cpp-style file: quantized layers equal the dequantized GGUF weights exactly."""
    import gguf

    from tests.formats.test_gguf import llama_cpp_tensors, llama_metadata  # the GGUF tests' llama.cpp layout

    source = LaFormerForCausalLM.from_config(tiny_config(vocab_size=96, pad_token_id=0), seed=7).eval()
    qtype = gguf.GGMLQuantizationType[qtype_name]
    path = write_gguf(tmp_path / "tiny.gguf", llama_metadata(source.config), llama_cpp_tensors(source), qtype)
    reference = LaFormerForCausalLM.from_pretrained(path)
    quantized = LaFormerForCausalLM.from_pretrained(path, quantize=mode)
    for name, module in quantized.named_modules():
        if name.endswith("_proj"):
            assert module.group_size == 32 and module.bits == int(mode[-1]), name
            assert torch.equal(module.dequantize(), reference.get_submodule(name).weight), name
    direct = quantized.config.extra["quantization_config"]["layers_from_gguf_blocks"]
    assert direct == 2 * 7 + (qtype_name == "Q8_0")  # the tied head is direct when the embedding is Q8_0
    ids = torch.randint(0, 96, (1, 8))
    torch.testing.assert_close(quantized(ids).logits, reference(ids).logits, rtol=0.05, atol=0.05)
