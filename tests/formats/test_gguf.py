"""GGUF loading: dequantizers against gguf's reference, a tiny llama.cpp-style file round trip, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

from laformer import CheckpointError, LaFormerConfig, LaFormerForCausalLM
from laformer.formats import dequant, load_checkpoint
from laformer.formats.gguf import (
    is_gguf,
    llama3_scaling_from_divisors,
    load_gguf,
    read_gguf,
    read_gguf_metadata,
    read_gguf_tensors,
)
from laformer.rope import rope_inverse_frequencies
from tiny import llama_cpp_tensors, llama_metadata

QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
K_QUANTS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # byte offsets of each block's float16 scales


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid random raw data: random bytes, with the float16 scales set to small finite values."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block_size * type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    for offset in K_QUANTS.get(qtype, (type_size - 2,)):
        scales = (rng.standard_normal((blocks.shape[0], 1)) * 0.01).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8)
    return raw


def as_raw(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint8).reshape(array.shape[0], -1)


# --------------------------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(qtype):
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    stored = gguf.quants.quantize(x, qtype)
    expected = gguf.quants.dequantize(stored, qtype)
    ours = dequant.dequantize(as_raw(stored), qtype, (8, 256))
    assert ours.dtype == torch.float32 and ours.shape == (8, 256)
    np.testing.assert_array_equal(ours.numpy(), expected)


@pytest.mark.parametrize("qtype", list(K_QUANTS) + [Q.Q2_K], ids=lambda t: t.name)
def test_dequantize_k_quants_match_gguf_reference(qtype):
    raw = random_blocks(qtype, 4, 512)
    expected = gguf.quants.dequantize(raw, qtype)  # Q2_K goes through our numpy fallback
    np.testing.assert_array_equal(dequant.dequantize(raw, qtype, (4, 512)).numpy(), expected)


def test_dequantize_in_chunks_and_to_bfloat16(monkeypatch):
    monkeypatch.setattr(dequant, "_CHUNK_ELEMENTS", 96)  # several chunks per tensor, a ragged last one
    raw = random_blocks(Q.Q4_K, 7, 256)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q4_K))
    torch.testing.assert_close(dequant.dequantize(raw, Q.Q4_K, (7, 256)), expected, rtol=0, atol=0)
    bf16 = dequant.dequantize(raw, Q.Q4_K, (7, 256), torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16, expected.to(torch.bfloat16), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- tiny GGUF files


# vocab, widths and metadata as in a small llama.cpp conversion (hidden 64: two Q8_0/Q4_1 blocks per row)
GGUF_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def model(tiny_model) -> LaFormerForCausalLM:
    return tiny_model(**GGUF_TINY)


@pytest.fixture(scope="module")
def tiny_gguf(model, write_gguf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    return write_gguf(path, llama_metadata(model.config), llama_cpp_tensors(model))


def test_f32_gguf_round_trips_weights_and_logits(model, tiny_gguf):
    assert is_gguf(tiny_gguf)
    checkpoint = load_checkpoint(tiny_gguf)
    assert checkpoint.format == "gguf"
    config = checkpoint.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                  "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "rope_scaling"):
        assert getattr(config, field) == getattr(model.config, field), field
    expected = model.state_dict()
    assert set(checkpoint.state_dict) == set(expected)
    for name, tensor in checkpoint.state_dict.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    loaded = LaFormerForCausalLM.from_pretrained(tiny_gguf)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_quantized_gguf_matches_reference_dequantization(model, tmp_path, write_gguf):
    tensors = llama_cpp_tensors(model)
    path = write_gguf(tmp_path / "tiny-q8.gguf", llama_metadata(model.config), tensors, qtype=Q.Q8_0)
    reference = LaFormerForCausalLM.from_config(model.config).eval()
    state = {}
    for name, w in model.state_dict().items():  # what llama.cpp would compute: quantize, dequantize
        if w.ndim == 2:
            w = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), Q.Q8_0), Q.Q8_0))
        state[name] = w
    reference.load_state_dict(state)
    loaded = LaFormerForCausalLM.from_pretrained(path)
    assert loaded.checkpoint_info["tensor_types"]["model.layers.0.self_attn.q_proj.weight"] == "Q8_0"
    assert loaded.checkpoint_info["tensor_types"]["model.norm.weight"] == "F32"
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    bf16 = LaFormerForCausalLM.from_pretrained(path, dtype="bfloat16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(bf16(ids).logits.float(), reference(ids).logits, rtol=0, atol=0.05)


def test_raw_tensors_are_unpermuted_blocks(model, tmp_path, write_gguf):
    path = write_gguf(tmp_path / "tiny-q4.gguf", llama_metadata(model.config), llama_cpp_tensors(model), Q.Q4_1)
    tensors = read_gguf_tensors(path)
    info = tensors["model.layers.1.self_attn.k_proj.weight"]
    assert (info.gguf_name, info.type_name, info.shape) == ("blk.1.attn_k.weight", "Q4_1", (32, 64))
    hf_weight = model.state_dict()["model.layers.1.self_attn.k_proj.weight"].numpy()
    # Quantization is row-wise, so un-permuting the stored rows gives the blocks of the Hugging Face weight.
    np.testing.assert_array_equal(info.data, gguf.quants.quantize(hf_weight, Q.Q4_1))
    assert info.data.dtype == np.uint8 and info.data.shape == (32, 64 // 32 * 20)
    assert tensors["model.layers.1.mlp.up_proj.weight"].row_order is None


def test_tied_and_untied_output(tmp_path, write_gguf, tiny_model):
    untied = tiny_model(seed=1, **GGUF_TINY | dict(tie_word_embeddings=False))
    path = write_gguf(tmp_path / "untied.gguf", llama_metadata(untied.config), llama_cpp_tensors(untied))
    config, tensors = read_gguf(path)
    assert config.tie_word_embeddings is False and "lm_head.weight" in tensors
    loaded = LaFormerForCausalLM.from_pretrained(path)
    torch.testing.assert_close(loaded.lm_head.weight, untied.lm_head.weight, rtol=0, atol=0)


def test_metadata_reader(tiny_gguf):
    metadata = read_gguf_metadata(tiny_gguf)
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.ggml.tokens"][:3] == ["t0", "t1", "t2"]
    assert metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-5  # float32 shown at its shortest


# --------------------------------------------------------------------------------------------- rope scaling


def llama_cpp_rope_factors(theta: float, dim: int, scaling: dict) -> torch.Tensor:
    """convert_hf_to_gguf.py's ``rope_freqs`` for Llama 3.1 (per-frequency divisors)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old = scaling["original_max_position_embeddings"]
    low_wl, high_wl = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            factors.append(1.0)
        elif wavelen > low_wl:
            factors.append(scaling["factor"])
        else:
            low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return torch.tensor(factors, dtype=torch.float32)


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("theta,dim,scaling", [
    (500000.0, 128, LLAMA31),  # Llama 3.1 / 3.2
    (500000.0, 64, {**LLAMA31, "factor": 32.0}),  # Llama 3.2 1B
    (10000.0, 16, {**LLAMA31, "original_max_position_embeddings": 64, "high_freq_factor": 2.0}),
])
def test_llama3_scaling_rebuilt_from_rope_freqs(theta, dim, scaling):
    divisors = llama_cpp_rope_factors(theta, dim, scaling)
    rebuilt = llama3_scaling_from_divisors(divisors, theta, dim)
    config = dict(vocab_size=1, hidden_size=dim, num_attention_heads=1, rope_theta=theta)
    ours = rope_inverse_frequencies(LaFormerConfig(**config, rope_scaling=rebuilt))
    original = rope_inverse_frequencies(LaFormerConfig(**config, rope_scaling=scaling))
    torch.testing.assert_close(ours, original, rtol=1e-5, atol=0)
    assert rebuilt["factor"] == scaling["factor"]


def test_rope_freqs_tensor_and_linear_scaling_in_files(tmp_path, write_gguf, tiny_config):
    config = tiny_config(**GGUF_TINY | dict(hidden_size=128))
    model = LaFormerForCausalLM.from_config(config, seed=2)
    scaling = {**LLAMA31, "original_max_position_embeddings": 64, "high_freq_factor": 2.0}
    factors = llama_cpp_rope_factors(10000.0, 32, scaling).numpy()
    tensors = {**llama_cpp_tensors(model), "rope_freqs.weight": factors}
    path = write_gguf(tmp_path / "llama3.gguf", llama_metadata(config), tensors)
    loaded = read_gguf(path)[0]
    assert loaded.rope_scaling["rope_type"] == "llama3"
    expected = tiny_config(**GGUF_TINY | dict(hidden_size=128, rope_scaling=scaling))
    torch.testing.assert_close(rope_inverse_frequencies(loaded), rope_inverse_frequencies(expected))
    linear = llama_metadata(config, rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=4.0)
    path = write_gguf(tmp_path / "linear.gguf", linear, llama_cpp_tensors(model))
    assert read_gguf(path)[0].rope_scaling == {"rope_type": "linear", "factor": 4.0}
    yarn = llama_metadata(config, rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0)
    path = write_gguf(tmp_path / "yarn.gguf", yarn, llama_cpp_tensors(model))
    with pytest.raises(CheckpointError, match="rope scaling 'yarn'"):
        read_gguf(path)


# --------------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no GGUF file"):
        load_gguf(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="no model at"):
        load_checkpoint(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip file" * 10)
    assert not is_gguf(path)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(path)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [3, 30, 1000, -100])
def test_truncated_file(tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated|not a GGUF"):
        load_gguf(path)


def test_unsupported_architecture(model, tmp_path, write_gguf):
    path = write_gguf(tmp_path / "gpt2.gguf", llama_metadata(model.config), llama_cpp_tensors(model), arch="gpt2")
    with pytest.raises(CheckpointError, match="'gpt2' model"):
        load_gguf(path)


def test_unsupported_quant_type(model, tmp_path, write_gguf):
    tensors = llama_cpp_tensors(model)
    del tensors["blk.0.ffn_up.weight"]
    q8_1 = np.zeros((128, 64 // 32 * GGML_QUANT_SIZES[Q.Q8_1][1]), dtype=np.uint8)
    path = write_gguf(tmp_path / "q8_1.gguf", llama_metadata(model.config), tensors,
                      raw={"blk.0.ffn_up.weight": (q8_1, Q.Q8_1)})
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_up\.weight'.*Q8_1"):
        load_gguf(path)


def test_unexpected_and_missing_tensors(model, tmp_path, write_gguf):
    tensors = llama_cpp_tensors(model)
    bias = {"blk.0.attn_q.bias": np.zeros(64, np.float32)}
    path = write_gguf(tmp_path / "bias.gguf", llama_metadata(model.config), {**tensors, **bias})
    with pytest.raises(CheckpointError, match=r"'blk\.0\.attn_q\.bias'"):
        load_gguf(path)
    del tensors["blk.1.ffn_down.weight"]
    path = write_gguf(tmp_path / "missing.gguf", llama_metadata(model.config), tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        LaFormerForCausalLM.from_pretrained(path)


def test_metadata_that_does_not_match_weights(model, tmp_path, write_gguf, tiny_config):
    tensors = llama_cpp_tensors(model)
    config = tiny_config(**GGUF_TINY | dict(intermediate_size=96))
    path = write_gguf(tmp_path / "mismatch.gguf", llama_metadata(config), tensors)
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight.*shape"):
        LaFormerForCausalLM.from_pretrained(path)
