"""Options and model loading shared by every subcommand, so each command adds a flag in one place."""

from __future__ import annotations

import argparse

import torch

from laformer.formats.registry import DEFAULT_MODEL


MODEL_HELP = f"registry name, GGUF file or Hugging Face folder (default: {DEFAULT_MODEL})"


def add_model_options(parser: argparse.ArgumentParser, model_flag: bool = True) -> None:
    """``--model``, ``--dtype``, ``--quantize`` and ``--threads`` (commands taking MODEL as a positional pass
    ``model_flag=False``)."""
    if model_flag:
        parser.add_argument("--model", "-m", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="compute dtype of the weights (default: float32)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="weight-only quantization at load: 3-8x faster CPU decoding (docs/quantization.md)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: all cores)")


def load_model(args: argparse.Namespace, model_class=None, with_tokenizer: bool = True):
    """The model (eval mode) and its tokenizer (or None) as the shared options describe them."""
    from laformer.model import LaFormerForCausalLM
    from laformer.tokenizer import LaFormerTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = (model_class or LaFormerForCausalLM).from_pretrained(
        args.model, dtype=args.dtype, attention=attention_config(args), quantize=getattr(args, "quantize", None))
    tokenizer = LaFormerTokenizer.from_pretrained(args.model) if with_tokenizer else None
    return model, tokenizer


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    """The generation knobs shared by ``generate`` and ``chat``."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"most tokens to generate per reply (default: {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 means greedy decoding (default: 0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise repeated tokens (1: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop when the output contains TEXT (repeatable); TEXT is not printed")
    add_attention_options(parser)


def add_attention_options(parser: argparse.ArgumentParser) -> None:
    """``--attention ama`` and its knobs (see ``laformer.ama.AMAConfig`` and docs/ama.md)."""
    group = parser.add_argument_group("attention")
    group.add_argument("--attention", choices=("sdpa", "ama"), default="sdpa",
                       help="exact attention (sdpa) or Actively Mediated sparse attention (ama)")
    group.add_argument("--ama-budget", type=int, default=1024, help="tokens attended exactly per query (default: 1024)")
    group.add_argument("--ama-slice-len", type=int, default=32, help="tokens per KV slice (default: 32)")
    group.add_argument("--ama-local-window", type=int, default=None,
                       help="recent tokens always kept (default: half the budget, in whole slices)")
    group.add_argument("--ama-sink-slices", type=int, default=1, help="first slices always kept (default: 1)")
    group.add_argument("--ama-mediation", choices=("off", "estimate", "learned"), default="estimate",
                       help="how unselected slices still count (default: estimate)")
    group.add_argument("--ama-score", choices=("scan", "bound", "mean"), default=None,
                       help="slice score: attention mass from a 4-bit key copy, min/max upper bound of q.k, or "
                            "q . mean key (default: AMAConfig's, scan)")
    group.add_argument("--ama-dense-layers", type=int, default=0, help="first N layers keep full attention")


def attention_config(args: argparse.Namespace):
    """The ``AMAConfig`` the attention options ask for, or None for exact attention."""
    if getattr(args, "attention", "sdpa") != "ama":
        return None
    from laformer.ama import AMAConfig

    fields = dict(slice_len=args.ama_slice_len, budget=args.ama_budget, sink_slices=args.ama_sink_slices,
                  local_window=args.ama_local_window, score=args.ama_score, mediation=args.ama_mediation,
                  dense_layers=args.ama_dense_layers)
    return AMAConfig(**{name: value for name, value in fields.items() if value is not None})


def engine_options(args: argparse.Namespace, model) -> dict:
    """``engine=`` for ``laformer.generation``: with exact attention, decode on ``laformer.inference.DecodeEngine``
    (the native step on the CPU); sparse attention keeps the plain path, whose growable cache it manages itself."""
    if attention_config(args) is not None:
        return {}
    from laformer.inference import DecodeEngine

    return {"engine": DecodeEngine(model)}


def sampling_options(args: argparse.Namespace) -> dict:
    """The keyword arguments for ``laformer.generation`` from the parsed sampling options."""
    options = dict(max_new_tokens=args.max_new_tokens, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, stop_strings=args.stop)
    if args.temperature > 0:
        options.update(do_sample=True, temperature=args.temperature)
    elif args.temperature < 0:
        from laformer.errors import GenerationError

        raise GenerationError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    return options
