"""Tiny tokenizer, model and sentiment-like data shared by the training tests (seconds, not minutes)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from laformer import LaFormerConfig, LaFormerForCausalLM, LaFormerForSequenceClassification

POSITIVE = ["good", "great", "fine", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLER = ["the", "a", "movie", "film", "plot", "very", "was", "is", "and", "quite"]
WORDS = POSITIVE + NEGATIVE + FILLER + ["user", "assistant", ":", "hello", "hi", "there"]


def tiny_tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def tiny_config(**overrides) -> LaFormerConfig:
    fields = dict(vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    fields.update(overrides)
    return LaFormerConfig(**fields)


def tiny_classifier(seed: int = 0, labels=("negative", "positive")) -> LaFormerForSequenceClassification:
    return LaFormerForSequenceClassification.from_config(tiny_config(id2label=dict(enumerate(labels))), seed=seed)


def tiny_causal_lm(seed: int = 0) -> LaFormerForCausalLM:
    return LaFormerForCausalLM.from_config(tiny_config(), seed=seed)


def sentiment_examples(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.choices(FILLER, k=rng.randint(1, 6)) + [rng.choice(POSITIVE if positive else NEGATIVE)]
        texts.append(" ".join(words + rng.choices(FILLER, k=rng.randint(0, 3))))
        labels.append("positive" if positive else "negative")
    return texts, labels


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_sentiment_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    texts, labels = sentiment_examples(n, seed)
    return write_jsonl(path, [{"text": t, "label": y} for t, y in zip(texts, labels)])


def save_tiny_base(folder: Path) -> Path:
    """A tiny causal LM saved as a Hugging Face folder with its tokenizer: what ``--model`` points at."""
    from laformer.tokenizer import LaFormerTokenizer

    tiny_causal_lm().save_pretrained(folder)
    LaFormerTokenizer(tiny_tokenizer(), unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return folder


def run_two_processes(worker_source: str, out: Path) -> None:
    """Run ``worker_source`` under torchrun with 2 gloo processes (1 thread each), ``out`` as its argument."""
    import os
    import subprocess
    import sys

    out.mkdir()
    script = out.parent / f"{out.name}_worker.py"
    script.write_text(worker_source)
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
