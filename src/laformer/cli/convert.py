"""``laformer convert MODEL OUT_DIR``: write any supported checkpoint as a Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from laformer.cli import common
from laformer.errors import CheckpointError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a model (e.g. a GGUF file) to a Hugging Face folder",
        description="Load MODEL (registry name, GGUF file or Hugging Face folder) and write OUT_DIR with "
                    "config.json, model.safetensors and the tokenizer files, loadable by transformers. "
                    "Quantized GGUF tensors are dequantized to --dtype.",
    )
    parser.add_argument("model", metavar="MODEL", help="registry name, GGUF file or Hugging Face folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into OUT_DIR even if it has files")
    common.add_model_options(parser, model_flag=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise CheckpointError(
            f"{out} already exists and is not an empty folder; choose a new OUT_DIR or pass --overwrite"
        )
    model, tokenizer = common.load_model(args)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out}: {files}")
    return 0
