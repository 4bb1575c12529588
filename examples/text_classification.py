"""Text classification with laformer: the tutorial's section 5.2 workflow, written so that it runs.

A Dataset that tokenizes, a DataLoader whose collate function pads each batch only to its longest text,
AdamW over the trainable parameters (LoRA on q/v plus the new classifier head), ``train_epoch`` with a
tqdm bar, and ``evaluate`` printing sklearn's ``classification_report``. The tutorial's bugs are fixed:
labels are one id per text (not per character), predictions take ``argmax(-1)`` over the classes,
``AdamW`` comes from torch, and the model is a sequence classifier rather than the bare decoder.

    python examples/text_classification.py                       # SST-2, ~2,000 examples, a few minutes
    python examples/text_classification.py --data ../shared/data/financial_phrasebank --train-examples 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from laformer import DEFAULT_MODEL, LaFormerForSequenceClassification
from laformer.extras import require
from laformer.peft import LoraConfig, get_peft_model
from laformer.tokenizer import LaFormerTokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


class TextClassificationDataset(Dataset):
    def __init__(self, texts: list[str], labels: list[str], tokenizer: LaFormerTokenizer, label2id: dict[str, int],
                 max_len: int = 128) -> None:
        self.encodings = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
        self.labels = [label2id[label] for label in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int) -> dict:
        return {"input_ids": self.encodings[item], "labels": self.labels[item]}


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest text of this batch (the model pools each text's last real token)."""
    length = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), length), pad_token_id)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        input_ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        attention_mask[row, : len(example["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": torch.tensor([example["labels"] for example in batch])}


def read_jsonl(path: Path, limit: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit > 0 else rows
    return [row["text"] for row in rows], [row["label"] for row in rows]


def train_epoch(model, dataloader: DataLoader, optimizer: torch.optim.Optimizer) -> float:
    model.train()
    epoch_loss = 0.0
    bar = tqdm(dataloader, desc="Training")
    for batch in bar:
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        epoch_loss += loss.item()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return epoch_loss / len(dataloader)


@torch.no_grad()
def evaluate(model, dataloader: DataLoader, id2label: dict[int, str]) -> float:
    model.eval()
    preds, labels = [], []
    for batch in tqdm(dataloader, desc="Evaluating"):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        preds.extend(logits.argmax(dim=-1).tolist())
        labels.extend(batch["labels"].tolist())
    names = [id2label[i] for i in range(len(id2label))]
    classification_report = require("sklearn.metrics", "train", "the evaluation report").classification_report
    print(classification_report(labels, preds, labels=list(range(len(names))), target_names=names, digits=4,
                                zero_division=0))
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.jsonl and validation.jsonl")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--train-examples", type=int, default=2000, help="0: all")
    parser.add_argument("--eval-examples", type=int, default=872, help="0: all")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    train_texts, train_labels = read_jsonl(args.data / "train.jsonl", args.train_examples)
    dev_texts, dev_labels = read_jsonl(args.data / "validation.jsonl", args.eval_examples)
    label2id = {label: i for i, label in enumerate(sorted(set(train_labels)))}
    id2label = {i: label for label, i in label2id.items()}
    unknown = set(dev_labels) - set(label2id)
    if unknown:
        raise SystemExit(f"validation labels {sorted(unknown)} do not occur in the training data")

    tokenizer = LaFormerTokenizer.from_pretrained(args.model)
    train_dataset = TextClassificationDataset(train_texts, train_labels, tokenizer, label2id)
    dev_dataset = TextClassificationDataset(dev_texts, dev_labels, tokenizer, label2id)
    pad = tokenizer.pad_token_id

    model = LaFormerForSequenceClassification.from_pretrained(args.model, id2label=id2label)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    train_loader = DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True, collate_fn=lambda b: collate(b, pad))
    dev_loader = DataLoader(dev_dataset, batch_size=32, collate_fn=lambda b: collate(b, pad))
    for epoch in range(args.epochs):
        loss = train_epoch(model, train_loader, optimizer)
        print(f"epoch {epoch + 1}: train loss {loss:.4f}")
        accuracy = evaluate(model, dev_loader, id2label)
        print(f"epoch {epoch + 1}: validation accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
