"""Continuous batching seen from clients: concurrent streams share decode steps and each still gets its own
greedy text; a full server answers 429 at once; a client that leaves frees its row."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

QUESTIONS = ["What is rain?", "Name a fruit.", "Count to five.", "Who wrote Hamlet?", "Say something kind.",
             "What is 2 + 2?"]


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_concurrent_streams_share_steps_and_each_equals_its_solo_text(client, small_server):
    scheduler = small_server[1].scheduler
    solo = [client.chat.completions.create(model="small", messages=chat(q), max_tokens=12, temperature=0)
            .choices[0].message.content for q in QUESTIONS]

    def stream(question: str) -> str:
        chunks = client.chat.completions.create(model="small", messages=chat(question), max_tokens=12,
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    steps, tokens = scheduler.steps, scheduler.generated_tokens
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:  # 6 streams on 4 rows: two wait, then join the batch
        together = list(pool.map(stream, QUESTIONS))
    assert together == solo
    generated = scheduler.generated_tokens - tokens
    assert generated == 12 * len(QUESTIONS)
    assert scheduler.steps - steps < generated / 2  # rows decoded together, not one request at a time


def test_the_batch_follows_the_load(client, small_server):
    scheduler = small_server[1].scheduler

    def rows_after(n: int) -> int:
        client.chat.completions.create(model="small", messages=chat("hi"), max_tokens=2, temperature=0, n=n)
        return scheduler.batch

    assert rows_after(3) == 4  # three requests at once: the next power of two
    assert rows_after(1) == 1  # a lone request decodes in a one-row batch
    assert rows_after(2) == 2
    assert rows_after(1) == 2  # shrinking waits until the load fits a quarter of the rows: no flapping


def test_more_choices_than_rows_and_queue_is_a_429(client, small_server):
    openai = pytest.importorskip("openai")
    scheduler = small_server[1].scheduler
    too_many = scheduler.max_batch + scheduler.max_queue + 1
    with pytest.raises(openai.RateLimitError, match="capacity"):
        client.chat.completions.create(model="small", messages=chat("hi"), max_tokens=2, n=too_many)
    fits = client.chat.completions.create(model="small", messages=chat("hi"), max_tokens=2, temperature=0,
                                          n=too_many - 1)
    assert len(fits.choices) == too_many - 1


def test_a_client_that_disconnects_frees_its_row(small_server):
    url, served = small_server
    scheduler = served.scheduler
    tokens = scheduler.generated_tokens
    body = {"model": "small", "messages": chat("Write a long story."), "max_tokens": 200, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    for _ in range(500):  # the row goes at the next step after the server notices; bounded wait, no timing check
        if scheduler.running == 0:
            break
        time.sleep(0.01)
    assert scheduler.running == 0
    assert scheduler.generated_tokens - tokens < 200


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(client, small_server, monkeypatch):
    openai = pytest.importorskip("openai")
    engine = small_server[1].scheduler.engine

    def broken(tokens):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine, "decode", broken)
    with pytest.raises(openai.InternalServerError, match="simulated kernel failure"):
        client.chat.completions.create(model="small", messages=chat("hi"), max_tokens=4, temperature=0)
    monkeypatch.undo()
    reply = client.chat.completions.create(model="small", messages=chat("hi"), max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4


def test_sparse_attention_serves_one_request_at_a_time_with_the_same_text(small_lm):
    import copy
    import threading

    import torch

    from laformer.ama import AMAConfig
    from laformer.serve.scheduler import Failed, Finished, Job, Piece, Sampling, Scheduler

    model, tokenizer = small_lm
    model = copy.deepcopy(model)
    model.decoder.set_attention(AMAConfig(budget=64, slice_len=16))
    scheduler = Scheduler(model, tokenizer, max_batch=4, max_length=128)
    try:
        assert scheduler.max_batch == 1
        ids = tokenizer.encode("Hello there, how are you today?")
        events, done = [], threading.Event()
        job = Job(ids, Sampling(max_tokens=8), lambda e: (events.append(e), isinstance(e, (Finished, Failed))
                                                          and done.set()), tokenizer, scheduler.eos_ids)
        scheduler.submit([job])
        assert done.wait(60)
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8)[0, len(ids):].tolist()
        assert "".join(e.text for e in events if isinstance(e, Piece)) == tokenizer.decode(expected,
                                                                                            skip_special_tokens=True)
        assert isinstance(events[-1], Finished) and events[-1].completion_tokens == 8
    finally:
        scheduler.close()
