import importlib.util
import json
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "customer_service" / "assistant.py"


def load_example():
    spec = importlib.util.spec_from_file_location("assistant", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_assistant_end_to_end(shared_data, small_model_dir, tmp_path):
    assistant = load_example()
    out = tmp_path / "cs"
    assistant.main(["train", "--data", str(shared_data / "banking77"), "--model", str(small_model_dir),
                    "--output", str(out), "--train-examples", "800", "--eval-examples", "150", "--steps", "30",
                    "--demo-questions", "1", "--max-new-tokens", "8"])
    report = json.loads((out / "report.json").read_text())
    assert report["routed_accuracy"] > report["majority_baseline_accuracy"]
    assert report["retrieval_answer_plus_examples"]["recall@5"] > 5 / 77  # better than a random ranking
    assert "**Assistant:**" in (out / "transcript.md").read_text()
    reply = assistant.Assistant(out, max_new_tokens=4).reply("my card has not arrived")
    assert reply.intent in assistant.read_answers(out / "answers.jsonl") and reply.source in ("classifier", "retrieval")
