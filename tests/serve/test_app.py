"""Routes, auth and errors: every bad input is an OpenAI-style JSON error with a 4xx status, and the server goes
on serving."""

from __future__ import annotations

import httpx
import pytest

CHAT = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


def post(url: str, path: str, body: dict | str, **headers) -> httpx.Response:
    content = body if isinstance(body, str) else httpx.Request("POST", url, json=body).content
    return httpx.post(url + path, content=content, headers={"content-type": "application/json", **headers},
                      timeout=60)


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", '{"model": "small", "messages": [', 400, None),  # malformed JSON
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10_000}, 400, "messages"),  # past the served context
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "model"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "small", "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": "small", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"model": "small"}, 400, "prompt"),
    ("/v1/nowhere", {}, 404, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(small_server, path, body, status, param):
    url = small_server[0]
    reply = post(url, path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert post(url, "/v1/chat/completions", CHAT).status_code == 200


def test_the_openai_client_raises_its_usual_exceptions(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=CHAT["messages"])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="small", prompt="hi", max_tokens=100_000)


def test_health_models_and_metrics(small_server, client):
    url, served = small_server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list()] == ["small"]
    assert client.models.retrieve("small").id == "small"
    client.chat.completions.create(**CHAT)
    text = httpx.get(url + "/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert int(samples['laformer_requests_total{path="/v1/chat/completions",status="200"}']) >= 1
    assert int(samples["laformer_completion_tokens_total"]) >= 2
    assert 1 <= int(samples["laformer_batch_rows"]) <= served.scheduler.max_batch
    for name in ("laformer_queue_depth", "laformer_running_requests", "laformer_tokens_per_second"):
        assert float(samples[name]) >= 0


@pytest.fixture(scope="module")
def keyed_server(small_lm, start_server):
    from laformer.serve import ServedModel

    served = ServedModel.start("small", *small_lm, max_batch=2, max_length=128)
    with start_server(served, api_key="sesame") as url:
        yield url


def test_api_key_is_required_on_v1_routes(keyed_server):
    openai = pytest.importorskip("openai")
    wrong = openai.OpenAI(base_url=keyed_server + "/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(**CHAT)
    assert httpx.post(keyed_server + "/v1/embeddings", json={"model": "small", "input": "x"}).status_code == 401
    right = openai.OpenAI(base_url=keyed_server + "/v1", api_key="sesame", max_retries=0)
    assert right.chat.completions.create(**CHAT).usage.completion_tokens == 2
    assert httpx.get(keyed_server + "/health").status_code == 200  # probes need no key
