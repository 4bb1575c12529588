"""The decode engine behind model.generate: the static cache, its steps (native, eager, compiled)."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch

from laformer import GenerationError
from laformer.generation import generate
from laformer.inference import DecodeEngine, StaticKVCache
from laformer.inference import engine_for
from laformer.inference.native_step import NativeStep, native_available
from laformer.quantization import quantize_model

from ._helpers import CONFIG, reference

needs_native = pytest.mark.skipif(not native_available(),
                                  reason="no C compiler, no AVX2 or LAFORMER_NO_KERNELS: no native step")


@needs_native
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_native_step_reads_the_models_own_weights_and_leaves_them_alone(tiny, mode):
    model = copy.deepcopy(tiny)
    if mode:
        quantize_model(model, mode, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(generate(model, ids, max_new_tokens=5), reference(model, ids, max_new_tokens=5))
    engine = engine_for(model)
    assert engine.path == "native"
    # Every weight the C step reads is one of the model's tensors: no copy, no second layout.
    model_pointers = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
    read = [linear.w for layer in engine._native_step._layers for linear in
            (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)]
    assert len(read) == 7 * CONFIG["num_hidden_layers"] and set(read) <= model_pointers
    # The model keeps its Hugging Face layout: same modules, same state dict.
    attn = model.model.layers[1].self_attn
    assert type(attn.q_proj) is type(model.model.layers[0].self_attn.k_proj) and not hasattr(attn, "qkv_proj")
    assert sorted(model.state_dict()) == sorted(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@needs_native  # unsupported() names the missing kernel first
def test_the_native_step_refuses_wrapped_projections_by_name(tiny):
    model = copy.deepcopy(tiny)
    model.model.layers[0].self_attn.q_proj = torch.nn.Sequential(model.model.layers[0].self_attn.q_proj)
    problem = NativeStep.unsupported(model, StaticKVCache(model.config, 1, 16))
    assert "layer 0 q_proj is a Sequential" in problem


@needs_native  # unsupported() names the missing kernel first
def test_the_native_step_refuses_qkv_projections_quantized_differently(tiny):
    model = copy.deepcopy(tiny)
    quantize_model(model, "int8", 32)
    model.model.layers[1].self_attn.q_proj.int8_activations = False  # k and v still round their input to int8
    problem = NativeStep.unsupported(model, StaticKVCache(model.config, 1, 16))
    assert "layer 1's q_proj/k_proj/v_proj are quantized differently" in problem


def test_peft_still_finds_q_proj_after_generate(tiny):
    from laformer.peft import LoraConfig, get_peft_model

    model = copy.deepcopy(tiny)
    before = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert sum("lora_A" in name for name, _ in lora.named_parameters()) == 2 * CONFIG["num_hidden_layers"]
    # A fresh LoRA is zero: same tokens, now through the PyTorch step (the native step takes no adapters).
    assert torch.equal(generate(lora, torch.tensor([[1, 2, 3]]), max_new_tokens=4), before)


def test_engine_is_built_once_and_follows_weights_changed_in_place(tiny):
    model = copy.deepcopy(tiny)
    ids = torch.tensor([[5, 6, 7, 8]])
    first = generate(model, ids, max_new_tokens=6)
    engine = engine_for(model)
    assert engine is engine_for(model) and engine.model is model
    generate(model, ids, max_new_tokens=6)
    assert engine_for(model) is engine
    assert copy.deepcopy(model).__dict__["_decode_engine"].engine is None  # copies start without one
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(-1.0)  # in place: same pointer, new version
    changed = generate(model, ids, max_new_tokens=6)
    assert torch.equal(changed, reference(model, ids, max_new_tokens=6))
    assert not torch.equal(changed, first)


def test_static_cache_in_plain_generate_matches_growable_cache(tiny, batch):
    ids, mask = batch
    expected = reference(tiny, ids, mask, max_new_tokens=12)
    cache = StaticKVCache(tiny.config, 3, 11 + 12)
    torch.testing.assert_close(generate(tiny, ids, mask, max_new_tokens=12, cache=cache), expected)
    assert cache.get_seq_length() == 11 + 11


def test_static_cache_errors(tiny):
    with pytest.raises(GenerationError, match="batch_size >= 1"):
        StaticKVCache(tiny.config, 0, 8)
    cache = StaticKVCache(tiny.config, 1, 8)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 9))
    with pytest.raises(GenerationError, match="larger max_length"):
        tiny(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(GenerationError, match="one source row per row"):
        cache.reorder(torch.tensor([0, 0]))


@pytest.mark.parametrize("native", [True, False])
def test_engine_equals_plain_generate_on_padded_batch(tiny, batch, native):
    ids, mask = batch
    expected = reference(tiny, ids, mask, max_new_tokens=20)
    engine = DecodeEngine(copy.deepcopy(tiny), native=native)
    torch.testing.assert_close(generate(engine.model, ids, mask, max_new_tokens=20, engine=engine), expected)
    # The buffers are reused by the next request; the result does not depend on what they held.
    torch.testing.assert_close(generate(engine.model, ids, mask, max_new_tokens=20, engine=engine), expected)
    assert engine.path == ("native" if native and native_available() else "eager")
    with torch.no_grad():
        logits = tiny(ids, mask).logits[:, -1]
    torch.testing.assert_close(engine.prefill(ids, mask), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_unpadded_prompts_prefill_on_the_causal_path(tiny, native, monkeypatch):
    """No padding: attention sees only the prompt's columns and no mask (SDPA's causal path); same results."""
    from laformer import attention

    ids = torch.randint(0, CONFIG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4))
    engine = DecodeEngine(copy.deepcopy(tiny), native=native)
    seen = []
    real_sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((k.shape[-2], kw.get("is_causal"))) or real_sdpa(q, k, v, **kw))
    with torch.no_grad():
        torch.testing.assert_close(engine.prefill(ids, None, 5), tiny(ids).logits[:, -1], rtol=1e-5, atol=1e-5)
    assert seen[0] == (9, True)
    torch.testing.assert_close(generate(engine.model, ids, max_new_tokens=8, engine=engine),
                               reference(tiny, ids, max_new_tokens=8))


def test_engine_with_sampling_and_repetition_penalty_matches_plain(tiny, batch):
    ids, mask = batch
    options = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=3)
    engine = DecodeEngine(copy.deepcopy(tiny))
    torch.testing.assert_close(generate(engine.model, ids, mask, engine=engine, **options),
                               reference(tiny, ids, mask, **options))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_engine_composes_with_quantized_models(tiny, batch, mode):
    """The PyTorch step keeps float activations: exactly plain generation (the native step is tested below)."""
    ids, mask = batch
    model = quantize_model(copy.deepcopy(tiny), mode, 32)
    expected = reference(model, ids, mask, max_new_tokens=10)
    engine = DecodeEngine(model, native=False)
    torch.testing.assert_close(generate(model, ids, mask, max_new_tokens=10, engine=engine), expected)


def test_engine_routes_attention_through_the_backend(tiny, batch):
    from laformer.attention import sdpa_attention

    calls = []

    def backend(q, k, v, mask, *, layer_idx, cache):
        calls.append((layer_idx, q.shape[-2], k.shape[-2]))
        return sdpa_attention(q, k, v, mask, layer_idx=layer_idx, cache=cache)

    ids, mask = batch
    engine = DecodeEngine(copy.deepcopy(tiny))
    out = generate(engine.model, ids, mask, max_new_tokens=3, engine=engine, attention=backend)
    torch.testing.assert_close(out, reference(tiny, ids, mask, max_new_tokens=3))
    assert [c[0] for c in calls[:2]] == [0, 1] and calls[0][1] == 11 and calls[-1][1] == 1
    assert calls[-1][2] == engine.cache.max_length  # the step sees the whole fixed-shape buffer, masked
    assert engine.path == "eager"
    assert "another attention backend" in engine.native_problem or not native_available()


def test_engine_errors(tiny):
    engine = DecodeEngine(copy.deepcopy(tiny))
    with pytest.raises(GenerationError, match="no cache yet"):
        engine.prefill_row(0, torch.tensor([1, 2]))
    with pytest.raises(GenerationError, match="exceed the model's context"):
        engine.reset(1, CONFIG["max_position_embeddings"] + 1)
    engine.reset(1, 16)
    with pytest.raises(GenerationError, match="row 1 does not exist"):
        engine.prefill_row(1, torch.tensor([1, 2]))
    with pytest.raises(GenerationError, match="does not fit"):
        engine.prefill_row(0, torch.arange(engine.cache.max_length))
    with pytest.raises(GenerationError, match="built on this model"):
        generate(tiny, torch.tensor([[1, 2]]), engine=engine)
    fixed = DecodeEngine(copy.deepcopy(tiny), max_length=32)
    with pytest.raises(GenerationError, match="fixed cache of 32"):
        fixed.reset(1, 33)
    fixed.reset(2, 5)
    assert fixed.cache.max_length == 32


def test_compile_failure_falls_back_to_eager_with_a_warning(tiny, batch, monkeypatch):
    def broken(*args, **kwargs):
        def fn(*a, **k):
            raise RuntimeError("no C++ compiler found")
        return fn

    monkeypatch.setattr(torch, "compile", broken)
    ids, mask = batch
    engine = DecodeEngine(copy.deepcopy(tiny), compile=True, native=False)
    with pytest.warns(RuntimeWarning, match="torch.compile is unavailable"):
        out = generate(engine.model, ids, mask, max_new_tokens=5, engine=engine)
    assert not engine.compiled
    torch.testing.assert_close(out, reference(tiny, ids, mask, max_new_tokens=5))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_compiled_step_gives_identical_greedy_tokens(tiny, batch):
    ids, mask = batch
    eager = DecodeEngine(copy.deepcopy(tiny), native=False)
    compiled = DecodeEngine(copy.deepcopy(tiny), compile=True, native=False)
    expected = generate(eager.model, ids, mask, max_new_tokens=12, engine=eager)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(compiled.model, ids, mask, max_new_tokens=12, engine=compiled)
    if not compiled.compiled:
        pytest.skip(f"torch.compile unavailable here: {[str(w.message) for w in caught]}")
    torch.testing.assert_close(out, expected)
    # Same shapes again: the compiled step is reused, and still exact.
    torch.testing.assert_close(generate(compiled.model, ids, mask, max_new_tokens=12, engine=compiled), expected)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_compiled_step_traces_the_quantized_kernel(tiny, batch):
    ids, mask = batch
    model = quantize_model(copy.deepcopy(tiny), "int8", 32)
    eager = DecodeEngine(copy.deepcopy(model), native=False)
    compiled = DecodeEngine(copy.deepcopy(model), compile=True, native=False)
    expected = generate(eager.model, ids[:1], max_new_tokens=6, engine=eager)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(compiled.model, ids[:1], max_new_tokens=6, engine=compiled)
    if not compiled.compiled:
        pytest.skip(f"torch.compile unavailable here: {[str(w.message) for w in caught]}")
    torch.testing.assert_close(out, expected)


