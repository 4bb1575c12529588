"""``laformer prune MODEL OUT_DIR``: prune weights, FFN channels or attention heads and report the perplexity cost."""

from __future__ import annotations

import argparse

from laformer.cli.quantize import add_eval_options, check_out_dir, eval_ids, load

METHODS = ("magnitude", "ffn", "heads")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="prune a model (magnitude, FFN channels or attention heads) and save it",
        description="Load MODEL, prune it and write OUT_DIR. 'magnitude' zeroes the smallest weights of the "
                    "decoder linears (shapes unchanged); 'ffn' and 'heads' remove the least important SwiGLU "
                    "channels or key/value head groups, shrinking the matrices. With --eval-text, prints the "
                    "perplexity before and after.",
    )
    parser.add_argument("model", metavar="MODEL", help="registry name, GGUF file or Hugging Face folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (must be new or empty)")
    parser.add_argument("--method", choices=METHODS, default="magnitude", help="what to prune (default: magnitude)")
    parser.add_argument("--sparsity", type=float, default=0.3,
                        help="fraction to remove, in [0, 1): weights, FFN channels or head groups (default: 0.3)")
    parser.add_argument("--scope", choices=("layer", "global"), default="layer",
                        help="magnitude: one threshold per matrix or one for all (default: layer)")
    parser.add_argument("--importance", choices=("auto", "activations", "weights"), default="auto",
                        help="ffn/heads ranking: mean activations on the --eval-tokens that follow the evaluated "
                             "ones in --eval-text, or weight norms; auto uses activations when --eval-text is "
                             "given (weight norms cost far more perplexity)")
    add_eval_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="write into OUT_DIR even if it has files")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: all cores)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from laformer.errors import ConfigError
    from laformer.prune import magnitude_prune, perplexity, prune_ffn, prune_heads

    out = check_out_dir(args.out_dir, args.overwrite)
    model, tokenizer = load(args.model, args.threads)
    ids = eval_ids(args, tokenizer, count=2)
    if args.importance == "activations" and ids is None:
        raise ConfigError("--importance activations needs --eval-text (activations are measured on its second part)")
    calibration = None
    if ids is not None:  # evaluate on the first --eval-tokens, calibrate on the next ones (never the same text)
        ids, rest = ids[: args.eval_tokens], ids[args.eval_tokens:]
        if args.importance != "weights":
            calibration = (rest if rest.numel() > 1 else ids)[None]
    before = perplexity(model, ids) if ids is not None else None
    total = sum(p.numel() for p in model.parameters())
    if args.method == "magnitude":
        achieved = magnitude_prune(model, args.sparsity, args.scope)
        detail = f"{sum(achieved.values()) / len(achieved):.1%} of decoder weights zeroed on average"
    elif args.method == "ffn":
        sizes = prune_ffn(model, args.sparsity, calibration)
        detail = f"FFN sizes {min(sizes)}-{max(sizes)} (was {model.config.intermediate_size})"
    else:
        heads = prune_heads(model, args.sparsity, calibration)
        detail = f"attention heads per layer {heads[0][0]} (kv {heads[0][1]}), was {model.config.num_attention_heads}"
    remaining = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    print(f"wrote {out}: {args.method} pruning, {detail}; parameters {total / 1e6:.1f}M -> {remaining / 1e6:.1f}M")
    if before is not None:
        after = perplexity(model, ids)
        print(f"perplexity on {ids.numel()} tokens: before {before:.3f}, after {after:.3f} "
              f"({100 * (after / before - 1):+.2f}%)")
    return 0
