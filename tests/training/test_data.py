"""The data pipeline: file formats, label maps, clear errors, dynamic padding, bucketing, instruction masks, EDA."""

from __future__ import annotations

import random

import pytest
import torch
from tiny import sentiment_examples, tiny_tokenizer, write_jsonl

from laformer.errors import LaFormerError, TrainingError
from laformer.training import EDA, ClassificationDataset, InstructionDataset, PaddingCollator, build_label_map
from laformer.training.augment import load_synonyms
from laformer.training.data import (
    IGNORE_INDEX,
    encode_labels,
    epoch_batches,
    load_classification_data,
    load_instruction_data,
    text_limit,
)


def test_jsonl_csv_tsv_read_the_same(tmp_path):
    rows = [{"sentence": "good movie", "y": "pos"}, {"sentence": "bad, awful plot", "y": "neg"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.csv").write_text('sentence,y\ngood movie,pos\n"bad, awful plot",neg\n')
    (tmp_path / "d.tsv").write_text("sentence\ty\ngood movie\tpos\nbad, awful plot\tneg\n")
    for name in ("d.jsonl", "d.csv", "d.tsv"):
        texts, labels = load_classification_data(tmp_path / name, text_column="sentence", label_column="y")
        assert texts == ["good movie", "bad, awful plot"] and labels == ["pos", "neg"]


def test_label_map_is_sorted_and_numeric_aware():
    assert build_label_map(["pos", "neg", "pos"]) == {"neg": 0, "pos": 1}
    assert build_label_map(["10", "2", "1"]) == {"1": 0, "2": 1, "10": 2}


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(TrainingError, match="line 2"):
        load_classification_data(path)


def test_missing_column_and_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a", "label": "x"}])
    with pytest.raises(TrainingError, match="'text'.*--text-column"):
        load_classification_data(path)
    with pytest.raises(TrainingError, match="'category'"):
        load_classification_data(path, text_column="sentence", label_column="category")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TrainingError, match="empty"):
        load_classification_data(tmp_path / "empty.jsonl")
    with pytest.raises(TrainingError, match="does not exist"):
        load_classification_data(tmp_path / "nope.jsonl")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(TrainingError, match="format"):
        load_classification_data(tmp_path / "d.parquet")
    with pytest.raises(TrainingError, match="empty"):
        ClassificationDataset([], [], tiny_tokenizer())


def test_unknown_validation_label():
    with pytest.raises(LaFormerError, match="'maybe'"):
        encode_labels(["pos", "maybe"], {"neg": 0, "pos": 1}, "validation.jsonl")


def test_dynamic_padding_and_fixed_padding():
    tokenizer = tiny_tokenizer()
    dataset = ClassificationDataset(["good movie", "the plot was very dull and poor"], [1, 0], tokenizer, max_length=5)
    assert dataset.lengths() == [2, 5]  # truncated to max_length
    batch = PaddingCollator(pad_token_id=0)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [1, 0]
    assert PaddingCollator(pad_to=8)([dataset[0]])["input_ids"].shape == (1, 8)


def test_epoch_batches_are_deterministic_and_cover_everything():
    lengths = [random.Random(i).randint(1, 50) for i in range(100)]
    a = epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 8, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(100))
    bucketed = epoch_batches(lengths, 8, seed=1, epoch=0, bucket=True)
    assert sorted(i for b in bucketed for i in b) == list(range(100))

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(bucketed) < 0.75 * padded(a)  # bucketing cuts padding
    assert all(len(b) == 8 for b in epoch_batches(lengths, 8, seed=1, epoch=0, drop_last=True))


def test_instruction_labels_cover_only_the_response(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [
        {"prompt": "hello there", "response": "hi"},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]},
    ])
    conversations = load_instruction_data(path)
    dataset = InstructionDataset(conversations, tiny_tokenizer(), max_length=64)
    vocab = tiny_tokenizer().get_vocab()
    for item, response in zip(dataset, (["hi"], ["hi", "there"])):
        learned = [t for t in item["labels"] if t != IGNORE_INDEX]
        assert [vocab[w] for w in response] == learned[: len(response)]
        assert item["labels"][0] == IGNORE_INDEX
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(TrainingError, match="'messages' nor 'prompt'"):
        load_instruction_data(tmp_path / "bad.jsonl")


class RecordingTokenizer:
    """tiny_tokenizer(), noting the longest text it was asked to tokenise."""

    def __init__(self) -> None:
        self.backend, self.longest_text = tiny_tokenizer(), 0

    def get_vocab(self):
        return self.backend.get_vocab()

    def encode_batch(self, texts, add_special_tokens=True):
        self.longest_text = max(self.longest_text, *map(len, texts))
        return self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)


def test_over_long_texts_are_cut_before_tokenising_and_keep_their_first_tokens():
    # A 2M-character chat message once made the tokenizer blow a 1 GiB limit (fuzz finding): only max_length
    # tokens are kept, so only the characters that can reach them are tokenised.
    long_text = " ".join(random.Random(0).choice(["good", "movie", "very", "plot"]) for _ in range(20_000))
    recording = RecordingTokenizer()
    dataset = ClassificationDataset([long_text, "bad film"], [0, 1], recording, max_length=16)
    assert recording.longest_text <= text_limit(recording, 16) < len(long_text)
    assert dataset.input_ids == [recording.backend.encode(long_text).ids[:16], recording.backend.encode("bad film").ids]


def test_over_long_chat_messages_are_cut_before_tokenising_and_keep_their_labels():
    long_text = " ".join(random.Random(1).choice(["hello", "there", "film"]) for _ in range(20_000))
    conversations = [[{"role": "user", "content": long_text}, {"role": "assistant", "content": "hi"}],
                     [{"role": "user", "content": "hello"}, {"role": "assistant", "content": long_text}]]
    recording = RecordingTokenizer()
    cut = InstructionDataset(conversations, recording, max_length=24)
    assert recording.longest_text <= text_limit(recording, 24) < len(long_text)
    whole = InstructionDataset(conversations, tiny_tokenizer(), max_length=None)
    for item, reference in zip(cut, whole):
        assert item == {"input_ids": reference["input_ids"][:24], "labels": reference["labels"][:24]}
    assert any(t != IGNORE_INDEX for t in cut[1]["labels"])  # the long answer is still learned from


def test_instruction_labels_with_a_chat_template(default_tokenizer):
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]
    item = InstructionDataset([messages], default_tokenizer)[0]
    learned = [t for t in item["labels"] if t != IGNORE_INDEX]
    assert default_tokenizer.decode(learned).startswith("Hi there!")
    assert item["input_ids"][-len(learned):] == learned


def test_eda_is_reproducible_and_keeps_words():
    eda = EDA(alpha=0.3)
    texts, _ = sentiment_examples(20)
    out = [eda(t, random.Random(i)) for i, t in enumerate(texts)]
    assert out == [eda(t, random.Random(i)) for i, t in enumerate(texts)]
    assert out != texts and all(o.strip() for o in out)
    assert EDA(alpha=0.5, operations=("synonym",))("good movie", random.Random(0)).split()[0] in ("fine", "nice", "decent", "good")
    with pytest.raises(TrainingError):
        EDA(alpha=0.0)
    with pytest.raises(TrainingError, match="unknown EDA"):
        EDA(operations=("shuffle",))


def test_augmented_dataset_varies_by_epoch_only(tmp_path):
    texts, labels = sentiment_examples(16)
    dataset = ClassificationDataset(texts, [0] * 16, tiny_tokenizer(), augment=EDA(alpha=0.5), seed=3)
    first = [dataset[i]["input_ids"] for i in range(16)]
    assert first == [dataset[i]["input_ids"] for i in range(16)]
    dataset.set_epoch(1)
    assert first != [dataset[i]["input_ids"] for i in range(16)]
    (tmp_path / "syn.json").write_text('{"plot": ["storyline"]}')
    assert load_synonyms(tmp_path / "syn.json")["plot"] == ["storyline"]
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(TrainingError):
        load_synonyms(tmp_path / "bad.json")


def test_collator_pads_causal_labels_with_ignore_index():
    batch = PaddingCollator()([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["labels"].dtype == torch.long


def test_back_translation_round_trips_through_the_pivot(monkeypatch):
    """Each text goes English -> pivot -> English; commentary after a blank line is cut; an empty reply keeps the text."""
    import laformer.generation

    seen: list[list[str]] = []

    def fake_generate_text(model, tokenizer, prompts, chat, max_new_tokens):
        seen.append(prompts)
        if len(seen) == 1:
            return [f"FR({p.rsplit(chr(10), 1)[-1]})\n\nTranslation notes..." for p in prompts]
        return ["  back: " + prompts[0].rsplit("\n", 1)[-1] + "  ", ""]

    monkeypatch.setattr(laformer.generation, "generate_text", fake_generate_text)
    from laformer.training import back_translate

    out = back_translate(object(), object(), ["good film", "bad plot"], pivot="German")
    assert "into German" in seen[0][0] and seen[0][0].endswith("good film")
    assert "German text into English" in seen[1][0] and seen[1][0].endswith("FR(good film)")
    assert out == ["back: FR(good film)", "bad plot"]


def test_back_translation_with_the_default_model(default_model, default_tokenizer):
    from laformer.training import back_translate

    texts = ["The movie was wonderful.", "I hated this boring film."]
    out = back_translate(default_model, default_tokenizer, texts, max_new_tokens=12)
    assert len(out) == 2 and all(isinstance(t, str) and t.strip() for t in out)
    assert out != texts  # generated, not copied back
