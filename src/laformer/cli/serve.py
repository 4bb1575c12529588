"""``laformer serve [MODEL]``: an OpenAI-compatible HTTP server (docs/serving.md)."""

from __future__ import annotations

import argparse

from laformer.cli import common


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve MODEL (registry name, GGUF file, Hugging Face folder or `laformer finetune` folder) at "
                    "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/classify (classifiers), "
                    "/v1/models, /health and /metrics. Concurrent requests share decode steps.",
    )
    parser.add_argument("model", metavar="MODEL", nargs="?", default=common.DEFAULT_MODEL, help=common.MODEL_HELP)
    parser.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply to MODEL (LoRA is merged)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: from MODEL)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    parser.add_argument("--max-seq-len", type=int, default=2048,
                        help="prompt + completion tokens per request, the size of each cache row (default: 2048)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a row before new ones get HTTP 429 (default: 64)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    common.add_model_options(parser, model_flag=False)
    common.add_attention_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from laformer.errors import ConfigError
    from laformer.extras import require

    for module in ("fastapi", "uvicorn"):  # before the model loads: say what to install at once
        require(module, "serve", "laformer serve")
    for flag in ("max_batch", "max_seq_len", "max_queue"):
        if getattr(args, flag) < (0 if flag == "max_queue" else 1):
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from laformer.serve import load_served
    from laformer.serve import run as serve

    served = load_served(args.model, adapter=args.adapter, dtype=args.dtype, quantize=args.quantize,
                         attention=common.attention_config(args), name=args.model_name, max_batch=args.max_batch,
                         max_length=args.max_seq_len, max_queue=args.max_queue)
    print(f"laformer serve: {served.name} ({served.task}) at http://{args.host}:{args.port}/v1", flush=True)
    serve(served, args.host, args.port, args.api_key, args.log_level)
    return 0
