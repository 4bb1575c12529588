"""AMA inside the engine's native decode step (``ama/step.py`` and the hook in ``inference/decode_step.c``)."""

from __future__ import annotations

import copy

import pytest
import torch

from laformer.ama import AMAConfig, kernel
from laformer.ama.cache import summarize
from laformer.cache import KVCache
from laformer.inference.engine import engine_for
from laformer.inference.native_step import native_available
from laformer.quantization import quantize_model

pytestmark = pytest.mark.skipif(not (kernel.available() and native_available()),
                                reason="no C compiler (or no AVX2) for the native step and the AMA kernel")

# Prompts longer than the budget, so slices are chosen from the first step, and 24 new tokens fill six more slices,
# which the kernel summarises itself.
CONFIGS = {
    "scan": AMAConfig(slice_len=4, budget=16, local_window=8),
    "bound-off": AMAConfig(slice_len=4, budget=16, local_window=8, score="bound", mediation="off"),
    "mean-dense": AMAConfig(slice_len=4, budget=16, local_window=8, score="mean", dense_layers=1),
}


def prompts(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-padded random prompts of the given lengths, and their mask (None when none is padded)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(2, 97, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, (None if bool(mask.all()) else mask)


# Batch 13 (over the 8 rows below which quantized products take the one-row kernel), prompts from 5 to 50 tokens:
# rows start inside the budget, at it and past it, and several fill a slice on different steps.
MIXED = [45, 30, 9, 41, 5, 50, 17, 33, 12, 48, 26, 38, 21]


def assert_generate_equals_eager(model, lengths: list[int], config: AMAConfig, new_tokens: int = 24) -> None:
    """Greedy ``model.generate`` with AMA runs the native step and gives the eager AMA loop's tokens."""
    ids, mask = prompts(lengths)
    engine = engine_for(model)
    native = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, attention=config)
    assert engine.path == "native", engine.native_problem
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, attention=config,
                               cache=KVCache(model.config.num_hidden_layers))
    assert torch.equal(native, reference)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lengths", [[37], [45, 30, 9, 41]], ids=["batch1", "mixed-batch"])
def test_generate_with_ama_on_the_native_step_equals_the_eager_reference(tiny_model, name, lengths):
    """Every score and mediation. The 9-token row starts within the budget and grows past it (its summaries are
    all built by the kernel)."""
    assert_generate_equals_eager(tiny_model, lengths, CONFIGS[name])


@pytest.mark.parametrize("mode", [None, "int8", "int4"], ids=["fp32", "int8", "int4"])
@pytest.mark.parametrize("lengths", [[37], MIXED], ids=["batch1", "batch13-mixed"])
def test_generate_with_ama_equals_the_eager_reference_for_every_weight_kind(tiny_model, native_arithmetic, mode,
                                                                            lengths):
    """The default scan score on float, int8 and int4 weights, one row and 13 rows of mixed lengths."""
    model = tiny_model
    if mode:
        model = quantize_model(copy.deepcopy(tiny_model), mode, 32)
    assert_generate_equals_eager(model, lengths, CONFIGS["scan"], new_tokens=16)


def test_native_summaries_equal_the_pytorch_ones(tiny_model):
    """The slices the kernel summarised during decoding hold what ``cache.summarize`` computes from the keys."""
    ids, mask = prompts([30, 17])
    config = AMAConfig(slice_len=4, budget=16, local_window=8)
    tiny_model.set_attention(config)
    try:
        engine = engine_for(tiny_model)
        tiny_model.generate(ids, attention_mask=mask, max_new_tokens=20)
        assert engine.path == "native"
        backend = tiny_model.decoder.layers[1].self_attn.backend
        cache, length = engine.cache, engine.cache.get_seq_length()
        n = length // config.slice_len
        buffers = backend._native._buffers[1]
        valid = engine.valid[:, :length]
        expected = summarize(cache.keys[1][:, :, :length], cache.values[1][:, :, :length], valid, 4, 0, n)
        assert bool((buffers["summarised"] >= n - 1).all())  # the last token's slice may be still unsummarised
        n = int(buffers["summarised"].min())
        torch.testing.assert_close(buffers["kmean"][:, :, :n], expected.kmean[:, :, :n], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(buffers["vmean"][:, :, :n], expected.vmean[:, :, :n], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(buffers["log_count"][:, :, :n], expected.log_count[:, :, :n].expand(-1, 2, -1))
        assert torch.equal(buffers["key_codes"][:, :, : n * 4], expected.key_codes[:, :, :n].flatten(2, 3))
        torch.testing.assert_close(buffers["key_scales"][:, :, : n * 4], expected.key_scales[:, :, :n].flatten(2))
    finally:
        tiny_model.set_attention(None)


def test_what_the_kernel_does_not_do_decodes_on_the_pytorch_step(tiny_model):
    ids, _ = prompts([30])
    config = AMAConfig(slice_len=4, budget=16, local_window=8, mediation="learned")
    tiny_model.set_attention(config)
    try:
        engine = engine_for(tiny_model)
        native = tiny_model.generate(ids, max_new_tokens=6)
        assert engine.path == "eager" and "learned gate" in engine.native_problem
        reference = tiny_model.generate(ids, max_new_tokens=6, cache=KVCache(tiny_model.config.num_hidden_layers))
        assert torch.equal(native, reference)
    finally:
        tiny_model.set_attention(None)
        for layer in tiny_model.decoder.layers:  # the learned gates were attached to the shared module fixture
            del layer.self_attn.ama_gate
