"""The native decode step (decode_step.c through native_step.py): its checked interface, the config fields it
assumes, and model.generate on it matching the reference loop for every batch size and weight kind."""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch

from laformer import GenerationError, LaFormerForCausalLM, native
from laformer.generation import generate
from laformer.inference import DecodeEngine, engine_for, native_step
from laformer.inference.native_step import config_problem, native_available
from laformer.quantization import quantize_model, set_int8_activations

from ._helpers import CONFIG, reference, relative_error

TEXT = ("The history of the city begins in the Roman period, when a small settlement grew up at a crossing of the "
        "river. Over the following centuries it became a market town, and by the middle ages it was one of the "
        "largest ports of the region. Its cathedral, begun in the twelfth century, took almost two hundred years.")

needs_native = pytest.mark.skipif(not native_available(),
                                  reason="no C compiler, no AVX2 or LAFORMER_NO_KERNELS: the native step is off")


def assert_decoded_natively(model) -> None:
    """The native step ran wherever it can; elsewhere (LAFORMER_NO_KERNELS, no compiler) the same test checks the
    PyTorch step against the reference instead."""
    engine = engine_for(model)
    if native_available():
        assert engine.path == "native", engine.native_problem
    else:
        assert engine.path == "eager" and "unavailable" in engine.native_problem


@needs_native
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_native_step_matches_the_pytorch_step(tiny, batch, mode, int8_activations):
    """Same logits step by step, on a left-padded batch, with a row refilled mid-way (continuous batching)."""
    ids, mask = batch
    model = copy.deepcopy(tiny)
    if mode:
        quantize_model(model, mode, 32)
    native, python = DecodeEngine(copy.deepcopy(model)), DecodeEngine(copy.deepcopy(model), native=False)
    logits = [engine.prefill(ids, mask, 12) for engine in (native, python)]
    assert native.path == "native" and python.path == "eager"
    tokens = logits[1].argmax(-1)
    for step in range(10):
        if step == 4:
            refill = torch.tensor([5, 9, 2, 7])
            torch.testing.assert_close(native.prefill_row(1, refill), python.prefill_row(1, refill))
        logits = [engine.decode(tokens) for engine in (native, python)]
        if mode is None:  # the same float arithmetic up to summation order
            torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
            assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
        else:  # a float rounding difference upstream can move an activation by one int8 step: close, not equal
            assert relative_error(logits[0], logits[1]) < 0.05
        tokens = logits[1].argmax(-1)
    for name in ("slot", "position", "valid"):
        assert torch.equal(getattr(native, name), getattr(python, name))
    for mine, theirs in zip(native.cache.keys + native.cache.values, python.cache.keys + python.cache.values):
        assert relative_error(mine, theirs) < (1e-5 if mode is None else 0.05)


@needs_native
def test_native_step_falls_back_where_it_does_not_apply(tiny, batch, monkeypatch):
    ids, mask = batch
    wrapped = copy.deepcopy(tiny)
    wrapped.model.layers[1].mlp.down_proj = torch.nn.Sequential(wrapped.model.layers[1].mlp.down_proj)
    engine = DecodeEngine(wrapped)
    expected = reference(tiny, ids, mask, max_new_tokens=4)
    torch.testing.assert_close(generate(wrapped, ids, mask, max_new_tokens=4, engine=engine), expected)
    assert engine.path == "eager" and "down_proj is a Sequential" in engine.native_problem
    half = DecodeEngine(copy.deepcopy(tiny).to(torch.bfloat16))
    half.prefill(ids, mask, 2)
    assert half.path == "eager" and "float32" in half.native_problem


@needs_native
def test_native_step_rejects_bad_tokens_and_a_full_cache_without_changing_state(tiny):
    engine = DecodeEngine(copy.deepcopy(tiny), max_length=8)
    engine.prefill(torch.tensor([[1, 2, 3]]), None, 1)
    before = engine.slot.clone(), engine.position.clone(), engine.valid.clone()
    with pytest.raises(GenerationError, match="outside the model's vocabulary"):
        engine.decode(torch.tensor([CONFIG["vocab_size"]]))
    assert all(torch.equal(a, b) for a, b in zip(before, (engine.slot, engine.position, engine.valid)))
    for _ in range(5):
        engine.decode(torch.tensor([4]))
    with pytest.raises(GenerationError, match="cache is full"):
        engine.decode(torch.tensor([4]))


@needs_native
@pytest.mark.parametrize("mode, cost", [("int8", 0.01), ("int4", 0.03)])
def test_native_step_on_the_default_model_scores_text_like_the_pytorch_step(default_gguf_path, default_tokenizer,
                                                                            mode, cost):
    """Teacher-forced through both steps: the int8 activations change the loss by little, the top choice rarely."""
    model = LaFormerForCausalLM.from_pretrained(default_gguf_path, quantize=mode)
    ids = default_tokenizer(TEXT, return_tensors="pt").input_ids[:, :64]
    native, python = DecodeEngine(model), DecodeEngine(copy.deepcopy(model), native=False)
    losses, agree = {native: 0.0, python: 0.0}, 0
    logits = {engine: engine.prefill(ids[:, :1], None, ids.shape[1]) for engine in (native, python)}
    for t in range(1, ids.shape[1]):
        for engine in (native, python):
            losses[engine] -= float(torch.log_softmax(logits[engine][0], -1)[ids[0, t]])
        agree += int(logits[native].argmax() == logits[python].argmax())
        if t < ids.shape[1] - 1:
            logits = {engine: engine.decode(ids[:, t]) for engine in (native, python)}
    assert native.path == "native" and python.path == "eager"
    assert abs(losses[native] / losses[python] - 1) < cost
    assert agree >= 0.85 * (ids.shape[1] - 1)


def mixed_batch(rows: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` left-padded prompts of 3 to 16 tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG["vocab_size"], (rows, 16), generator=generator)
    lengths = torch.randint(3, 17, (rows,), generator=generator)
    mask = (torch.arange(16)[None, :] >= 16 - lengths[:, None]).long()
    return ids, mask


class LetterTokenizer:
    """Decodes each id to one letter: enough for stop strings on a tiny model."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


@pytest.mark.parametrize("rows", [1, 13])
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_generate_on_the_native_step_equals_the_reference_loop(tiny, mode, rows):
    """model.generate, the public face: greedy tokens equal the eager loop's for any batch size and weight kind.

    Quantized models keep float activations here (``set_int8_activations(model, False)``), so both paths compute
    the same weight-only products; with int8 activations see the next test."""
    model = copy.deepcopy(tiny)
    if mode:
        set_int8_activations(quantize_model(model, mode, 32), False)
    ids, mask = mixed_batch(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert_decoded_natively(model)
    torch.testing.assert_close(out, reference(model, ids, mask, max_new_tokens=12), rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_int8_activations_on_13_rows_match_the_reference_with_the_same_arithmetic(tiny, mode, int8_activations):
    """The default (int8-rounded activations, as llama.cpp): int8 weights give the reference's tokens exactly.
    With 4-bit weights the rounding of an activation can flip on a 1-ulp difference upstream (their minimum terms
    cancel most of a product), so tokens may part; teacher-forced, the logits stay close at every step."""
    model = quantize_model(copy.deepcopy(tiny), mode, 32)
    ids, mask = mixed_batch(13)
    expected = reference(model, ids, mask, max_new_tokens=12)
    if mode == "int8":
        torch.testing.assert_close(model.generate(ids, attention_mask=mask, max_new_tokens=12), expected, rtol=0,
                                   atol=0)
    native, python = DecodeEngine(copy.deepcopy(model)), DecodeEngine(copy.deepcopy(model), native=False)
    logits = [engine.prefill(ids, mask, 12) for engine in (native, python)]
    for step in range(12):
        assert relative_error(logits[0], logits[1]) < 0.05
        tokens = expected[:, 16 + step]
        logits = [engine.decode(tokens) for engine in (native, python)]
    assert native.path == "native"


def test_sampling_on_the_native_step_is_reproducible_and_matches_the_reference(tiny):
    model = copy.deepcopy(tiny)
    ids, mask = mixed_batch(13, seed=3)
    options = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=30, top_p=0.95, seed=7)
    first = model.generate(ids, attention_mask=mask, **options)
    assert_decoded_natively(model)
    torch.testing.assert_close(model.generate(ids, attention_mask=mask, **options), first, rtol=0, atol=0)
    torch.testing.assert_close(first, reference(model, ids, mask, **options), rtol=0, atol=0)
    assert not torch.equal(model.generate(ids, attention_mask=mask, **{**options, "seed": 8}), first)


def test_stop_strings_end_rows_at_the_same_place_on_both_paths(tiny):
    model, tokenizer = copy.deepcopy(tiny), LetterTokenizer()
    ids, mask = mixed_batch(13, seed=4)
    free = reference(model, ids, mask, max_new_tokens=12)
    stop = tokenizer.decode(free[0, 16 + 3:16 + 5])  # what row 0 writes at its 4th and 5th new tokens
    options = dict(max_new_tokens=12, stop_strings=[stop], tokenizer=tokenizer, return_dict=True)
    native, expected = model.generate(ids, attention_mask=mask, **options), reference(model, ids, mask, **options)
    assert_decoded_natively(model)
    torch.testing.assert_close(native.sequences, expected.sequences, rtol=0, atol=0)
    assert native.num_new_tokens == expected.num_new_tokens and native.num_new_tokens[0] <= 5
    assert native.finish_reasons == expected.finish_reasons and native.finish_reasons[0] == "stop"


@pytest.mark.parametrize("fields, reason", [
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling type 'dynamic'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "attention_factor": 0.5}), "attention_factor"),
    (dict(head_dim=12), "head_dim 12"),
    (dict(head_dim=264), "head_dim 264"),
    (dict(num_key_value_heads=3), "4 attention heads over 3 key/value heads"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps 0.0"),
    (dict(hidden_size=80), "hidden_size 80"),
    (dict(intermediate_size=100), "intermediate_size 100"),
])
def test_config_fields_the_c_step_does_not_implement_are_named(tiny_config, fields, reason):
    config = tiny_config(**CONFIG)
    assert config_problem(config) is None
    for name, value in fields.items():  # after construction: some of these the config itself would refuse
        setattr(config, name, value)
    assert reason in config_problem(config)


@pytest.mark.parametrize("rope_scaling", [{"rope_type": "linear", "factor": 2.0},
                                          {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}])
def test_scaled_rotary_embeddings_decode_natively(tiny_model, rope_scaling):
    """Linear and Llama-3 scaling change only the inverse frequencies, which the C step reads from the model."""
    model = tiny_model(**CONFIG, rope_scaling=rope_scaling)
    ids, mask = mixed_batch(3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert_decoded_natively(model)
    torch.testing.assert_close(out, reference(model, ids, mask, max_new_tokens=8), rtol=0, atol=0)


@needs_native
def test_a_model_the_c_step_cannot_run_decodes_on_the_pytorch_step_with_the_reason(tiny):
    model = copy.deepcopy(tiny)
    model.model.layers[1].post_attention_layernorm.eps = 1e-2  # the C step applies one eps to every norm
    ids, mask = mixed_batch(3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    engine = engine_for(model)
    assert engine.path == "eager" and "layer 1 has a norm with eps 0.01" in engine.native_problem
    torch.testing.assert_close(out, reference(model, ids, mask, max_new_tokens=6), rtol=0, atol=0)


def mirror(name: str, fields: list[tuple[str, type]]) -> type:
    """A ctypes struct standing for decode_step.c's struct ``name``."""
    return type(f"_{name}", (ctypes.Structure,), {"_fields_": fields})


def corrupted_structs(which: str) -> tuple:
    """decode_step.c's mirrors with Linear's n and k swapped (same size: only the offsets tell), or with Step
    missing its last field (another size)."""
    linear, layer, model, step = native_step.STRUCTS
    if which == "swapped":
        fields = [(n, t) for n, t in linear._fields_]
        fields[4], fields[5] = fields[5], fields[4]
        return mirror("Linear", fields), layer, model, step
    return linear, layer, model, mirror("Step", [(n, ctypes.c_void_p) for n in
                                                 ("tokens", "slot", "position", "valid", "logits", "scratch")])


@pytest.fixture
def fresh_library():
    """The native step forgets its library before and after (a corrupted mirror is seen, then undone)."""
    native_step._library.cache_clear()
    yield
    native_step._library.cache_clear()


@needs_native
@pytest.mark.parametrize("corruption, match", [
    ("version", rf"decode_step\.c has ABI version {native_step.ABI_VERSION} but laformer expects "
                rf"{native_step.ABI_VERSION + 1}"),
    ("swapped", r"lays out its structs as 'Linear:\d+ .w@0 .scales@8 .mins@16 .bits@24 .n@32 .k@40 .*"
                r"mirror is 'Linear:\d+ .w@0 .scales@8 .mins@16 .bits@24 .k@32 .n@40"),
    ("short", r"Step:56 .* mirror is .*Step:48"),
])
def test_a_decode_library_of_another_abi_is_refused_by_generate(tiny, monkeypatch, fresh_library, corruption, match):
    """A ctypes mirror that disagrees with decode_step.c is refused at load with a clear error, never run."""
    if corruption == "version":
        monkeypatch.setattr(native_step, "ABI_VERSION", native_step.ABI_VERSION + 1)
    else:
        monkeypatch.setattr(native_step, "STRUCTS", corrupted_structs(corruption))
    with pytest.raises(native.ABIMismatchError, match=match):
        copy.deepcopy(tiny).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)


@pytest.mark.skipif(not native.has_avx2(), reason="no AVX2: the native step is never tried here")
def test_without_a_compiler_generate_warns_once_and_decodes_on_the_pytorch_step(tiny, monkeypatch, tmp_path,
                                                                                fresh_library):
    """CC=false and an empty kernel cache: the build fails, a warning says so, and generation still works."""
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("LAFORMER_CACHE", str(tmp_path))
    monkeypatch.delenv("LAFORMER_NO_KERNELS", raising=False)
    native.compiler_version.cache_clear()
    model = copy.deepcopy(tiny)
    ids, mask = mixed_batch(3)
    with pytest.warns(UserWarning, match=r"decode_step\.c unavailable .*decoding uses the slower PyTorch path"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    engine = engine_for(model)
    assert engine.path == "eager" and "unavailable" in engine.native_problem
    torch.testing.assert_close(out, reference(model, ids, mask, max_new_tokens=6), rtol=0, atol=0)
    native.compiler_version.cache_clear()
