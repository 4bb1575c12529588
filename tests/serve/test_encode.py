"""/v1/embeddings against ``model.encode`` and /v1/classify against ``laformer.tasks.classify``, over HTTP."""

from __future__ import annotations

import httpx
import pytest
import torch
from tiny import save_tiny_base, write_sentiment_jsonl

TEXTS = ["the cat sat on the mat", "a completely different sentence about finance", "hi"]


def test_float_embeddings_equal_model_encode(client, small_lm):
    model, tokenizer = small_lm
    reply = client.embeddings.create(model="small", input=TEXTS, encoding_format="float")
    got = torch.tensor([d.embedding for d in sorted(reply.data, key=lambda d: d.index)])
    torch.testing.assert_close(got, model.encode(TEXTS, tokenizer), atol=1e-5, rtol=1e-4)
    assert reply.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS)


def test_base64_embeddings_the_clients_default_decode_to_the_same_vectors(client, small_lm):
    model, tokenizer = small_lm
    reply = client.embeddings.create(model="small", input=TEXTS[0])  # the openai client asks for base64
    torch.testing.assert_close(torch.tensor(reply.data[0].embedding), model.encode(TEXTS[0], tokenizer)[0],
                               atol=1e-5, rtol=1e-4)


def test_token_id_inputs_embed_like_their_text(client, small_lm):
    _, tokenizer = small_lm
    ids = [tokenizer.encode(t) for t in TEXTS[:2]]
    by_ids = client.embeddings.create(model="small", input=ids, encoding_format="float")
    by_text = client.embeddings.create(model="small", input=TEXTS[:2], encoding_format="float")
    torch.testing.assert_close(torch.tensor([d.embedding for d in by_ids.data]),
                               torch.tensor([d.embedding for d in by_text.data]), atol=1e-5, rtol=1e-4)
    one = client.embeddings.create(model="small", input=ids[0], encoding_format="float")
    assert len(one.data) == 1


@pytest.mark.parametrize("body, param", [({"input": ""}, "input"), ({"input": []}, "input"),
                                         ({"input": [[1, 2], [10**9]]}, "input[1]"), ({"input": 5}, "input"),
                                         ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                                         ({"input": "x", "dimensions": 3}, "dimensions")])
def test_bad_embedding_inputs_are_400s_naming_the_field(small_server, body, param):
    reply = httpx.post(small_server[0] + "/v1/embeddings", json={"model": "small", **body})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param


def test_classify_is_refused_for_a_causal_lm(small_server):
    reply = httpx.post(small_server[0] + "/v1/classify", json={"model": "small", "input": "good"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "wrong_model_task"


@pytest.fixture(scope="module")
def classifier_server(tmp_path_factory, start_server):
    """A tiny base fine-tuned by `laformer finetune --task classification --method lora`, served from its folder."""
    from laformer.cli import main
    from laformer.serve import load_served

    folder = tmp_path_factory.mktemp("classifier")
    data = write_sentiment_jsonl(folder / "train.jsonl", 64)
    base = save_tiny_base(folder / "base")
    assert main(["finetune", "--model", str(base), "--train", str(data), "--output", str(folder / "out"),
                 "--max-steps", "12", "--batch-size", "8", "--lr", "2e-2", "--max-length", "16", "--no-progress",
                 "--report-to", "--threads", "1"]) == 0
    served = load_served(str(folder / "out"), name="sentiment")
    with start_server(served) as url:
        yield url, served


def test_classify_equals_the_library_classify(classifier_server):
    from laformer.tasks import classify

    url, served = classifier_server
    texts = ["the movie was good", "awful plot and dull film", "quite fine"]
    reply = httpx.post(url + "/v1/classify", json={"model": "sentiment", "input": texts})
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    expected = classify(served.model, served.tokenizer, texts, max_length=16)
    assert [d["label"] for d in data] == [e["label"] for e in expected]
    for got, want in zip(data, expected):
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
        assert set(got["probabilities"]) == {"negative", "positive"}


def test_a_classifier_refuses_chat_but_embeds(classifier_server):
    url, served = classifier_server
    chat = httpx.post(url + "/v1/chat/completions",
                      json={"model": "sentiment", "messages": [{"role": "user", "content": "good"}]})
    assert chat.status_code == 400 and "classify" in chat.json()["error"]["message"]
    embedded = httpx.post(url + "/v1/embeddings", json={"model": "sentiment", "input": "good film",
                                                        "encoding_format": "float"})
    assert embedded.status_code == 200
    expected = served.model.encode("good film", served.tokenizer)[0]
    torch.testing.assert_close(torch.tensor(embedded.json()["data"][0]["embedding"]), expected, atol=1e-5, rtol=1e-4)
    assert httpx.post(url + "/v1/classify", json={"input": []}).status_code == 400
