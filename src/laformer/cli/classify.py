"""``laformer classify``: labels and probabilities from a fine-tuned classifier."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="classify texts with a model fine-tuned by `laformer finetune`",
        description="Print the label and probabilities for each text given with --text or read from --input "
                    "(a .jsonl/.csv/.tsv file, or a .txt file with one text per line; - reads stdin).",
    )
    parser.add_argument("--model", "-m", required=True, help="output folder of `laformer finetune`")
    parser.add_argument("--text", action="append", default=None, help="a text to classify (repeatable)")
    parser.add_argument("--input", default=None, help="file of texts to classify")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--jsonl", action="store_true", help="print one JSON object per text")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.set_defaults(func=run)


def read_texts(args: argparse.Namespace) -> list[str]:
    from laformer.errors import TrainingError
    from laformer.training.data import column, read_records

    texts = list(args.text or [])
    if args.input == "-" or (args.input and args.input.endswith(".txt")):
        stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
        with stream:
            texts += [line.rstrip("\n") for line in stream if line.strip()]
    elif args.input:
        texts += [str(t) for t in column(read_records(args.input), args.text_column, args.input, "--text-column")]
    if not texts:
        raise TrainingError("nothing to classify; pass --text \"...\" or --input FILE")
    return texts


def run(args: argparse.Namespace) -> int:
    from laformer.tasks import classify, load_finetuned

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = read_texts(args)
    model, tokenizer, meta = load_finetuned(args.model)
    for text, result in zip(texts, classify(model, tokenizer, texts, args.batch_size, meta.get("max_length"))):
        if args.jsonl:
            print(json.dumps({"text": text, **result}, ensure_ascii=False))
        else:
            probs = "  ".join(f"{name}={p:.3f}" for name, p in result["probabilities"].items())
            print(f"{result['label']}\t{result['score']:.3f}\t{probs}\t{text}")
    return 0
