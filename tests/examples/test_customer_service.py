import json

import pytest


@pytest.fixture(scope="module")
def trained(load_example, shared_data, small_model_dir, tmp_path_factory):
    """The example trained once on a small slice: (the example module, its output folder)."""
    assistant = load_example("customer_service/assistant.py")
    out = tmp_path_factory.mktemp("cs")
    assistant.main(["train", "--data", str(shared_data / "banking77"), "--model", str(small_model_dir),
                    "--output", str(out), "--train-examples", "800", "--eval-examples", "150", "--steps", "30",
                    "--demo-questions", "1", "--max-new-tokens", "8"])
    return assistant, out


def test_assistant_end_to_end(trained):
    assistant, out = trained
    report = json.loads((out / "report.json").read_text())
    assert report["routed_accuracy"] > report["majority_baseline_accuracy"]
    assert report["retrieval_answer_plus_examples"]["recall@5"] > 5 / 77  # better than a random ranking
    assert "**Assistant:**" in (out / "transcript.md").read_text()
    reply = assistant.Assistant(out, max_new_tokens=4).reply("my card has not arrived")
    assert reply.intent in assistant.read_answers(out / "answers.jsonl") and reply.source in ("classifier", "retrieval")


def test_service_answers_over_http(trained):
    test_client = pytest.importorskip("fastapi.testclient", reason="the service needs laformer[serve]")
    assistant, out = trained
    answers = assistant.read_answers(out / "answers.jsonl")
    client = test_client.TestClient(assistant.build_app(assistant.Assistant(out, max_new_tokens=4)))
    assert client.get("/health").json() == {"status": "ok", "intents": len(answers)}
    response = client.post("/reply", json={"message": "my card has not arrived"})
    assert response.status_code == 200
    body = response.json()
    assert body["question"] == "my card has not arrived" and body["intent"] in answers
    assert body["answer"] == answers[body["intent"]]  # the grounding answer is returned with the reply
    assert body["source"] in ("classifier", "retrieval") and 0.0 < body["confidence"] <= 1.0
    assert isinstance(body["reply"], str)
    assert client.post("/reply", json={"message": ""}).status_code == 422  # refused, not answered
    assert client.post("/reply", json={}).status_code == 422


def test_assistant_names_missing_data(load_example, tmp_path, capsys):
    assistant = load_example("customer_service/assistant.py")
    with pytest.raises(SystemExit):
        assistant.main(["train", "--data", str(tmp_path)])
    assert "BANKING77 not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        assistant.main(["chat", "--output", str(tmp_path)])
    assert "holds no trained assistant" in capsys.readouterr().err
