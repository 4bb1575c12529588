"""GGUF blocks (Q8_0, Q4_0, Q4_1) taken over as quantized layers exactly, from a tiny file and the default model."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from laformer import LaFormerForCausalLM
from laformer.formats.gguf import read_gguf_tensors
from laformer.prune import perplexity
from laformer.quantization import WeightOnlyInt4Linear, WeightOnlyInt8Linear, quantize_model
from laformer.quantization.gguf import linear_from_ggml
from tiny import llama_cpp_tensors, llama_metadata

from .helpers import QUANTIZABLE


@pytest.mark.parametrize("qtype_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_ggml_blocks_dequantize_exactly_like_gguf(tmp_path, write_gguf, qtype_name):
    """One matrix quantized by gguf's own writer: our layer's weight equals gguf's own dequantization bit for bit."""
    qtype = gguf.GGMLQuantizationType[qtype_name]
    weight = np.random.default_rng(0).normal(0, 0.05, (48, 96)).astype(np.float32)
    path = write_gguf(tmp_path / "tiny.gguf", tensors={"w": weight}, qtype=qtype)
    tensor = gguf.GGUFReader(str(path)).tensors[0]
    layer = linear_from_ggml(np.asarray(tensor.data), qtype, (48, 96))
    expected = torch.from_numpy(gguf.quants.dequantize(np.asarray(tensor.data), qtype).astype(np.float32))
    assert isinstance(layer, WeightOnlyInt8Linear if qtype_name == "Q8_0" else WeightOnlyInt4Linear)
    assert torch.equal(layer.dequantize(), expected.reshape(48, 96))
    x = torch.randn(2, 96)
    torch.testing.assert_close(layer(x), x @ expected.reshape(48, 96).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode, qtype_name", [("int8", "Q8_0"), ("int4", "Q4_1"), ("int4", "Q4_0")])
def test_from_pretrained_gguf_takes_blocks_over(tiny_model, tmp_path, write_gguf, mode, qtype_name):
    """End to end on a tiny llama.cpp-style file: quantized layers equal the dequantized GGUF weights exactly."""
    source = tiny_model(seed=7, **(QUANTIZABLE | dict(vocab_size=96, pad_token_id=0)))
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


def test_default_model_int4_takes_gguf_blocks_exactly(default_model, default_gguf_path, eval_ids, fp32_perplexity):
    raw = read_gguf_tensors(default_gguf_path)
    quantized = quantize_model(copy.deepcopy(default_model), "int4", gguf_tensors=raw)
    q_proj = quantized.model.layers[3].self_attn.q_proj  # rows un-permuted at the GGUF boundary, blocks intact
    assert isinstance(q_proj, WeightOnlyInt4Linear) and q_proj.group_size == 32
    assert torch.equal(q_proj.dequantize(), default_model.model.layers[3].self_attn.q_proj.weight)
    assert torch.equal(quantized.lm_head.dequantize(), default_model.model.embed_tokens.weight)  # Q8_0, tied
    assert perplexity(quantized, eval_ids) < 1.05 * fp32_perplexity

