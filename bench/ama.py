"""Actively Mediated Attention on the default model, against full attention (and other budgets and baselines).

Per context: decode time per token through ``model.generate(..., attention=AMAConfig(...))`` (the decode engine's
native step, as a user runs it, for both sides), perplexity on the long texts in ../shared/data/longtext (the last
quarter of each window scored) and passkey retrieval (a 5-digit key stated once in filler text at several depths,
asked for at the end), printed as hits / trials with a 95 % interval.

    python bench/ama.py                      # the 8k float32 table, full vs ama-1024: ~17 CPU minutes (an
                                             # estimate from its stages), ~10 min on 2 idle cores
    python bench/ama.py --quantize int8      # the same with int8 weights
    python bench/ama.py --contexts 1024,2048,4096,8192 --methods full,ama-512,ama-1024,window-1024 --trials 20

Flags (all optional):
    --contexts 8192            contexts for decode timing ('none' to skip)
    --quality-contexts C,...   contexts for perplexity and passkey (default: --contexts; 'none' to skip)
    --methods full,ama-1024    any of METHODS below; full always runs, and first
    --trials 20                passkey trials per context, spread round-robin over --depths (0: no passkey)
    --depths 0,25,50,75,100    passkey depths in percent of the filler
    --ppl-windows 1            perplexity windows per context (A Tale of Two Cities, Dracula, ...)
    --decode-tokens 32         timed decode steps per method and round (at most 32); --rounds 1
    --quantize int8|int4       load the model quantized, as from_pretrained(quantize=...)
    --time-limit 1500          seconds: after that, stages and passkey trials still to run are skipped, and the
                               table shows what was measured (the passkey count says how many trials ran)
    --clock cpu|wall           cpu (default): this process's CPU seconds, which other jobs on a shared machine
                               disturb far less than wall time; --threads 1 (default, decode timing) goes with it
    --quality-threads N        threads for perplexity and passkey, which are not timed (default: all cores)
    --passkey-prefill shared   shared (default): the filler is prefilled once with full attention, each trial
                               copies its keys up to the needle and prefills the rest of its prompt body exactly,
                               question and answer run under each method (as Quest evaluates); method: each whole
                               prompt is answered by ``model.generate(prompt, attention=...)``
    --ppl-prefill method       method (default): the whole window runs under the method (block-sparse prefill);
                               shared: the first three quarters are prefilled with full attention
    --kernel-contexts none     also time one layer's attention alone on random tensors at these contexts
    --json PATH, --heatmap PATH

Decode timing prefills a real-text prompt of ``context - 40`` tokens once per method and times further ``generate``
calls on it (the engine reuses the prompt's keys): the difference of 1 and 1 + 32 new tokens is 32 steps. Methods
take turns (decode rounds, perplexity windows and passkey trials are interleaved), and the load average of the
machine is printed at the start and the end. Each stage prints its own wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from laformer import LaFormerForCausalLM
from laformer.ama import AMAConfig, SlicedKVCache
from laformer.attention import attention_backend, sdpa_attention
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
    "ama-1024-bound": AMAConfig(slice_len=SLICE, budget=1024, score="bound", local_window=768),  # the former default
    "window-512": AMAConfig(slice_len=SLICE, budget=512, local_window=512 - SLICE, mediation="off"),
    "window-1024": AMAConfig(slice_len=SLICE, budget=1024, local_window=1024 - SLICE, mediation="off"),
}
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = " What is the pass key? The pass key is"


clock = time.process_time  # --clock wall: time.perf_counter (see main)


class OutOfTime(Exception):
    """The --time-limit passed: what is still to run is skipped."""


class Budget:
    """The --time-limit, in wall seconds from the start."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.perf_counter() + seconds

    def check(self) -> None:
        if self.end is not None and time.perf_counter() > self.end:
            raise OutOfTime


class Stage:
    """Prints how long a stage took, in wall and CPU seconds (where the time of a long run goes)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc) -> None:
        print(f"  {self.name}: {time.perf_counter() - self.wall:.0f} s wall, {time.process_time() - self.cpu:.0f} s "
              f"CPU{' (cut by --time-limit)' if exc[0] is OutOfTime else ''}", file=sys.stderr, flush=True)


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


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
    timed = Timed(full_attention if config is None else attention_backend(config, model.decoder))
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
        backend = full_attention if config is None else attention_backend(config, model.decoder)
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
def perplexity(model, windows: list[torch.Tensor], methods: list[str], budget: Budget) -> dict[str, float]:
    """Perplexity per method over the last quarter of every window, each window run wholly under each method in
    turn (block-sparse prefill for AMA); windows not reached before the time limit are left out for all."""
    nll, count = dict.fromkeys(methods, 0.0), 0
    try:
        for ids in windows:
            budget.check()
            scored = len(ids) // 4
            for method in methods:
                use(model, method)
                logits = model(ids[None], logits_to_keep=scored + 1).logits[0, :-1].float()
                nll[method] += F.cross_entropy(logits, ids[-scored:], reduction="sum").item()
            count += scored
    except OutOfTime:
        pass
    finally:
        model.decoder.set_attention(None)
    return {m: math.exp(nll[m] / count) for m in methods} if count else {}


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


def passkey_trials(context: int, trials: int, depths: list[float]) -> list[tuple[float, str]]:
    """(depth, key) of every trial: depths round-robin, each trial its own random key (fixed by the context)."""
    rng = random.Random(context)
    return [(depths[t % len(depths)], str(rng.randint(10000, 99999))) for t in range(trials)]


def passkey_filler(tokenizer, context: int) -> list[int]:
    """The filler every passkey prompt of ``context`` tokens starts with, up to its needle."""
    filler = tokenizer.encode(FILLER, add_special_tokens=False)
    return (filler * (context // len(filler) + 1))[:context]


@torch.no_grad()
def passkey(model, tokenizer, context: int, methods: list[str], trials: int, shared: bool,
            depths: list[float] = (0.0, 0.25, 0.5, 0.75, 1.0), budget: Budget | None = None
            ) -> dict[str, list[tuple[float, bool]]]:
    """(depth, found) of each trial per method. Trials take the depths in turn, every method answers a trial
    before the next one starts, and trials not reached before the time limit are left out for all.

    With ``shared``, the filler alone is prefilled once with full attention; a trial copies the filler's keys up to
    its needle (a causal model's prefix does not depend on what follows) and prefills the rest of its prompt body
    with full attention, so it costs the tokens from its needle on; question and answer run under each method."""
    budget = budget or Budget(None)
    outcomes: dict[str, list[tuple[float, bool]]] = {m: [] for m in methods}
    layers = model.config.num_hidden_layers
    filler, cache = (SlicedKVCache(layers, SLICE, capacity=context + 16) for _ in range(2))
    filler_ids = passkey_filler(tokenizer, context)
    try:
        if shared:
            budget.check()
            use(model, "full")
            model(torch.tensor([filler_ids]), past_key_values=filler, use_cache=True, logits_to_keep=1)
        for trial, (depth, key) in enumerate(passkey_trials(context, trials, depths)):
            budget.check()
            prompt, question = passkey_prompt(tokenizer, context - 8, depth, key)  # room for the answer
            found = {}
            if shared:
                start, at = len(prompt) - question, prompt_key_position(tokenizer, prompt, key)
                assert prompt[:at] == filler_ids[:at], "a passkey prompt must start with the shared filler"
                cache.crop(0)
                for layer in range(layers):
                    cache.update(filler.keys[layer][:, :, :at], filler.values[layer][:, :, :at], layer)
                use(model, "full")
                model(torch.tensor([prompt[at:start]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            for method in methods:
                if shared:
                    use(model, method)
                    text = tokenizer.decode(answer(model, prompt, cache, start, 7))
                else:  # model.generate under the method, as a user runs it
                    ids = model.generate(torch.tensor([prompt]), max_new_tokens=7, attention=METHODS[method])
                    text = tokenizer.decode(ids[0, len(prompt):].tolist())
                found[method] = key in re.sub(r"\s", "", text)
                outcomes[method].append((depth, found[method]))
            print(f"[{context}] passkey trial {trial + 1}/{trials}, depth {100 * depth:.0f} %: "
                  + ", ".join(f"{m} {'found' if hit else 'missed'}" for m, hit in found.items()),
                  file=sys.stderr, flush=True)
    except OutOfTime:
        pass
    finally:
        model.decoder.set_attention(None)
    return outcomes


def percent(outcomes: list[tuple[float, bool]]) -> float:
    return 100.0 * sum(hit for _, hit in outcomes) / max(1, len(outcomes))


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % interval of a hit rate from ``hits`` of ``n`` trials (Wilson score interval), in percent."""
    if n == 0:
        return 0.0, 100.0
    p = hits / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half) / (1 + z * z / n), 100 * (centre + half) / (1 + z * z / n)


def passkey_report(context: int, outcomes: dict[str, list[tuple[float, bool]]]) -> None:
    """Hits / trials with their interval per method, hits per depth, and the trials where a method and full
    attention disagree (what a paired comparison of the two rests on)."""
    full = outcomes["full"]
    for method, results in outcomes.items():
        hits, n = sum(hit for _, hit in results), len(results)
        low, high = wilson(hits, n)
        per_depth = {}
        for depth, hit in results:
            got, of = per_depth.get(depth, (0, 0))
            per_depth[depth] = (got + hit, of + 1)
        depths = " ".join(f"{100 * d:.0f}%:{got}/{of}" for d, (got, of) in sorted(per_depth.items()))
        line = (f"[{context}] passkey {method}: {hits}/{n} trials ({percent(results):.0f} %, "
                f"95 % CI {low:.0f}-{high:.0f}); {depths}")
        if method != "full":
            only = sum(h and not f for (_, h), (_, f) in zip(results, full))
            missed = sum(f and not h for (_, h), (_, f) in zip(results, full))
            line += f"; found where full missed {only}, missed where full found {missed}"
        print(line, file=sys.stderr, flush=True)


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
    parser.add_argument("--contexts", default="8192", help="contexts for decode timing ('none' to skip)")
    parser.add_argument("--quality-contexts", default=None, help="contexts for perplexity and passkey "
                        "(default: --contexts; 'none' to skip)")
    parser.add_argument("--kernel-contexts", default="none",
                        help="contexts for the attention-kernel-alone timing, e.g. 8192,16384,32768")
    parser.add_argument("--methods", default="full,ama-1024", help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--trials", type=int, default=20, help="passkey trials per context, round-robin over "
                        "--depths (0: skip passkey)")
    parser.add_argument("--depths", default="0,25,50,75,100", help="passkey depths, percent")
    parser.add_argument("--ppl-windows", type=int, default=1, help="perplexity windows per context")
    parser.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps per method and round "
                        "(at most 32)")
    parser.add_argument("--rounds", type=int, default=1, help="decode timing rounds (each prefills every method)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="load the model quantized, as from_pretrained(quantize=...)")
    parser.add_argument("--passkey-prefill", choices=("shared", "method"), default="shared")
    parser.add_argument("--ppl-prefill", choices=("method", "shared"), default="method",
                        help="method: the whole window runs under the method (block-sparse prefill); shared: the "
                        "first three quarters are prefilled with full attention, the scored quarter under the method")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                        help="cpu: this process's CPU time, steadier than wall time on a shared machine")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads for decode timing")
    parser.add_argument("--quality-threads", type=int, default=None,
                        help="PyTorch threads for perplexity and passkey, which are not timed (default: all cores)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="wall seconds; then what is still to run is skipped and what was measured is printed")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--heatmap", type=Path, default=None, help="draw a selection heatmap PNG here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.clock == "wall":
        global clock
        clock = time.perf_counter
    budget = Budget(args.time_limit)
    contexts = [int(c) for c in args.contexts.split(",") if c.isdigit()]
    quality = [int(c) for c in (args.quality_contexts or args.contexts).split(",") if c.isdigit()]  # "none": skip
    depths = [float(d) / 100 for d in args.depths.split(",")]
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose from {','.join(METHODS)}")
    if methods[0] != "full":
        methods = ["full"] + [m for m in methods if m != "full"]

    path = resolve(DEFAULT_MODEL)
    started = time.perf_counter()
    print(f"start: {load()}; threads={torch.get_num_threads()}, clock {args.clock}, weights "
          f"{args.quantize or 'float32'}; {AMAConfig(budget=1024).describe()}", file=sys.stderr, flush=True)
    with Stage("load"):
        model = LaFormerForCausalLM.from_pretrained(path, quantize=args.quantize)
        tokenizer = LaFormerTokenizer.from_pretrained(path)
    rows: dict[tuple[int, str], dict[str, float]] = {}
    passkeys: dict[int, dict[str, list[tuple[float, bool]]]] = {}
    try:
        for context in sorted(set(contexts) | set(quality)):
            if context in contexts:
                budget.check()
                torch.set_num_threads(args.threads)
                with Stage(f"[{context}] decode timing"):
                    for method, r in decode_speed(model, tokenizer, context, methods, args.decode_tokens,
                                                  args.rounds).items():
                        rows.setdefault((context, method), {}).update(r)
                        print(f"[{context}] {method} decode {r['decode_ms']:.1f} ms/token ({r['path']} step)",
                              file=sys.stderr, flush=True)
            if context not in quality:
                continue
            torch.set_num_threads(args.quality_threads or os.cpu_count() or 1)
            distinct = [m for m in methods if not same_as_full(m, context)]
            budget.check()
            with Stage(f"[{context}] perplexity, {args.ppl_windows} window(s) x {len(distinct)} methods"):
                windows = text_windows(tokenizer, context, args.ppl_windows)
                if args.ppl_prefill == "shared":
                    ppl = perplexity_shared(model, windows, distinct)
                else:
                    ppl = perplexity(model, windows, distinct, budget)
            for method, value in ppl.items():
                print(f"[{context}] {method} perplexity {value:.3f}", file=sys.stderr, flush=True)
            for method in methods:
                if ppl:
                    rows.setdefault((context, method), {})["ppl"] = ppl["full" if same_as_full(method, context)
                                                                        else method]
            if args.trials:
                with Stage(f"[{context}] passkey, up to {args.trials} trials x {len(distinct)} methods"):
                    outcomes = passkey(model, tokenizer, context, distinct, args.trials,
                                       args.passkey_prefill == "shared", depths, budget)
                outcomes = {m: outcomes["full" if same_as_full(m, context) else m] for m in methods}
                passkeys[context] = outcomes
                passkey_report(context, outcomes)
                for method in methods:
                    rows.setdefault((context, method), {})["passkey"] = outcomes[method]
    except OutOfTime:
        print(f"--time-limit {args.time_limit:.0f} s reached: the rest is skipped", file=sys.stderr)
    kernels = {}
    for context in [int(c) for c in args.kernel_contexts.split(",") if c.isdigit()]:
        kernels[context] = kernel_speed(model, context, methods)
    if args.heatmap:
        heatmap(model, tokenizer, max(quality or contexts), args.heatmap)
    print(f"end: {load()}; {time.perf_counter() - started:.0f} s wall in all", file=sys.stderr)
    print_table(rows, methods, args.quantize or "float32")
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


def print_table(rows: dict[tuple[int, str], dict], methods: list[str], weights: str) -> None:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    print("| context | weights | method | decode ms/tok (step) | x full | ppl | ppl vs full | passkey hits/trials |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for context in sorted({c for c, _ in rows}):
        full = rows.get((context, "full"), {})
        for method in methods:
            r = rows.get((context, method), {})
            ratio = full["decode_ms"] / r["decode_ms"] if "decode_ms" in r and "decode_ms" in full else None
            delta = (r["ppl"] / full["ppl"] - 1) if "ppl" in r and "ppl" in full else None
            decode = f"{r['decode_ms']:.1f} ({r['path']})" if "decode_ms" in r else "-"
            keys = r.get("passkey")
            found = "-" if keys is None else f"{sum(hit for _, hit in keys)}/{len(keys)}"
            print(f"| {context} | {weights} | {method} | {decode} | {cell(ratio, '.2f')} | "
                  f"{cell(r.get('ppl'), '.3f')} | {cell(delta, '+.1%')} | {found} |")


if __name__ == "__main__":
    main()
