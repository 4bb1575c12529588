"""``laformer info [MODEL]``: what a checkpoint holds, without generating anything."""

from __future__ import annotations

import argparse
from collections import Counter

from laformer.cli import common
from laformer.formats.registry import DEFAULT_MODEL


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show a model's architecture, size and storage types",
        description="Print the architecture, parameter count, shape, context, rope settings and the storage "
                    "types of the tensors (e.g. Q4_1, Q8_0, F32) of MODEL.",
    )
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL", help=common.MODEL_HELP)
    common.add_model_options(parser, model_flag=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, _ = common.load_model(args, with_tokenizer=False)
    for label, value in describe(model):
        print(f"{label:<18}{value}")
    return 0


def describe(model) -> list[tuple[str, str]]:
    """(label, value) rows describing ``model`` and the checkpoint it came from."""
    config, info = model.config, getattr(model, "checkpoint_info", {})
    params = model.num_parameters()
    rope = f"theta {config.rope_theta:g}"
    if config.rope_scaling:
        rope += ", scaling " + ", ".join(f"{k}={v}" for k, v in config.rope_scaling.items())
    rows = [
        ("checkpoint", f"{info['path']} ({info['format']})" if info else "(built in memory)"),
        ("architecture", f"{model.hf_architecture} (LLaMA)"),
        ("parameters", f"{params:,} ({params / 1e6:.1f}M)"),
        ("layers", str(config.num_hidden_layers)),
        ("hidden size", str(config.hidden_size)),
        ("attention heads", f"{config.num_attention_heads} (KV heads {config.num_key_value_heads}, "
                            f"head dim {config.head_dim})"),
        ("FFN size", str(config.intermediate_size)),
        ("vocab size", str(config.vocab_size)),
        ("context length", str(config.max_position_embeddings)),
        ("rope", rope),
        ("tied embeddings", "yes" if config.tie_word_embeddings else "no"),
        ("compute dtype", str(next(model.parameters()).dtype).removeprefix("torch.")),
    ]
    if info.get("tensor_types"):
        counts = Counter(info["tensor_types"].values())
        rows.append(("tensor types", ", ".join(f"{kind} x{n}" for kind, n in counts.most_common())))
    return rows
