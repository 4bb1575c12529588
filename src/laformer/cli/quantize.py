"""``laformer quantize MODEL OUT_DIR``: write a weight-only int8/int4 checkpoint that loads back quantized."""

from __future__ import annotations

import argparse
from pathlib import Path

from laformer.cli import common


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a model's linear layers to int8 or int4 and save it",
        description="Load MODEL, swap its linear layers for weight-only int8 or int4 ones and write OUT_DIR "
                    "(config.json with quantization_config, model.safetensors with packed weights and scales, "
                    "tokenizer files); from_pretrained(OUT_DIR) loads it quantized. GGUF Q8_0/Q4_0/Q4_1 tensors "
                    "are taken over exactly when they match the mode.",
    )
    parser.add_argument("model", metavar="MODEL", help=common.MODEL_HELP)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (must be new or empty)")
    parser.add_argument("--mode", choices=("int8", "int4"), default="int8", help="weight format (default: int8)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="inputs per scale, a multiple of 32 (default: int8 per output channel, int4 64)")
    parser.add_argument("--head-mode", choices=("int8", "int4", "float"), default="int8",
                        help="format of the output head (default: int8; int4 costs the most perplexity)")
    add_eval_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="write into OUT_DIR even if it has files")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: all cores)")
    parser.set_defaults(func=run)


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-text", metavar="FILE", default=None,
                        help="print the perplexity on this text file before and after")
    parser.add_argument("--eval-tokens", type=int, default=1024, help="tokens of --eval-text to use (default: 1024)")


def check_out_dir(path: str, overwrite: bool) -> Path:
    from laformer.errors import CheckpointError

    out = Path(path)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise CheckpointError(f"{out} already exists and is not an empty folder; choose a new OUT_DIR or pass "
                              "--overwrite")
    return out


def load(model_path: str, threads: int | None):
    """The float model and its tokenizer (None when MODEL has no tokenizer)."""
    import torch

    from laformer.errors import TokenizerError
    from laformer.model import LaFormerForCausalLM
    from laformer.tokenizer import LaFormerTokenizer

    if threads:
        torch.set_num_threads(threads)
    model = LaFormerForCausalLM.from_pretrained(model_path)
    try:
        tokenizer = LaFormerTokenizer.from_pretrained(model_path)
    except TokenizerError:
        tokenizer = None
    return model, tokenizer


def eval_ids(args: argparse.Namespace, tokenizer, count: int = 1):
    """The first ``count * --eval-tokens`` token ids of ``--eval-text``, or None."""
    import torch

    from laformer.errors import TokenizerError

    if args.eval_text is None:
        return None
    if tokenizer is None:
        raise TokenizerError(f"{args.model} has no tokenizer, so --eval-text cannot be tokenized; pass a GGUF file "
                             "or a folder with tokenizer.json")
    text = Path(args.eval_text).read_text(encoding="utf-8", errors="replace")
    return torch.tensor(tokenizer.encode(text[: 16 * count * args.eval_tokens]))[: count * args.eval_tokens]


def run(args: argparse.Namespace) -> int:
    from laformer.prune import perplexity
    from laformer.quantization import quantize_model

    out = check_out_dir(args.out_dir, args.overwrite)
    model, tokenizer = load(args.model, args.threads)
    ids = eval_ids(args, tokenizer)
    before = perplexity(model, ids) if ids is not None else None
    tensors = None
    if model.checkpoint_info["format"] == "gguf":
        from laformer.formats.gguf import read_gguf_tensors

        tensors = read_gguf_tensors(model.checkpoint_info["path"])
    head = None if args.head_mode == "float" else args.head_mode
    quantize_model(model, args.mode, args.group_size, gguf_tensors=tensors, head_mode=head)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"wrote {out} ({args.mode}, {size:.1f} MiB)")
    if before is not None:
        after = perplexity(model, ids)
        print(f"perplexity on {ids.numel()} tokens: before {before:.3f}, after {after:.3f} "
              f"({100 * (after / before - 1):+.2f}%)")
    return 0
