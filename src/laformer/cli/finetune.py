"""``laformer finetune``: fine-tune a classifier or an instruction-following model into an output folder."""

from __future__ import annotations

import argparse

import torch

from laformer.cli import common


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune for classification or instruction following (LoRA, AdaLoRA, adapters, prefix, full)",
        description="Fine-tune the model on a JSONL/CSV/TSV file and write an output folder with the weights or "
                    "adapter, the tokenizer, metrics.json, a classification report and plots.",
    )
    parser.add_argument("--task", choices=("classification", "causal-lm"), default="classification",
                        help="classification (text/label rows) or causal-lm (prompt/response or messages rows)")
    parser.add_argument("--train", required=True, help="training data (.jsonl, .csv or .tsv)")
    parser.add_argument("--validation", default=None, help="validation data, same format")
    parser.add_argument("--output", "-o", required=True, help="output folder")
    parser.add_argument("--method", choices=("lora", "adalora", "adapter", "prefix", "full"), default="lora")
    parser.add_argument("--preset", choices=("fast", "default", "best"), default="default",
                        help="classification recipe: fast (a first result in minutes), default, best (accuracy); "
                             "the flags below override it (docs/finetuning.md)")
    common.add_model_options(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--text-column", default="text")
    data.add_argument("--label-column", default="label")
    data.add_argument("--max-length", type=int, default=None, help="tokens kept per example (default: from the training texts' lengths, "
                           "a high percentile capped by the preset; 512 for causal-lm)")
    data.add_argument("--bucket", action="store_true", help="batch examples of similar length together")
    data.add_argument("--eda", type=float, default=0.0, metavar="ALPHA",
                      help="EDA augmentation editing about ALPHA of each training text's words (0: off)")
    data.add_argument("--synonyms", default=None, help="JSON file of extra synonyms for --eda")
    data.add_argument("--back-translate", type=int, default=0, metavar="N",
                      help="add back-translated paraphrases of the first N training texts (slow: uses generation)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=None, help="passes over the data (default: the preset's)")
    train.add_argument("--max-steps", type=int, default=-1, help="optimiser steps (overrides --epochs)")
    train.add_argument("--batch-size", type=int, default=None, help="default: the preset's (16)")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's for LoRA, 2e-5 full)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--scheduler", choices=("cosine", "linear", "constant", "plateau"), default="cosine")
    train.add_argument("--warmup-ratio", type=float, default=None)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--dropout", type=float, default=0.0)
    train.add_argument("--fgm", type=float, default=0.0, metavar="EPSILON", help="FGM adversarial training (0: off)")
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bfloat16 autocast (classification default: on where the CPU/GPU runs bf16 natively)")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: the preset's rhythm)")
    train.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: at the end)")
    train.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                       help="evaluations without improvement before stopping (default: the preset's; 0: off)")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    train.add_argument("--distributed", choices=("ddp", "fsdp"), default="ddp",
                       help="under torchrun: ddp (a model copy per process) or fsdp (FSDP2, parameters sharded)")
    train.add_argument("--report-to", nargs="*", default=["tensorboard"], choices=("tensorboard", "wandb"))
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    peft = parser.add_argument_group("PEFT")
    peft.add_argument("--lora-r", type=int, default=None, help="default: the preset's")
    peft.add_argument("--lora-alpha", type=float, default=None, help="default: the preset's")
    peft.add_argument("--lora-dropout", type=float, default=0.0)
    peft.add_argument("--target-modules", nargs="+", default=None, help="modules to adapt, or all-linear (default: the preset's)")
    peft.add_argument("--adalora-target-r", type=int, default=4)
    peft.add_argument("--adapter-size", type=int, default=64, help="bottleneck width of adapters")
    peft.add_argument("--prefix-tokens", type=int, default=20, help="virtual tokens of prefix tuning")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from laformer.tasks import finetune_causal_lm, finetune_classification
    from laformer.training import EDA, TrainingArguments
    from laformer.training.augment import load_synonyms
    from laformer.training.recipes import classification_arguments, get_preset, lora_options

    if args.threads:
        torch.set_num_threads(args.threads)
    flags = {
        "learning_rate": args.lr or (2e-5 if args.method == "full" else None), "num_epochs": args.epochs,
        "batch_size": args.batch_size, "warmup_ratio": args.warmup_ratio, "eval_steps": args.eval_steps,
        "weight_decay": args.weight_decay, "max_steps": args.max_steps, "gradient_accumulation_steps": args.grad_accum,
        "max_grad_norm": args.max_grad_norm, "lr_scheduler": args.scheduler, "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing, "dropout": args.dropout, "fgm_epsilon": args.fgm,
        "save_steps": args.save_steps, "seed": args.seed, "report_to": args.report_to,
        "progress_bar": not args.no_progress, "bucket_by_length": args.bucket or None,
        "distributed": args.distributed,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.early_stopping is not None:
        overrides["early_stopping_patience"] = args.early_stopping or None  # 0: off
    if args.task == "classification":
        preset = args.preset
        training = classification_arguments(args.output, preset, **overrides)
    else:  # causal-lm keeps the generic recipe; --preset only shapes its LoRA
        preset = "fast" if args.preset == "fast" else "default"
        defaults = {"learning_rate": 2e-4, "num_epochs": 1.0, "batch_size": 8, "warmup_ratio": 0.05,
                    "lr_scheduler": "cosine"}
        training = TrainingArguments(output_dir=args.output, **{**defaults, **overrides})
    peft_options = {**lora_options(preset), "lora_dropout": args.lora_dropout,
                    "target_r": min(args.adalora_target_r, args.lora_r or get_preset(preset).lora_r),
                    "bottleneck": args.adapter_size, "num_virtual_tokens": args.prefix_tokens}
    if args.lora_r:
        peft_options["r"] = peft_options["init_r"] = args.lora_r
    if args.lora_alpha:
        peft_options["lora_alpha"] = args.lora_alpha
    if args.target_modules:
        peft_options["target_modules"] = "all-linear" if args.target_modules == ["all-linear"] else args.target_modules
    common_options = dict(model_name=args.model, validation_path=args.validation, method=args.method,
                          peft_options=peft_options, resume=args.resume)
    if args.task == "classification":
        augment = None
        if args.eda:
            augment = EDA(alpha=args.eda, synonyms=load_synonyms(args.synonyms)) if args.synonyms else EDA(alpha=args.eda)
        result = finetune_classification(
            args.train, training, text_column=args.text_column, label_column=args.label_column,
            max_length=args.max_length, preset=preset, augment=augment, back_translate_count=args.back_translate,
            **common_options,
        )
    else:
        result = finetune_causal_lm(args.train, training, max_length=args.max_length or 512, **common_options)
    summary = {k: v for k, v in (result.get("eval") or {}).items() if isinstance(v, float)}
    print(f"trained {result['step']} steps; wrote {args.output}; " + ", ".join(f"{k}={v:.4f}" for k, v in summary.items()))
    return 0
