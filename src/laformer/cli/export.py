"""``laformer export MODEL OUT.gguf``: write any causal LM laformer loads as a GGUF for llama.cpp and Ollama."""

from __future__ import annotations

import argparse
from pathlib import Path

from laformer.cli import common
from laformer.errors import ConfigError
from laformer.formats.gguf_export import EXPORT_TYPES, export_type


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model (base, fine-tuned, merged LoRA, quantized, pruned) to GGUF for llama.cpp/Ollama",
        description="Load MODEL (registry name, GGUF file, Hugging Face folder or a `laformer finetune` output "
                    "folder, whose LoRA is merged first) and write OUT.gguf (docs/export.md).",
    )
    parser.add_argument("model", metavar="MODEL", help=common.MODEL_HELP)
    parser.add_argument("out", metavar="OUT.gguf", help="GGUF file to write")
    parser.add_argument("--type", default="f16", help=f"tensor type: {', '.join(EXPORT_TYPES)} (default: f16)")
    parser.add_argument("--ollama", metavar="DIR", default=None,
                        help="also write DIR/Modelfile (FROM, TEMPLATE, stop) for `ollama create`")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    export_type(args.type)  # refuse a bad --type before loading anything
    model, tokenizer = load_for_export(args.model)
    path = model.save_gguf(args.out, type=args.type, tokenizer=tokenizer)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.type})")
    if args.ollama:
        from laformer.formats.ollama import write_modelfile

        print(f"wrote {write_modelfile(args.ollama, path, tokenizer)}")
    return 0


def load_for_export(name_or_path: str):
    """The causal LM and tokenizer behind MODEL; a fine-tune folder's LoRA/AdaLoRA merged into the weights."""
    from laformer.model import LaFormerForCausalLM
    from laformer.tasks import META_NAME, load_finetuned
    from laformer.tokenizer import LaFormerTokenizer

    if (Path(name_or_path) / META_NAME).is_file():
        model, tokenizer, meta = load_finetuned(name_or_path)
        if meta["task"] != "causal-lm":
            raise ConfigError(f"{name_or_path} is a {meta['task']} fine-tune: a classifier is not a causal LM and "
                              "llama.cpp has no place for its head; use `laformer classify` with it, or export "
                              "its base model " + repr(meta.get("base_model")))
        if getattr(model, "peft_config", None) is not None:
            from laformer.peft import merge_and_unload

            model = merge_and_unload(model)
        return model, tokenizer
    return LaFormerForCausalLM.from_pretrained(name_or_path), LaFormerTokenizer.from_pretrained(name_or_path)
