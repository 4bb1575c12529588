"""``laformer generate "prompt"``: stream a completion to stdout."""

from __future__ import annotations

import argparse
import sys

from laformer.cli import common


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="complete a prompt, streaming the text to stdout",
        description="Complete PROMPT with the model, printing the text as it is generated. "
                    "Greedy by default; --temperature > 0 samples.",
    )
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt text, or - to read it from stdin")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user message in the model's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    common.add_model_options(parser)
    common.add_sampling_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from laformer.generation import stream

    options = common.sampling_options(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = common.load_model(args)
    options.update(common.engine_options(args, model))
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    for piece in stream(model, input_ids, tokenizer, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
