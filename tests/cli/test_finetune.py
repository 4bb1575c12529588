"""``laformer finetune / classify / evaluate`` end to end on a tiny saved base model, and their clear errors."""

from __future__ import annotations

import json

import pytest
from tiny import save_tiny_base, write_jsonl, write_sentiment_jsonl

from laformer.cli import main
from laformer.errors import LaFormerError
from laformer.tasks import classify, load_finetuned

FAST = ["--no-progress", "--report-to", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_sentiment_jsonl(folder / "train.jsonl", 96)
    write_sentiment_jsonl(folder / "validation.jsonl", 32, seed=1)
    return folder


def finetune(base, data, out, *extra) -> int:
    return main(["finetune", "--model", str(base), "--train", str(data / "train.jsonl"), "--validation",
                 str(data / "validation.jsonl"), "--output", str(out), "--max-steps", "24", "--batch-size", "8",
                 "--lr", "5e-3", "--max-length", "16", *FAST, *extra])


@pytest.mark.parametrize("method, lr", [("lora", "2e-2"), ("full", "5e-3")])
def test_finetune_then_classify_and_evaluate(base, data, tmp_path, capsys, method, lr):
    out = tmp_path / method
    # q/v only: this high learning rate suits two adapted projections, not the all-linear default.
    targets = ["--target-modules", "q_proj", "v_proj"] if method == "lora" else []
    assert finetune(base, data, out, "--method", method, "--lr", lr, "--lora-r", "4", "--eval-steps", "12",
                    "--max-steps", "36", *targets) == 0
    for name in ("laformer_finetune.json", "tokenizer.json", "metrics.json", "confusion_matrix.png", "training_curves.png"):
        assert (out / name).is_file(), name
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (out / weights).is_file()
    accuracy = json.loads((out / "metrics.json").read_text())["eval"]["accuracy"]
    assert accuracy >= 0.75
    capsys.readouterr()

    assert main(["classify", "--model", str(out), "--text", "the movie was great", "--text", "awful plot", "--jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert sum(rows[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    assert main(["evaluate", "--model", str(out), "--data", str(data / "validation.jsonl"), "--json", str(tmp_path / "m.json")]) == 0
    assert "precision" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == pytest.approx(accuracy)

    model, tokenizer, _ = load_finetuned(out)
    assert classify(model, None, ["a great film"])[0]["label"] == "positive"


def test_finetune_other_methods_and_options(base, data, tmp_path):
    for method, extra in (("adalora", ["--lora-r", "4"]), ("adapter", ["--adapter-size", "8"]),
                          ("prefix", ["--prefix-tokens", "4"])):
        out = tmp_path / method
        assert main(["finetune", "--model", str(base), "--train", str(data / "train.jsonl"), "--output", str(out),
                     "--method", method, "--max-steps", "3", "--batch-size", "8", "--max-length", "16", *FAST, *extra]) == 0
        model, _, meta = load_finetuned(out)
        assert meta["method"] == method and len(classify(model, None, ["good movie"], max_length=16)) == 1
    out = tmp_path / "options"
    assert finetune(base, data, out, "--method", "lora", "--eda", "0.2", "--fgm", "0.5", "--bucket", "--dropout", "0.1",
                    "--save-steps", "12", "--scheduler", "plateau") == 0
    assert finetune(base, data, out, "--method", "lora", "--resume", "--max-steps", "24") == 0


def test_instruction_tuning_cli(base, tmp_path, capsys):
    rows = [{"prompt": "hello", "response": "hi there"}, {"messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "assistant", "content": "hello there"}]}]
    write_jsonl(tmp_path / "chat.jsonl", rows * 4)
    out = tmp_path / "chat"
    assert main(["finetune", "--task", "causal-lm", "--model", str(base), "--train", str(tmp_path / "chat.jsonl"),
                 "--validation", str(tmp_path / "chat.jsonl"), "--output", str(out), "--method", "full",
                 "--max-steps", "20", "--lr", "1e-2", "--batch-size", "4", *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["loss"] < 2.0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(tmp_path / "chat.jsonl")]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_clear_errors(base, data, tmp_path, capsys):
    write_jsonl(tmp_path / "odd.jsonl", [{"text": "good movie", "label": "neutral"}])
    assert main(["finetune", "--model", str(base), "--train", str(data / "train.jsonl"), "--validation",
                 str(tmp_path / "odd.jsonl"), "--output", str(tmp_path / "x"), *FAST]) == 1
    assert "'neutral'" in capsys.readouterr().err
    assert finetune(base, data, tmp_path / "y", "--target-modules", "qkv_proj") == 1
    assert "qkv_proj" in capsys.readouterr().err
    assert finetune(base, data, tmp_path / "z", "--text-column", "sentence") == 1
    assert "'sentence'" in capsys.readouterr().err
    assert main(["classify", "--model", str(tmp_path), "--text", "x"]) == 1
    assert "laformer_finetune.json" in capsys.readouterr().err


def test_adapter_for_another_base_is_refused(base, data, tmp_path, tiny_model):
    out = tmp_path / "lora"
    assert finetune(base, data, out, "--method", "lora", "--max-steps", "1") == 0
    other = tmp_path / "other"
    tiny_model(hidden_size=48).save_pretrained(other)
    meta = json.loads((out / "laformer_finetune.json").read_text())
    (out / "laformer_finetune.json").write_text(json.dumps({**meta, "base_model": str(other)}))
    with pytest.raises(LaFormerError, match="shape"):
        load_finetuned(out)
