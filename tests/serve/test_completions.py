"""Chat and plain completions through the real openai client against a real server (a 4-layer cut of the default
model): streamed text equals non-streamed greedy text equals the library's own greedy generation."""

from __future__ import annotations

import pytest
import torch

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]


def greedy_text(small_lm, ids: list[int], max_new_tokens: int) -> str:
    model, tokenizer = small_lm
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens)[0, len(ids):].tolist()
    return tokenizer.decode([t for t in out if t not in model.config.eos_token_ids], skip_special_tokens=True)


def chat_ids(small_lm, messages=MESSAGES) -> list[int]:
    return small_lm[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def test_chat_greedy_equals_library_generate_and_reports_usage(client, small_lm):
    reply = client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy_text(small_lm, chat_ids(small_lm), 12)
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(chat_ids(small_lm))
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_max_completion_tokens_is_honoured_like_max_tokens(client):
    reply = client.chat.completions.create(model="small", messages=MESSAGES, max_completion_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_streamed_chat_equals_non_streamed_and_ends_with_usage(client):
    whole = client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_cuts_the_text_and_finishes_with_stop(client):
    full = client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    stop = text[4:7]  # something the greedy reply is known to contain
    assert stop.strip(), text
    cut = client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=16, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]


def test_seeded_sampling_repeats_and_n_choices_differ(client):
    def sample(seed):
        return client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=10, temperature=1.0,
                                              seed=seed, n=2)

    first, again = sample(7), sample(7)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in again.choices]
    assert texts[0] != texts[1]
    assert first.usage.completion_tokens == 20


def test_logprobs_are_the_models_log_softmax(client, small_lm):
    model, _ = small_lm
    reply = client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=3, temperature=0,
                                           logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 3
    ids = chat_ids(small_lm)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    assert entries[0].logprob == pytest.approx(float(expected.max()), abs=1e-3)
    assert [t.logprob for t in entries[0].top_logprobs] == sorted((t.logprob for t in entries[0].top_logprobs),
                                                                  reverse=True)
    assert entries[0].top_logprobs[0].token == entries[0].token


def test_completions_take_strings_and_token_ids(client, small_lm):
    _, tokenizer = small_lm
    prompt = "The three primary colours are"
    ids = tokenizer.encode(prompt)
    by_text = client.completions.create(model="small", prompt=prompt, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model="small", prompt=ids, max_tokens=8, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == greedy_text(small_lm, ids, 8)
    two = client.completions.create(model="small", prompt=[prompt, "Once upon a time"], max_tokens=4, temperature=0,
                                    logprobs=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == by_text.choices[0].text[: len(two.choices[0].text)]
    assert len(two.choices[1].logprobs.tokens) == 4 and all(len(t) == 2 for t in two.choices[1].logprobs.top_logprobs)
    streamed = client.completions.create(model="small", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == by_text.choices[0].text


def test_a_second_turn_reuses_the_first_turns_keys(client, small_lm):
    first = [{"role": "user", "content": "Tell me about the sea."}]
    reply = client.chat.completions.create(model="small", messages=first, max_tokens=8, temperature=0)
    second = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                      {"role": "user", "content": "And the sky?"}]
    follow = client.chat.completions.create(model="small", messages=second, max_tokens=8, temperature=0)
    assert follow.usage.prompt_tokens_details.cached_tokens >= len(chat_ids(small_lm, first))
    assert follow.choices[0].message.content == greedy_text(small_lm, chat_ids(small_lm, second), 8)


def test_langchain_chat_openai_talks_to_the_server(small_server):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(base_url=small_server[0] + "/v1", api_key="unused", model="small",
                                       temperature=0, max_tokens=6, max_retries=0)
    assert chat.invoke("Hello").content == "".join(chunk.content for chunk in chat.stream("Hello"))
