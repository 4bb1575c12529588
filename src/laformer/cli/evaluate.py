"""``laformer evaluate``: the classification report (or response perplexity) of a fine-tuned model on a file."""

from __future__ import annotations

import argparse
import json

import torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model fine-tuned by `laformer finetune` on labelled data",
        description="Print accuracy, macro-F1 and sklearn's classification report (classifiers) or the response "
                    "loss and perplexity (causal-lm) of --model on --data.",
    )
    parser.add_argument("--model", "-m", required=True, help="output folder of `laformer finetune`")
    parser.add_argument("--data", required=True, help="labelled data (.jsonl, .csv or .tsv)")
    parser.add_argument("--text-column", default=None, help="default: the column used for training")
    parser.add_argument("--label-column", default=None, help="default: the column used for training")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to FILE")
    parser.add_argument("--threads", type=int, default=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from laformer.tasks import evaluate_causal_lm, evaluate_classifier, load_finetuned

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, meta = load_finetuned(args.model)
    if meta["task"] == "classification":
        metrics = evaluate_classifier(
            model, tokenizer, args.data, args.text_column or meta.get("text_column", "text"),
            args.label_column or meta.get("label_column", "label"), args.batch_size, meta.get("max_length"),
        )
        print(metrics.pop("report"))
        print(f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}")
    else:
        metrics = evaluate_causal_lm(model, tokenizer, args.data, args.batch_size, meta.get("max_length", 512))
        print(f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    return 0
