"""Batched generation with continuous refilling: same tokens as one prompt at a time."""

from __future__ import annotations

import copy

import pytest
import torch

from laformer import GenerationError, LaFormerForCausalLM
from laformer.generation import generate
from laformer.inference import DecodeEngine
from laformer.inference.batching import generate_batch

CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3)
MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny(tiny_model) -> LaFormerForCausalLM:
    return tiny_model(**CONFIG)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 15, (7,), generator=g).tolist()
    return [torch.randint(0, CONFIG["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def one_at_a_time(model, prompts, eos: int | None) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        new = generate(model, torch.tensor([prompt]), max_new_tokens=MAX_NEW, eos_token_id=eos if eos is not None else [])
        new = new[0, len(prompt):].tolist()
        outputs.append(new[: new.index(eos) + 1] if eos in new else new)
    return outputs


@pytest.fixture(scope="module")
def eos(tiny, prompts) -> int:
    """The token greedy decoding produces most, so several rows finish early at different steps."""
    tokens = torch.tensor(sum(one_at_a_time(tiny, prompts, None), []))
    return int(tokens.bincount().argmax())


@pytest.mark.parametrize("continuous", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_greedy_equals_one_at_a_time(tiny, prompts, eos, continuous, batch_size):
    expected = one_at_a_time(tiny, prompts, eos)
    assert any(len(e) < MAX_NEW for e in expected) and any(len(e) == MAX_NEW for e in expected)
    engine = DecodeEngine(copy.deepcopy(tiny))
    out = generate_batch(engine, prompts, max_new_tokens=MAX_NEW, batch_size=batch_size, continuous=continuous,
                         eos_token_id=eos)
    assert out == expected


def test_sampling_is_reproducible_with_a_seed(tiny, prompts):
    engine = DecodeEngine(copy.deepcopy(tiny))
    options = dict(max_new_tokens=8, batch_size=3, do_sample=True, temperature=0.8, top_k=10, seed=7)
    first = generate_batch(engine, prompts, **options)
    assert generate_batch(engine, prompts, **options) == first
    assert all(len(o) == 8 for o in first)


@pytest.mark.parametrize(
    "prompts, options, message",
    [
        ([], {}, "non-empty list"),
        ([[1, 2], []], {}, "non-empty prompts"),
        ([[1, 500]], {}, "outside the vocabulary"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([[1, 2]], {"batch_size": 0}, "batch_size"),
        ([[1, 2]], {"do_sample": True, "temperature": 0.0}, "temperature"),
        ([[1] * 250], {"max_new_tokens": 10}, "context"),
    ],
)
def test_bad_input_raises(tiny, prompts, options, message):
    engine = DecodeEngine(copy.deepcopy(tiny))
    with pytest.raises(GenerationError, match=message):
        generate_batch(engine, prompts, **options)


@pytest.mark.slow
def test_default_model_batched_equals_single(default_model, default_tokenizer):
    texts = ["The capital of France is", "Once upon a time,", "def fibonacci(n):"]
    prompts = [default_tokenizer.encode(t) for t in texts]
    engine = DecodeEngine(default_model)  # a second engine over the session model, which it never changes
    expected = [generate(default_model, torch.tensor([p]), max_new_tokens=6, eos_token_id=[])[0, len(p):].tolist()
                for p in prompts]
    assert generate_batch(engine, prompts, max_new_tokens=6, batch_size=2, eos_token_id=[]) == expected
