"""Actively Mediated Attention on the default model, against full attention and a sinks + window baseline.

For each context: decode time per token through ``model.generate(..., attention=AMAConfig(...))`` (the decode engine's
native step, as a user runs it), prefill time, perplexity on the long
texts in ../shared/data/longtext (sliding windows, the last quarter of each scored) and passkey retrieval
accuracy (a 5-digit key stated once in filler text at depths 0%..100%, asked for at the end).

    python bench/ama.py                   # everything at 1k, 2k, 4k and 8k (many CPU hours)
    python bench/ama.py --quick           # decode speed at 1k-8k, quality at 1k and 2k, few trials
    python bench/ama.py --quality-contexts 4096 --trials 20 --methods full,ama-1024,window-1024

Decode timing prefills a real-text prompt once per method and times further ``generate`` calls on it (the engine
reuses the prompt's keys); ``--kernel-contexts`` times one layer's attention alone on random tensors. Quality runs
on real text. ``--clock cpu --threads 1`` times this process's CPU seconds, which other jobs on a shared machine
disturb far less than wall time. The 8k decode table of docs/ama.md:

    python bench/ama.py --contexts 8192 --quality-contexts none --kernel-contexts none --threads 1 --clock cpu
        --methods full,ama-1024,ama-1024-off,ama-512,window-1024 [--quantize int8]

``--passkey-prefill shared`` (default) prefills each passkey prompt once with full attention and runs the
question and the answer under each method, as Quest evaluates; ``method`` answers each whole prompt with
``model.generate(..., attention=...)`` (the decode engine, whose prompt cache reuses the filler the prompts
share). ``--ppl-prefill method`` (default) runs each perplexity window wholly under the method (block-sparse
prefill); ``shared`` prefills its first three quarters once with full attention and only the scored quarter
runs under each method.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from laformer import LaFormerForCausalLM
from laformer.ama import AMAConfig, SlicedKVCache
from laformer.attention import sdpa_attention
from laformer.formats.registry import DEFAULT_MODEL, resolve
from laformer.inference.engine import engine_for
from laformer.tokenizer import LaFormerTokenizer

LONGTEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "longtext"
SLICE = 32
METHODS = {
    "full": None,
    "ama-512": AMAConfig(slice_len=SLICE, budget=512),
    "ama-1024": AMAConfig(slice_len=SLICE, budget=1024),
    "ama-512-off": AMAConfig(slice_len=SLICE, budget=512, mediation="off"),
    "ama-1024-off": AMAConfig(slice_len=SLICE, budget=1024, mediation="off"),
    "ama-1024-bound": AMAConfig(slice_len=SLICE, budget=1024, score="bound", local_window=768),  # stop 9's default
    "window-512": AMAConfig(slice_len=SLICE, budget=512, local_window=512 - SLICE, mediation="off"),
    "window-1024": AMAConfig(slice_len=SLICE, budget=1024, local_window=1024 - SLICE, mediation="off"),
}
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = " What is the pass key? The pass key is"


clock = time.perf_counter  # --clock cpu: time.process_time, this process's CPU seconds (see main)


class Timed:
    """Wraps an attention backend and accumulates the seconds spent inside it."""

    def __init__(self, backend) -> None:
        self.backend, self.seconds = backend, 0.0

    def __call__(self, q, k, v, mask, *, layer_idx, cache):
        start = clock()
        out = self.backend(q, k, v, mask, layer_idx=layer_idx, cache=cache)
        self.seconds += clock() - start
        return out


def full_attention(q, k, v, mask, *, layer_idx=0, cache=None):
    """The exact baseline. A decode step runs SDPA with each KV head's G query heads as G query rows, so nothing
    is copied per query head (measured a little faster here than ``enable_gqa``); otherwise the library's SDPA."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if T == 1 and H != Hkv:
        return F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), k, v, attn_mask=mask).view(B, H, 1, D)
    return sdpa_attention(q, k, v, mask, layer_idx=layer_idx, cache=cache)


def use(model: LaFormerForCausalLM, method: str) -> Timed:
    config = METHODS[method]
    timed = Timed(full_attention if config is None else config.build_backend(model.decoder))
    model.decoder.set_attention(timed)
    return timed


def same_as_full(method: str, context: int) -> bool:
    """A budget that covers the context makes AMA exactly full attention: reuse full's numbers."""
    config = METHODS[method]
    return config is not None and -(-context // SLICE) <= config.budget_slices


# ---------------------------------------------------------------- speed


PROMPT_ROOM = 40  # a decode-timing prompt is the context minus this, so 1 + 32 new tokens fit one cache size


@torch.no_grad()
def decode_speed(model, tokenizer, context: int, methods: list[str], steps: int, rounds: int = 1) -> dict[str, dict]:
    """Milliseconds per token decoded by ``model.generate(..., attention=...)``, as a user calls it: the decode
    engine (its native step, for full attention and AMA alike), a real-text prompt of ``context - 40`` tokens.

    Each method prefills the prompt once (under the method); then ``generate`` runs on the same prompt with 1 and
    with ``1 + steps`` new tokens, and the engine's prompt cache reuses the prefilled keys, so the difference of the
    two is ``steps`` decode steps. Methods take turns over ``rounds`` rounds."""
    ids = text_windows(tokenizer, context - PROMPT_ROOM, 1)[0][None]
    steps = min(steps, PROMPT_ROOM - 8)
    totals, paths = dict.fromkeys(methods, 0.0), {}
    for _ in range(rounds):
        for method in methods:
            options = {"attention": METHODS[method], "eos_token_id": []}
            model.generate(ids, max_new_tokens=1, **options)  # the prefill; the engine keeps its keys
            start = clock()
            model.generate(ids, max_new_tokens=1, **options)
            short = clock() - start
            start = clock()
            model.generate(ids, max_new_tokens=1 + steps, **options)
            totals[method] += clock() - start - short
            paths[method] = engine_for(model).path
    return {m: {"decode_ms": 1000 * t / (rounds * steps), "path": paths[m]} for m, t in totals.items()}


@torch.no_grad()
def kernel_speed(model, context: int, methods: list[str], repeats: int = 20) -> dict[str, float]:
    """Milliseconds of one layer's decode attention alone on random tensors of the model's shapes; unlike the
    model, the kernel runs past the trained context, which shows how the gap grows."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, cfg.num_attention_heads, 1, cfg.head_dim, generator=g)
    cache = SlicedKVCache(1, SLICE)
    shape = (1, cfg.num_key_value_heads, context, cfg.head_dim)
    k, v = cache.update(torch.randn(shape, generator=g), torch.randn(shape, generator=g), 0)
    results = {}
    for method in methods:
        config = METHODS[method]
        backend = full_attention if config is None else config.build_backend(model.decoder)
        backend(q, k, v, None, layer_idx=0, cache=cache)  # warm-up, summaries
        start = clock()
        for _ in range(repeats):
            backend(q, k, v, None, layer_idx=0, cache=cache)
        results[method] = 1000 * (clock() - start) / repeats
    return results


# ---------------------------------------------------------------- perplexity


def text_windows(tokenizer, context: int, count: int) -> list[torch.Tensor]:
    """``count`` windows of ``context`` tokens, sliding by a quarter, spread over the long texts."""
    files = sorted(LONGTEXT.glob("*.txt"))
    per_file = [count // len(files) + (i < count % len(files)) for i in range(len(files))]
    windows = []
    for path, n in zip(files, per_file):
        if n == 0:
            continue
        need = context + (n - 1) * (context // 4)
        ids = tokenizer.encode(path.read_text(encoding="utf-8")[: need * 8], add_special_tokens=False)
        for i in range(n):
            start = i * (context // 4)
            windows.append(torch.tensor(ids[start : start + context]))
    return [w for w in windows if len(w) == context]


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor], method: str) -> tuple[float, float]:
    """Perplexity over the last quarter of every window, and the mean seconds of one window's forward."""
    use(model, method)
    nll, count, seconds = 0.0, 0, 0.0
    for ids in windows:
        scored = len(ids) // 4
        start = clock()
        logits = model(ids[None], logits_to_keep=scored + 1).logits[0, :-1].float()
        seconds += clock() - start
        nll += F.cross_entropy(logits, ids[-scored:], reduction="sum").item()
        count += scored
    model.decoder.set_attention(None)
    return math.exp(nll / count), seconds / len(windows)


@torch.no_grad()
def perplexity_shared(model, windows: list[torch.Tensor], methods: list[str]) -> dict[str, float]:
    """Perplexity over the last quarter of every window when only the scored tokens run under the method: the
    first three quarters are prefilled once with full attention, as in the passkey test and in decoding after
    an exact prefill."""
    nll, count = dict.fromkeys(methods, 0.0), 0
    for ids in windows:
        scored = len(ids) // 4
        split = len(ids) - scored - 1  # the last context token's logits predict the first scored token
        cache = SlicedKVCache(model.config.num_hidden_layers, SLICE, capacity=len(ids) + SLICE)
        use(model, "full")
        model(ids[None, :split], past_key_values=cache, use_cache=True, logits_to_keep=1)
        for method in methods:
            use(model, method)
            cache.crop(split)
            logits = model(ids[None, split:], past_key_values=cache, use_cache=True).logits[0, :-1].float()
            nll[method] += F.cross_entropy(logits, ids[-scored:], reduction="sum").item()
        count += scored
    model.decoder.set_attention(None)
    return {m: math.exp(nll[m] / count) for m in methods}


# ---------------------------------------------------------------- passkey


def passkey_prompt(tokenizer, context: int, depth: float, key: str) -> tuple[list[int], int]:
    """Token ids of about ``context`` tokens with the key stated once at ``depth``; and the question's length."""
    filler = tokenizer.encode(FILLER, add_special_tokens=False)
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    room = context - len(needle) - len(question)
    body = (filler * (room // len(filler) + 1))[:room]
    at = int(round(depth * len(body) / len(filler))) * len(filler)
    at = min(at, len(body))
    return body[:at] + needle + body[at:] + question, len(question)


@torch.no_grad()
def answer(model, prompt: list[int], cache: SlicedKVCache, start: int, new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt``; ``cache`` already holds its first ``start`` tokens."""
    cache.crop(start)
    logits = model(torch.tensor([prompt[start:]]), past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    out = []
    for _ in range(new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return out


@torch.no_grad()
def passkey(model, tokenizer, context: int, methods: list[str], trials: int, shared: bool) -> dict[str, float]:
    """Accuracy (%) per method over ``trials`` keys at depths 0..100%. With ``shared``, the prompt body is
    prefilled once per trial with full attention; trials run from the deepest key up, so the filler before
    each key is already in the cache (a causal model's prefix does not depend on what follows)."""
    rng = random.Random(context)
    trial_keys = [(trial / max(1, trials - 1), str(rng.randint(10000, 99999))) for trial in range(trials)]
    hits = {m: 0 for m in methods}
    if not shared:  # model.generate under the method; its engine reuses the filler the last prompt shares
        for method in methods:
            for depth, key in sorted(trial_keys, reverse=True):
                prompt, _ = passkey_prompt(tokenizer, context - 8, depth, key)
                ids = model.generate(torch.tensor([prompt]), max_new_tokens=7, attention=METHODS[method])
                hits[method] += key in re.sub(r"\s", "", tokenizer.decode(ids[0, len(prompt):].tolist()))
        return {m: 100.0 * hits[m] / trials for m in methods}
    cache = SlicedKVCache(model.config.num_hidden_layers, SLICE, capacity=context + 16)
    cached = 0  # tokens in ``cache`` that are pure filler, valid for any later (shallower) key
    for depth, key in sorted(trial_keys, reverse=True):
        prompt, question = passkey_prompt(tokenizer, context - 8, depth, key)  # room for the answer
        start = len(prompt) - question
        at = prompt_key_position(tokenizer, prompt, key)
        cached = min(cached, at)
        cache.crop(cached)
        use(model, "full")
        model(torch.tensor([prompt[cached:start]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        cached = at
        for method in methods:
            use(model, method)
            text = tokenizer.decode(answer(model, prompt, cache, start, 7))
            hits[method] += key in re.sub(r"\s", "", text)
    model.decoder.set_attention(None)
    return {m: 100.0 * hits[m] / trials for m in methods}


def prompt_key_position(tokenizer, prompt: list[int], key: str) -> int:
    """Where the needle starts in a passkey prompt: everything before it is filler."""
    needle = tokenizer.encode(f" The pass key is {key}.", add_special_tokens=False)
    for at in range(len(prompt) - len(needle) + 1):
        if prompt[at : at + len(needle)] == needle:
            return at
    raise ValueError(f"pass key {key} not found in its prompt")


# ---------------------------------------------------------------- driver


def heatmap(model, tokenizer, context: int, path: Path) -> None:
    """Selections of ama-1024 while answering one passkey prompt (key at 30% depth), drawn as a PNG."""
    from laformer.ama.viz import selection_heatmap

    config = AMAConfig(slice_len=SLICE, budget=1024, return_selection=True)
    prompt, question = passkey_prompt(tokenizer, context - 16, 0.3, "52817")
    cache = SlicedKVCache(model.config.num_hidden_layers, SLICE)
    model.decoder.set_attention(None)
    with torch.no_grad():
        model(torch.tensor([prompt[:-question]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    model.decoder.set_attention(config)
    answer(model, prompt, cache, len(prompt) - question, 16)
    model.decoder.set_attention(None)
    selection_heatmap(config.recorder, path, layers=list(range(0, model.config.num_hidden_layers, 3)))
    print(f"selection heatmap: {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1024,2048,4096,8192", help="contexts for decode/prefill timing")
    parser.add_argument("--quality-contexts", default=None, help="contexts for perplexity and passkey "
                        "(default: --contexts)")
    parser.add_argument("--kernel-contexts", default="8192,16384,32768",
                        help="contexts for the attention-kernel-alone timing ('none' to skip)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--trials", type=int, default=20, help="passkey trials per context, depths 0..100%% "
                        "(0: skip passkey)")
    parser.add_argument("--ppl-windows", type=int, default=6, help="perplexity windows per context")
    parser.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps per method and round "
                        "(at most 32)")
    parser.add_argument("--rounds", type=int, default=1, help="decode timing rounds (each prefills every method)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="load the model quantized, as from_pretrained(quantize=...)")
    parser.add_argument("--passkey-prefill", choices=("shared", "method"), default="shared")
    parser.add_argument("--ppl-prefill", choices=("method", "shared"), default="method",
                        help="method: the whole window runs under the method (block-sparse prefill); shared: the "
                        "first three quarters are prefilled with full attention, the scored quarter under the method")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time, steadier than wall time on a shared machine "
                        "(use with --threads 1)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="quality at 1k and 2k only, 5 trials, 2 windows, "
                        "8 decode steps")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--heatmap", type=Path, default=None, help="draw a selection heatmap PNG here")
    args = parser.parse_args(argv)
    if args.quick:
        args.quality_contexts = args.quality_contexts or "1024,2048"
        args.trials, args.ppl_windows, args.decode_tokens = 5, 2, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global clock
        clock = time.process_time
    contexts = [int(c) for c in args.contexts.split(",") if c.isdigit()]
    quality = [int(c) for c in (args.quality_contexts or args.contexts).split(",") if c.isdigit()]  # "none": skip
    methods = args.methods.split(",")
    if methods[0] != "full":
        methods = ["full"] + [m for m in methods if m != "full"]

    path = resolve(DEFAULT_MODEL)
    model = LaFormerForCausalLM.from_pretrained(path, quantize=args.quantize)
    tokenizer = LaFormerTokenizer.from_pretrained(path)
    print(f"threads={torch.get_num_threads()} {AMAConfig(budget=1024).describe()}; "
          f"{AMAConfig(budget=512).describe()}", file=sys.stderr)
    rows: dict[tuple[int, str], dict[str, float]] = {}
    for context in sorted(set(contexts) | set(quality)):
        if context in contexts:
            for method, r in decode_speed(model, tokenizer, context, methods, args.decode_tokens,
                                          args.rounds).items():
                rows.setdefault((context, method), {}).update(r)
            print(f"[{context}] decode timed", file=sys.stderr)
        if context in quality:
            windows = text_windows(tokenizer, context, args.ppl_windows)
            if args.ppl_prefill == "shared":
                distinct = [m for m in methods if not same_as_full(m, context)]
                for method, ppl in perplexity_shared(model, windows, distinct).items():
                    print(f"[{context}] {method} ppl (shared prefill) {ppl:.3f}", file=sys.stderr)
                    rows.setdefault((context, method), {})["ppl"] = ppl
                for method in methods:
                    if same_as_full(method, context):
                        rows.setdefault((context, method), {})["ppl"] = rows[(context, "full")]["ppl"]
            for method in methods if args.ppl_prefill == "method" else []:
                row = rows.setdefault((context, method), {})
                if same_as_full(method, context):
                    row.update({k: rows[(context, "full")][k] for k in ("ppl", "prefill_s")})
                    continue
                row["ppl"], row["prefill_s"] = perplexity(model, windows, method)
                print(f"[{context}] {method} ppl {row['ppl']:.3f} prefill {row['prefill_s']:.1f}s", file=sys.stderr)
            if not args.trials:
                continue
            distinct = [m for m in methods if not same_as_full(m, context)]
            scores = passkey(model, tokenizer, context, distinct, args.trials, args.passkey_prefill == "shared")
            for method in methods:
                rows[(context, method)]["passkey"] = scores["full" if same_as_full(method, context) else method]
            print(f"[{context}] passkey {scores}", file=sys.stderr)
    kernels = {}
    for context in [int(c) for c in args.kernel_contexts.split(",") if c.isdigit()]:
        kernels[context] = kernel_speed(model, context, methods)
    if args.heatmap:
        heatmap(model, tokenizer, max(quality or contexts), args.heatmap)
    print_table(rows, methods)
    if kernels:
        print("\nDecode attention of one layer alone, ms (x full):\n")
        print("| context | " + " | ".join(methods) + " |")
        print("|---:|" + "---:|" * len(methods))
        for context, r in kernels.items():
            print(f"| {context} | " + " | ".join(f"{r[m]:.2f} ({r['full'] / r[m]:.1f}x)" for m in methods) + " |")
    if args.json:
        results = {f"{c}/{m}": r for (c, m), r in rows.items()}
        results.update({f"kernel/{c}/{m}": ms for c, r in kernels.items() for m, ms in r.items()})
        args.json.write_text(json.dumps(results, indent=1))


def print_table(rows: dict[tuple[int, str], dict[str, float]], methods: list[str]) -> None:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    print("| context | method | decode ms/tok (step) | x full | prefill s | x full | ppl | ppl vs full | passkey % |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for context in sorted({c for c, _ in rows}):
        full = rows.get((context, "full"), {})
        for method in methods:
            r = rows.get((context, method), {})
            ratio = {k: (full[k] / r[k] if k in r and k in full and r[k] else None) for k in ("decode_ms", "prefill_s")}
            delta = 100 * (r["ppl"] / full["ppl"] - 1) if "ppl" in r and "ppl" in full else None
            decode = f"{r['decode_ms']:.1f} ({r['path']})" if "decode_ms" in r else "-"
            print(f"| {context} | {method} | {decode} | {cell(ratio['decode_ms'], '.2f')} | "
                  f"{cell(r.get('prefill_s'), '.1f')} | {cell(ratio['prefill_s'], '.2f')} | "
                  f"{cell(r.get('ppl'), '.3f')} | {cell(delta, '+.1f')}% | {cell(r.get('passkey'), '.0f')} |")

if __name__ == "__main__":
    main()
