"""``laformer chat``: an interactive conversation that keeps its history."""

from __future__ import annotations

import argparse
import sys

from laformer.cli import common
from laformer.errors import LaFormerError

HELP = "commands: /reset forgets the conversation, /exit quits (so does end of input)"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with the model in the terminal",
        description="Read one user message per line from stdin and stream the model's replies. "
                    f"The conversation is kept between turns; {HELP}. Works with piped input too.",
    )
    parser.add_argument("--system", default=None, help="system message that opens the conversation")
    common.add_model_options(parser)
    common.add_sampling_options(parser, max_new_tokens=512)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from laformer.generation import stream

    options = common.sampling_options(args)
    model, tokenizer = common.load_model(args)
    options.update(common.engine_options(args, model))
    interactive = sys.stdin.isatty()
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    if interactive:
        print(f"laformer chat ({args.model}); {HELP}")
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            break
        if message == "/reset":
            history = list(opening)
            print("(conversation reset)")
            continue
        history.append({"role": "user", "content": message})
        budget = model.config.max_position_embeddings - args.max_new_tokens
        input_ids = _fit_history(history, opening, tokenizer, budget)
        reply = []
        try:
            for piece in stream(model, input_ids, tokenizer, **options):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except LaFormerError as exc:  # one bad turn (e.g. too long a message) does not end the conversation
            print(f"laformer: error: {exc}", file=sys.stderr)
            history.pop()
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _fit_history(history: list[dict], opening: list[dict], tokenizer, budget: int):
    """Token ids of the conversation, forgetting the oldest exchanges (in place) until it fits ``budget`` tokens."""
    while True:
        text = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        if input_ids.shape[1] <= budget or len(history) <= len(opening) + 1:
            return input_ids  # generate reports a lone message that is still too long
        del history[len(opening): len(opening) + 2]
