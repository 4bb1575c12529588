"""Training data: reading JSONL/CSV/TSV, label maps, datasets, dynamic padding and resumable batch orders.

Batch orders are pure functions of (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted run would, and every distributed rank agrees on the global batches without talking.
"""

from __future__ import annotations

import contextlib
import csv
import random
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils.data import Dataset

from laformer.errors import TrainingError
from laformer.validation import not_utf8, parse_json

IGNORE_INDEX = -100
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def read_records(path: str | Path, data_format: str | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL, CSV or TSV file as dictionaries (the format follows the suffix unless given)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"data file {path} does not exist; check the path")
    data_format = data_format or FORMATS.get(path.suffix.lower())
    if data_format not in ("jsonl", "csv", "tsv"):
        raise TrainingError(
            f"cannot tell the format of {path} from its suffix; use .jsonl, .csv or .tsv or pass the format explicitly"
        )
    try:
        with path.open(encoding="utf-8", newline="") as f:
            records = _read_jsonl(f, path) if data_format == "jsonl" else _read_table(f, path, data_format)
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, TrainingError) from exc
    if not records:
        raise TrainingError(f"{path} holds no examples; the dataset is empty")
    return records


def _read_jsonl(lines: Iterable[str], path: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        records.append(parse_json(line, f"{path}, line {lineno}", TrainingError, "fix or remove that line"))
    return records


def _read_table(lines: Iterable[str], path: Path, data_format: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(lines, delimiter="," if data_format == "csv" else "\t")
    try:
        return list(reader)
    except csv.Error as exc:  # e.g. a field over csv's 128 KiB limit
        raise TrainingError(f"{path}: not valid {data_format.upper()} after line {reader.line_num} ({exc}); fix the "
                            "next row, or store long texts as JSONL") from exc


def column(records: list[dict[str, Any]], name: str, path: str | Path, option: str) -> list[Any]:
    """One column of ``records``; a missing value names the row and the option that picks the column."""
    values = []
    for row, record in enumerate(records, 1):
        value = record.get(name)
        if value is None:
            raise TrainingError(
                f"{path}: example {row} has no {name!r} column (it has {sorted(map(str, record))}); "
                f"choose the right column with {option}"
            )
        values.append(value)
    return values


def load_classification_data(
    path: str | Path, text_column: str = "text", label_column: str = "label", data_format: str | None = None
) -> tuple[list[str], list[str]]:
    """Texts and label names of a classification file."""
    records = read_records(path, data_format)
    texts = [str(t) for t in column(records, text_column, path, "--text-column / text_column")]
    labels = [str(label) for label in column(records, label_column, path, "--label-column / label_column")]
    return texts, labels


def build_label_map(labels: Sequence[str]) -> dict[str, int]:
    """Label name -> id, sorted so the mapping does not depend on row order (numeric names sort as numbers)."""
    names = set(labels)
    key = (lambda s: (0, int(s), s)) if all(n.lstrip("-").isdigit() for n in names) else (lambda s: (1, 0, s))
    return {name: i for i, name in enumerate(sorted(names, key=key))}


def encode_labels(labels: Sequence[str], label2id: dict[str, int], path: str | Path) -> list[int]:
    unknown = sorted(set(labels) - set(label2id))
    if unknown:
        raise TrainingError(
            f"{path} has label(s) {unknown[:5]} that the training data does not have (known: {sorted(label2id)[:10]}); "
            "fix the labels or add examples of them to the training set"
        )
    return [label2id[label] for label in labels]


_LONGEST_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # get_vocab() takes ~0.1 s: once a tokenizer
_UNKNOWN_LONGEST_TOKEN = 64  # characters per token assumed for a tokenizer that does not show its vocabulary


def text_limit(tokenizer: Any, max_length: int | None) -> int | None:
    """How many characters of a text can matter to its first ``max_length`` tokens (None: all of them).

    No token covers more characters than the longest vocabulary entry (byte-level BPE, as LLaMA-family models use;
    only an unknown word of a word-level vocabulary can be longer), so a text cut there, plus a margin for the word
    the cut splits, keeps its first ``max_length`` tokens, while a 2M-character row in a data file no longer costs
    the tokenizer gigabytes: texts are cut to this before they are tokenised.
    """
    if max_length is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    try:
        longest = _LONGEST_TOKEN[backend]
    except (KeyError, TypeError):
        vocab = backend.get_vocab() if hasattr(backend, "get_vocab") else {}
        longest = max(1, max(map(len, vocab), default=_UNKNOWN_LONGEST_TOKEN))
        with contextlib.suppress(TypeError):  # not weakly referable: recomputed each time
            _LONGEST_TOKEN[backend] = longest
    return (max_length + 16) * longest


def encode_texts(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool = True,
                 max_length: int | None = None) -> list[list[int]]:
    """Token ids for each text, from a ``LaFormerTokenizer`` or a raw ``tokenizers.Tokenizer``.

    With ``max_length`` each row keeps its first ``max_length`` ids, and texts are cut (``text_limit``) first."""
    limit = text_limit(tokenizer, max_length)
    texts = [t[:limit] for t in texts] if limit is not None else list(texts)
    if hasattr(tokenizer, "backend_tokenizer"):
        rows = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    elif hasattr(tokenizer, "encode_batch"):
        rows = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    else:
        rows = [tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
    return [list(getattr(row, "ids", row))[:max_length] for row in rows]


class ClassificationDataset(Dataset):
    """Texts tokenized once (truncated to ``max_length``) with integer labels.

    With ``augment`` (a callable ``(text, rng) -> text``) a fresh variant of each training text is
    tokenized per access; its randomness is seeded by (seed, epoch, index) so resumed runs repeat it.
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | None,
        tokenizer: Any,
        max_length: int = 128,
        augment: Callable[[str, random.Random], str] | None = None,
        seed: int = 0,
    ) -> None:
        if not texts:
            raise TrainingError("the dataset is empty; give it at least one example")
        if labels is not None and len(labels) != len(texts):
            raise TrainingError(f"{len(texts)} texts but {len(labels)} labels; they must pair up")
        self.texts = list(texts)
        self.labels = list(labels) if labels is not None else None
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.input_ids = encode_texts(tokenizer, self.texts, max_length=max_length)
        empty = [i for i, ids in enumerate(self.input_ids) if not ids]
        if empty:
            raise TrainingError(f"example {empty[0] + 1} tokenizes to nothing; remove empty texts")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.input_ids[index]
        if self.augment is not None:
            rng = random.Random(hash((self.seed, self.epoch, index)))
            ids = encode_texts(self.tokenizer, [self.augment(self.texts[index], rng)], max_length=self.max_length)[0] or ids
        item: dict[str, Any] = {"input_ids": ids}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


def load_instruction_data(path: str | Path, data_format: str | None = None) -> list[list[dict[str, str]]]:
    """Conversations from ``{"prompt","response"}`` or ``{"messages": [...]}`` rows."""
    conversations = []
    for row, record in enumerate(read_records(path, data_format), 1):
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise TrainingError(f"{path}: example {row} 'messages' must be a list of {{'role','content'}} objects")
        elif "prompt" in record and "response" in record:
            messages = [{"role": "user", "content": str(record["prompt"])},
                        {"role": "assistant", "content": str(record["response"])}]
        else:
            raise TrainingError(
                f"{path}: example {row} has neither 'messages' nor 'prompt' and 'response' (it has {sorted(map(str, record))}); "
                "instruction data needs one of those shapes"
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise TrainingError(f"{path}: example {row} has no assistant message to learn from")
        conversations.append(messages)
    return conversations


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text, or a plain "role: content" layout for tokenizers without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


class InstructionDataset(Dataset):
    """Chat-formatted conversations whose labels are -100 everywhere except the assistant's tokens."""

    def __init__(self, conversations: Sequence[list[dict[str, str]]], tokenizer: Any, max_length: int = 512) -> None:
        if not conversations:
            raise TrainingError("the instruction dataset is empty; give it at least one conversation")
        limit = text_limit(tokenizer, max_length)
        self.examples = [self._encode(c, tokenizer, max_length, limit) for c in conversations]

    @staticmethod
    def _encode(messages: list[dict[str, str]], tokenizer: Any, max_length: int, limit: int | None
                ) -> dict[str, list[int]]:
        """Ids and labels of one conversation; over-long messages are cut first, as only ``max_length`` tokens stay."""
        messages = [{**m, "content": m["content"][:limit]} for m in messages]

        def encode(upto: int, add_generation_prompt: bool) -> list[int]:
            return encode_texts(tokenizer, [render_chat(tokenizer, messages[:upto], add_generation_prompt)], False,
                                max_length)[0]

        ids = encode(len(messages), False)
        labels = [IGNORE_INDEX] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            # Rendering is prefix-stable at message boundaries, so the assistant's span is the difference.
            start, end = len(encode(i, True)), len(encode(i + 1, False))
            labels[start:end] = ids[start:end]
        return {"input_ids": ids, "labels": labels}

    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


@dataclass
class PaddingCollator:
    """Right-pads a list of examples into tensors: to the longest in the batch, or to ``pad_to`` tokens."""

    pad_token_id: int = 0
    pad_to: int | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = self.pad_to or max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            ids = item["input_ids"][:length]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "labels" in items[0]:
            if isinstance(items[0]["labels"], list):
                labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
                for row, item in enumerate(items):
                    labels[row, : len(item["labels"][:length])] = torch.tensor(item["labels"][:length])
                batch["labels"] = labels
            else:
                batch["labels"] = torch.tensor([item["labels"] for item in items], dtype=torch.long)
        return batch


def epoch_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
    bucket: bool = False, drop_last: bool = False,
) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch, a pure function of its arguments.

    ``bucket`` groups examples of similar length (sorted within windows of 64 batches, then the batches
    shuffled) so dynamic padding wastes little while batches stay random.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * 64
        order = [i for w in range(0, len(order), window) for i in sorted(order[w : w + window], key=lengths.__getitem__)]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if bucket and shuffle:
        rng.shuffle(batches)
    return batches
