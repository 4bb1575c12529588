"""Generation benchmark of the public API, as the README shows it, against transformers and llama.cpp in one run.

laformer runs exactly the quick start: ``LaFormerForCausalLM.from_pretrained("smollm2-135m-instruct", quantize=...)``
then ``model.generate(inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=N)`` on prompts from
``tokenizer.apply_chat_template`` and ``tokenizer(..., padding=True)``. transformers runs the same weights (its own
GGUF loader, float32) through its ``generate``; llama.cpp (llama-cpp-python) the same GGUF file, token by token.

    OMP_WAIT_POLICY=PASSIVE python bench/generate.py            # ~3-5 minutes on 2 idle cores
    OMP_WAIT_POLICY=PASSIVE python bench/generate.py --sides laformer-int8,llama.cpp --rounds 2

Flags: ``--sides`` (comma-separated, default all of laformer-fp32/int8/int4, transformers, llama.cpp), ``--rounds``
(interleaved rounds, default 3), ``--new-tokens`` (default 32), ``--threads`` (default 2, every side).

Every side is one long-lived process (its own threads, 2 by default) and the parent interleaves them: each round
asks every side for one batch-1 and one batch-8 measurement in turn (OMP_WAIT_POLICY applies to laformer only: the
peers keep their spinning default, their fastest), and a side's rate is its best round, so a
burst of load from other processes costs every side alike. Decode tokens/s = new tokens / (time of generate(N) -
time of generate(1)), i.e. without the prefill. "first call" is the first ``generate`` after ``from_pretrained`` over
the warm one (same request); the one-time kernel build (C compiler, cached in $LAFORMER_CACHE) is timed apart, in a
fresh cache, and not part of the first call. Targets: batch 1 >= 1.5x llama.cpp, batch 8 >= 4x transformers, first
call <= 1.2x warm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SIDES = ["laformer-fp32", "laformer-int8", "laformer-int4", "transformers", "llama.cpp"]
QUESTIONS = ["What is the capital of France?", "Give me three tips for staying focused while studying.",
             "Explain photosynthesis in one paragraph.", "Write a haiku about the sea.",
             "How do I reverse a list in Python?", "What causes the seasons on Earth?",
             "Suggest a name for a small bakery.", "Summarise the plot of Romeo and Juliet in two sentences."]


# ----------------------------------------------------------------------------------------------- workers


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def laformer_side(mode: str, new_tokens: int):
    """The README's quick start; returns (load seconds, first call seconds, measure(batch, n) -> seconds)."""
    from laformer import LaFormerForCausalLM, LaFormerTokenizer

    start = time.perf_counter()
    tokenizer = LaFormerTokenizer.from_pretrained("smollm2-135m-instruct")
    model = LaFormerForCausalLM.from_pretrained("smollm2-135m-instruct",
                                                quantize=None if mode == "fp32" else mode)
    load = time.perf_counter() - start
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in QUESTIONS]
    inputs = {b: tokenizer(prompts[:b], return_tensors="pt", padding=True, add_special_tokens=False) for b in (1, 8)}

    def measure(batch: int, n: int) -> float:
        x = inputs[batch]
        return _timed(lambda: model.generate(x.input_ids, attention_mask=x.attention_mask, max_new_tokens=n,
                                             eos_token_id=[]))

    first = measure(1, new_tokens)
    return load, first, measure, dict(path=_engine_path(model))


def _engine_path(model) -> str:
    from laformer.inference import engine_for

    engine = engine_for(model)
    return engine.path + (f" ({engine.native_problem})" if engine.native_problem else "")


def _chat_ids(batch: int) -> tuple[list[list[int]], list[list[int]]]:
    """The laformer side's exact prompts as left-padded ids and masks, for the peers."""
    from laformer import LaFormerTokenizer

    tokenizer = LaFormerTokenizer.from_pretrained("smollm2-135m-instruct")
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in QUESTIONS[:batch]]
    x = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return x.input_ids.tolist(), x.attention_mask.tolist()


def transformers_side(new_tokens: int):
    import torch
    import transformers

    from laformer.formats.registry import DEFAULT_MODEL, resolve

    path = resolve(DEFAULT_MODEL)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    load = time.perf_counter() - start
    inputs = {b: [torch.tensor(t) for t in _chat_ids(b)] for b in (1, 8)}

    def measure(batch: int, n: int) -> float:
        ids, mask = inputs[batch]
        with torch.inference_mode():
            return _timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                                 do_sample=False, pad_token_id=0))

    first = measure(1, new_tokens)
    return load, first, measure, {}


def llama_cpp_side(new_tokens: int, threads: int):
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    from laformer.formats.registry import DEFAULT_MODEL, resolve

    start = time.perf_counter()
    llm = Llama(model_path=str(resolve(DEFAULT_MODEL)), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    load = time.perf_counter() - start
    ids = {b: [[t for t, m in zip(row, mask) if m] for row, mask in zip(*_chat_ids(b))] for b in (1, 8)}

    def measure(batch: int, n: int) -> float:
        def run():
            for prompt in ids[batch]:  # the high-level API decodes one sequence at a time
                llm.reset()
                llm.eval(prompt)
                for i in range(n):
                    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
                    if i < n - 1:
                        llm.eval([int(np.argmax(logits))])
        return _timed(run)

    first = measure(1, new_tokens)
    return load, first, measure, {}


def serve_worker(side: str, new_tokens: int, threads: int) -> None:
    """Load, then answer "batch n" lines on stdin with the seconds the call took, one JSON line each."""
    import torch

    torch.set_num_threads(threads)
    if side.startswith("laformer"):
        load, first, measure, info = laformer_side(side.split("-")[1], new_tokens)
    elif side == "transformers":
        load, first, measure, info = transformers_side(new_tokens)
    else:
        load, first, measure, info = llama_cpp_side(new_tokens, threads)
    if side != "llama.cpp":
        measure(8, 2)  # a warm batch-8 call is what a server sees; its buffers are set up here, untimed
    print(json.dumps(dict(load=load, first=first, **info)), flush=True)
    for line in sys.stdin:
        batch, n = map(int, line.split())
        print(json.dumps(measure(batch, n)), flush=True)


# ----------------------------------------------------------------------------------------------- parent


def kernel_build_seconds(env: dict) -> float:
    """The one-time native build (every kernel laformer uses), timed in the fresh cache that ``env`` names."""
    code = ("import time; t = time.perf_counter(); from laformer.quantization import kernels; "
            "from laformer.inference.native_step import native_available; "
            "assert kernels.available() and kernels.int8_rows_available() and native_available(); "
            "print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {SIDES}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker(args.worker, args.new_tokens, args.threads)
        return
    sides = [s for s in args.sides.split(",") if s]
    if unknown := set(sides) - set(SIDES):
        parser.error(f"unknown sides {sorted(unknown)}; choose from {SIDES}")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), LAFORMER_CACHE=cache)
        build = kernel_build_seconds(env) if any(s.startswith("laformer") for s in sides) else None
        workers, info = {}, {}
        for side in sides:  # one at a time, so the loads do not overlap
            proc = subprocess.Popen([sys.executable, __file__, "--worker", side, "--new-tokens", str(args.new_tokens),
                                     "--threads", str(args.threads)], env=side_env(env, side), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            line = proc.stdout.readline()
            if not line:
                print(f"{side}: failed to start (exit code {proc.wait()}); left out", flush=True)
                continue
            workers[side], info[side] = proc, json.loads(line)
            print(f"{side}: loaded in {info[side]['load']:.1f} s", flush=True)
        best: dict[tuple[str, int, int], float] = {}
        for _ in range(args.rounds):
            for batch in (1, 8):
                for side, proc in workers.items():
                    if side == "llama.cpp" and batch == 8:
                        continue  # sequential per prompt in its Python API: not a batch
                    for n in (1, args.new_tokens):
                        proc.stdin.write(f"{batch} {n}\n")
                        proc.stdin.flush()
                        seconds = json.loads(proc.stdout.readline())
                        best[side, batch, n] = min(seconds, best.get((side, batch, n), float("inf")))
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()
    report(args, sides=list(workers), info=info, best=best, build=build)


def side_env(env: dict, side: str) -> dict:
    """The peers always run with their threads' default wait policy (spinning): OMP_WAIT_POLICY=PASSIVE cuts
    llama.cpp's batch-1 decode to about a quarter here (33.5 vs 122 tok/s), so it applies to laformer's sides only."""
    if side.startswith("laformer"):
        return env
    return {k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"}


def report(args, sides, info, best, build) -> None:
    n = args.new_tokens

    def rate(side, batch):
        if (side, batch, n) not in best:
            return None
        return batch * (n - 1) / max(best[side, batch, n] - best[side, batch, 1], 1e-9)

    b1 = {s: rate(s, 1) for s in sides}
    b8 = {s: rate(s, 8) for s in sides}
    print(f"\n{args.threads} threads, {n} new tokens after chat prompts, best of {args.rounds} interleaved rounds; "
          f"laformer's OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (threads spin)')} (the peers' threads "
          f"always spin), load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (compare ratios, not absolute numbers)\n")
    print("| side | load s | first call / warm | decode b1 tok/s | b1 / llama.cpp | decode b8 tok/s | b8 / transformers |")
    print("|---|---|---|---|---|---|---|")

    def ratio(a, b):
        return "-" if a is None or not b else f"{a / b:.2f}"

    for side in sides:
        warm = best.get((side, 1, n))
        print(f"| {side} | {info[side]['load']:.1f} | {ratio(info[side]['first'], warm)} | "
              f"{'-' if b1[side] is None else f'{b1[side]:.1f}'} | {ratio(b1[side], b1.get('llama.cpp'))} | "
              f"{'-' if b8[side] is None else f'{b8[side]:.1f}'} | {ratio(b8[side], b8.get('transformers'))} |")
    if build is not None:
        print(f"\none-time kernel build (fresh cache, not in any first call): {build:.1f} s")
    for side in sides:
        if "path" in info[side]:
            print(f"{side}: decoded by the {info[side]['path']} step")
    print("targets: b1 >= 1.5x llama.cpp, b8 >= 4x transformers, first call <= 1.2x warm")


if __name__ == "__main__":
    main()
