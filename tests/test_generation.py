"""Generation: cache vs full recompute, batching, sampling, stopping, validation, streaming."""

from __future__ import annotations

import pytest
import torch

from laformer import GenerationError, LaFormerForCausalLM
from laformer.attention import sdpa_attention
from laformer.generation import generate, generate_steps, generate_text, logits_to_probs, stream

VOCAB = 48


# no EOS: generation runs its full length; a wide init spreads the logits away from near-ties
GENERATION = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, eos_token_id=None, initializer_range=0.2)


@pytest.fixture(scope="module")
def model(tiny_model) -> LaFormerForCausalLM:
    return tiny_model(**GENERATION)


class CharTokenizer:
    """Token i is the letter chr(97 + i % 26): enough to exercise stop strings and streaming."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + int(i) % 26) for i in ids)

    def stream_decoder(self, skip_special_tokens=True):
        tokenizer = self

        class Decoder:
            def step(self, token_id):
                return tokenizer.decode([token_id])

            def flush(self):
                return ""

        return Decoder()


def prompt(length: int, offset: int = 0) -> torch.Tensor:
    return (torch.arange(length) * 7 + offset) % VOCAB


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids


def test_greedy_with_cache_equals_full_recompute(model):
    ids = prompt(5)[None]
    assert torch.equal(generate(model, ids, max_new_tokens=12), greedy_without_cache(model, ids, 12))


def test_left_padded_batch_equals_one_at_a_time(model):
    prompts = [prompt(3, 1), prompt(8, 2), prompt(5, 3)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    batch = generate(model, ids, mask, max_new_tokens=10, repetition_penalty=1.3)
    for row, p in enumerate(prompts):
        alone = generate(model, p[None], max_new_tokens=10, repetition_penalty=1.3)
        assert torch.equal(batch[row, width:], alone[0, len(p):])


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(model):
    ids = prompt(4)[None].repeat(2, 1)
    state = torch.get_rng_state()
    first = generate(model, ids, max_new_tokens=16, do_sample=True, temperature=1.5, seed=1)
    again = generate(model, ids, max_new_tokens=16, do_sample=True, temperature=1.5, seed=1)
    other = generate(model, ids, max_new_tokens=16, do_sample=True, temperature=1.5, seed=2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)


def test_top_k_one_equals_greedy(model):
    ids = prompt(6)[None]
    sampled = generate(model, ids, max_new_tokens=10, do_sample=True, top_k=1, temperature=0.7, seed=3)
    assert torch.equal(sampled, generate(model, ids, max_new_tokens=10))


def test_logits_to_probs_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert (logits_to_probs(logits, top_k=2)[0, 2:] == 0).all()
    probs = logits.softmax(-1)  # about [0.64, 0.24, 0.09, 0.03]
    kept = logits_to_probs(logits, top_p=0.7)[0] > 0
    assert kept.tolist() == [True, True, False, False]
    assert logits_to_probs(logits, top_p=0.5)[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(logits_to_probs(logits, temperature=2.0), (logits / 2).softmax(-1))
    torch.testing.assert_close(logits_to_probs(logits), probs)


def test_eos_ends_rows_and_pads_them(model, tiny_model):
    ids = torch.stack([prompt(4, 1), prompt(4, 5)])
    free = generate(model, ids, max_new_tokens=10)
    eos = int(free[0, 4 + 2])  # row 0's third new token
    out = generate(model, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, return_dict=True)
    row0 = out.sequences[0, 4:].tolist()
    first_eos = row0.index(eos)
    assert first_eos <= 2 and out.num_new_tokens[0] == first_eos + 1
    assert row0[first_eos + 1:] == [0] * (len(row0) - first_eos - 1)
    assert out.finish_reasons[0] == "eos"
    # the config's eos is the default
    config_eos = tiny_model(**GENERATION | dict(eos_token_id=[eos]))
    assert torch.equal(generate(config_eos, ids, max_new_tokens=10, pad_token_id=0), out.sequences)


def test_stop_strings_end_generation(model):
    tokenizer = CharTokenizer()
    ids = prompt(5)[None]
    free = generate(model, ids, max_new_tokens=12)
    text = tokenizer.decode(free[0, 5:])
    stop = text[3:5]
    first = text.find(stop)
    out = generate(model, ids, max_new_tokens=12, stop_strings=stop, tokenizer=tokenizer, return_dict=True)
    assert out.num_new_tokens == [first + 2] and out.finish_reasons == ["stop"]
    assert tokenizer.decode(out.sequences[0, 5:]) == text[: first + 2]
    pieces = list(stream(model, ids, tokenizer, max_new_tokens=12, stop_strings=[stop]))
    assert "".join(pieces) == text[:first]


def test_stream_concatenates_to_generate(model):
    tokenizer = CharTokenizer()
    ids = prompt(5)[None]
    full = generate(model, ids, max_new_tokens=9)
    assert "".join(stream(model, ids, tokenizer, max_new_tokens=9)) == tokenizer.decode(full[0, 5:])


def test_repetition_penalty_changes_output(model):
    ids = prompt(6)[None]
    plain = generate(model, ids, max_new_tokens=24)
    penalised = generate(model, ids, max_new_tokens=24, repetition_penalty=3.0)
    assert not torch.equal(plain, penalised)
    assert len(set(penalised[0, 6:].tolist())) > len(set(plain[0, 6:].tolist()))


def test_attention_backend_is_routed_and_restored(model):
    calls = []

    def counting(q, k, v, mask, *, layer_idx, cache):
        calls.append(layer_idx)
        return sdpa_attention(q, k, v, mask, layer_idx=layer_idx, cache=cache)

    ids = prompt(5)[None]
    routed = generate(model, ids, max_new_tokens=3, attention=counting)
    assert torch.equal(routed, generate(model, ids, max_new_tokens=3))
    assert len(calls) == 3 * len(model.model.layers)

    def broken(q, k, v, mask, *, layer_idx, cache):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        generate(model, ids, max_new_tokens=3, attention=broken)
    assert all(layer.self_attn.backend is sdpa_attention for layer in model.model.layers)


def test_steps_stop_when_all_rows_finish(model):
    ids = prompt(4)[None]
    eos = int(generate(model, ids, max_new_tokens=1)[0, -1])
    assert len(list(generate_steps(model, ids, max_new_tokens=10, eos_token_id=eos))) == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(stop_strings=["x"]), "tokenizer"),
        (dict(stop_strings=[""], tokenizer=CharTokenizer()), "stop_strings"),
        (dict(max_new_tokens=60), "context"),
    ],
)
def test_invalid_options_raise(model, options, message):
    with pytest.raises(GenerationError, match=message):
        generate(model, prompt(5)[None], **options)


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (torch.zeros(1, 0, dtype=torch.long), None, "empty"),
        (prompt(5), None, "2-D"),
        (prompt(70)[None], None, "truncate"),
        (torch.tensor([[1, VOCAB]]), None, "vocabulary"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 0]]), "left padding"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 1, 1]]), "shape"),
        (torch.tensor([[1, 2], [3, 4]]), None, "one prompt"),
    ],
)
def test_invalid_inputs_raise(model, ids, mask, message):
    with pytest.raises(GenerationError, match=message):
        if message == "one prompt":
            list(stream(model, ids, CharTokenizer()))
        else:
            generate(model, ids, mask)


# --------------------------------------------------------------------------- the default model


def test_stream_matches_generate_on_multibyte_text(default_model, default_tokenizer):
    messages = [{"role": "user", "content": "Répète exactement: 你好世界 🙂🎉 你好"}]
    text = default_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = default_tokenizer(text, return_tensors="pt").input_ids
    full = generate(default_model, ids, max_new_tokens=24)
    expected = default_tokenizer.decode(full[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    pieces = list(stream(default_model, ids, default_tokenizer, max_new_tokens=24))
    assert "".join(pieces) == expected
    assert len(pieces) > 1 and "\ufffd" not in "".join(pieces)


def test_generate_text_chat_batch(default_model, default_tokenizer):
    prompts = ["What is the capital of France?", "Say hello."]
    answers = generate_text(default_model, default_tokenizer, prompts, chat=True, max_new_tokens=7)
    assert isinstance(answers, list) and len(answers) == 2
    assert "Paris" in answers[0]
    alone = generate_text(default_model, default_tokenizer, prompts[1], chat=True, max_new_tokens=7)
    assert alone == answers[1]
