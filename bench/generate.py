"""Generation benchmark: laformer (fp32, int8, int4; native, eager and compiled steps) against transformers and llama.cpp.

Every side runs in its own subprocess (so peak RSS is its own) on the same token ids, with the same thread count,
and the table is printed with ratios against the peers measured in the same run:

    python bench/generate.py            # full: 512-token prefill, 128 new tokens, 4 perplexity windows
    python bench/generate.py --quick    # a few minutes: shorter prompts and decodes, 1 window

Columns: load (s), peak RSS during load + generation (MB), prefill tokens/s (one forward over the prompt,
last-position logits), greedy decode tokens/s at batch 1 and 8 (timed as generate(N) minus generate(1), i.e.
without the prefill), perplexity over 512-token windows of wikitext-2 test. Decode is memory-bound at batch 1,
so the machine's read bandwidth is measured too and each side's bound = bandwidth / bytes of weights per token.

All three sides run their threads through OpenMP (libgomp), whose idle threads spin by default: the fastest choice
on an idle machine, but with another busy process on a 2-core machine every parallel region waits for a thread
that has no core, and decode slowed 20-50x for every side here. On a shared machine run with
``OMP_WAIT_POLICY=PASSIVE`` (passed to every side alike; the header prints it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# laformer-W is the engine's default (the native step); -eager and -compiled run its PyTorch step.
MODES = [f"laformer-{width}{step}" for width in ("fp32", "int8", "int4") for step in ("", "-eager", "-compiled")]
MODES += ["transformers-fp32", "llama.cpp"]
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "longtext" / "wikitext2_test.raw.txt"


# ----------------------------------------------------------------------------------------------- workers


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _window_perplexity(model, windows: list[list[int]]) -> float:
    """exp(mean next-token loss) over the given token windows, each scored on its own."""
    import torch

    nll, count = 0.0, 0
    for window in windows:
        ids = torch.tensor([window])
        nll += float(model(ids, labels=ids).loss) * (len(window) - 1)
        count += len(window) - 1
    return math.exp(nll / count)


def _decode_perplexity(engine, windows: list[list[int]]) -> float:
    """Perplexity of the same windows teacher-forced through the engine's decode step, one token at a time: what
    generation sees (the native step's int8 activations differ from the forward pass's float ones)."""
    import torch

    nll, count = 0.0, 0
    for window in windows:
        logits = engine.prefill(torch.tensor([window[:1]]), None, len(window))
        for t in range(1, len(window)):
            nll -= float(torch.log_softmax(logits[0], -1)[window[t]])
            if t < len(window) - 1:
                logits = engine.decode(torch.tensor([window[t]]))
        count += len(window) - 1
    return math.exp(nll / count)


def _best(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _decode_rate(generate, prompts, new_tokens: int, repeats: int) -> tuple[float, list]:
    """Tokens/s of the decode phase alone: generate(new_tokens) minus generate(1), per row."""
    one = _best(lambda: generate(prompts, 1), repeats)
    outputs = []
    full = _best(lambda: outputs.append(generate(prompts, new_tokens)), repeats)
    return len(prompts) * (new_tokens - 1) / max(full - one, 1e-9), outputs[-1]


def worker_laformer(mode: str, data: dict) -> dict:
    import torch

    from laformer import LaFormerForCausalLM
    from laformer.generation import generate
    from laformer.inference import DecodeEngine

    quantize = {"int8": "int8", "int4": "int4"}.get(mode.split("-")[1])
    start = time.perf_counter()
    model = LaFormerForCausalLM.from_pretrained(data["model"], quantize=quantize)
    step = mode.split("-")[2] if mode.count("-") == 2 else "native"
    engine = DecodeEngine(model, compile=step == "compiled", native=step == "native")
    load = time.perf_counter() - start
    state = model.state_dict()  # holds lm_head too when tied; the embedding itself costs one row per token
    weight_bytes = sum(t.numel() * t.element_size() for name, t in state.items() if "embed_tokens" not in name)

    def run(prompts, n):
        ids = torch.tensor(prompts)
        return generate(model, ids, max_new_tokens=n, eos_token_id=[], engine=engine)[:, ids.shape[1]:].tolist()

    with torch.inference_mode():
        start = time.perf_counter()
        # Warm-up at the measured sizes, so a compiled step is compiled here (once per batch size), not timed.
        run(data["decode_prompts"][:1], data["new_tokens"])
        engine.reset(len(data["decode_prompts"]), len(data["decode_prompts"][0]) + data["new_tokens"])
        run(data["decode_prompts"], 2)
        warmup = time.perf_counter() - start
        decode1, out1 = _decode_rate(run, data["decode_prompts"][:1], data["new_tokens"], data["repeats"])
        decode8, out8 = _decode_rate(run, data["decode_prompts"], data["new_tokens"], data["repeats"])
        # Prefill last: its longer cache would otherwise be reused by the decodes, at a shape not compiled yet.
        prompt = torch.tensor([data["prefill_prompt"]])
        prefill = len(data["prefill_prompt"]) / _best(lambda: engine.prefill(prompt, None, 1), data["repeats"])
        rss = _peak_rss_mb()
        ppl = _window_perplexity(model, data["ppl_windows"])
        # The PyTorch steps compute the forward pass's arithmetic (float activations); the native one may not.
        decode_ppl = _decode_perplexity(engine, data["ppl_windows"]) if step == "native" else None
    return dict(load=load, warmup=warmup, rss=rss, prefill=prefill, decode1=decode1, decode8=decode8,
                ppl=ppl, decode_ppl=decode_ppl, weight_bytes=weight_bytes, greedy=out1[0], greedy8=out8,
                compiled=engine.compiled, path=engine.path)


def worker_transformers(mode: str, data: dict) -> dict:
    import torch
    import transformers

    path = Path(data["gguf"])
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    load = time.perf_counter() - start
    weight_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "embed_tokens" not in n)
    weight_bytes += model.lm_head.weight.numel() * 4 if model.config.tie_word_embeddings else 0

    def run(prompts, n):
        ids = torch.tensor(prompts)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    with torch.inference_mode():
        start = time.perf_counter()
        run(data["decode_prompts"][:1], 4)
        warmup = time.perf_counter() - start
        prompt = torch.tensor([data["prefill_prompt"]])
        prefill = len(data["prefill_prompt"]) / _best(lambda: model(prompt, logits_to_keep=1), data["repeats"])
        decode1, out1 = _decode_rate(run, data["decode_prompts"][:1], data["new_tokens"], data["repeats"])
        decode8, out8 = _decode_rate(run, data["decode_prompts"], data["new_tokens"], data["repeats"])
        rss = _peak_rss_mb()
        ppl = _window_perplexity(model, data["ppl_windows"])
    return dict(load=load, warmup=warmup, rss=rss, prefill=prefill, decode1=decode1, decode8=decode8,
                ppl=ppl, weight_bytes=weight_bytes, greedy=out1[0], greedy8=out8)


def worker_llama_cpp(mode: str, data: dict) -> dict:
    import numpy as np
    import llama_cpp
    from gguf import GGUFReader
    from llama_cpp import Llama

    threads = data["threads"]
    context = max(len(data["prefill_prompt"]), len(data["decode_prompts"][0]) + data["new_tokens"]) + 8
    start = time.perf_counter()
    llm = Llama(model_path=data["gguf"], n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    load = time.perf_counter() - start
    reader = GGUFReader(data["gguf"])
    weight_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    if not any(t.name == "output.weight" for t in reader.tensors):  # tied: the embedding is the output head
        weight_bytes += int(embedding.n_bytes)

    def last_logits():  # llm.scores is only filled with logits_all=True
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

    def run(prompts, n):
        outputs = []
        for prompt in prompts:  # the high-level API decodes one sequence at a time
            llm.reset()
            llm.eval(prompt)
            tokens = []
            for _ in range(n):
                token = int(np.argmax(last_logits()))
                tokens.append(token)
                if len(tokens) < n:
                    llm.eval([token])
            outputs.append(tokens)
        return outputs

    def prefill_once():
        llm.reset()
        llm.eval(data["prefill_prompt"])

    start = time.perf_counter()
    run(data["decode_prompts"][:1], 4)
    warmup = time.perf_counter() - start
    prefill = len(data["prefill_prompt"]) / _best(prefill_once, data["repeats"])
    decode1, out1 = _decode_rate(run, data["decode_prompts"][:1], data["new_tokens"], data["repeats"])
    rss = _peak_rss_mb()
    del llm
    scorer = Llama(model_path=data["gguf"], n_ctx=max(len(w) for w in data["ppl_windows"]) + 8, n_batch=512,
                   n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for window in data["ppl_windows"]:
        scorer.reset()
        scorer.eval(window)
        logits = np.asarray(scorer.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return dict(load=load, warmup=warmup, rss=rss, prefill=prefill, decode1=decode1, decode8=None,
                ppl=math.exp(nll / count), weight_bytes=weight_bytes, greedy=out1[0], greedy8=None)


def run_worker(mode: str, data_path: str, out_path: str) -> None:
    data = json.loads(Path(data_path).read_text())
    import torch

    torch.set_num_threads(data["threads"])
    if mode.startswith("laformer"):
        result = worker_laformer(mode, data)
    elif mode.startswith("transformers"):
        result = worker_transformers(mode, data)
    else:
        result = worker_llama_cpp(mode, data)
    Path(out_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------- parent


def memory_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth: the best of a few reductions over a 512 MB tensor (far beyond the caches), as one stream and
    as 8 (a single stream per thread reads slower here than a decode kernel does)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(128 * 1024 * 1024)
    rows = x.view(8, -1)
    x.sum()
    return x.numel() * 4 / min(_best(lambda: x.sum(), 5), _best(lambda: rows.sum(1), 5)) / 1e9


def prepare_data(args) -> dict:
    from laformer.formats.registry import DEFAULT_MODEL, resolve
    from laformer.tokenizer import LaFormerTokenizer

    gguf = resolve(args.model if args.model != DEFAULT_MODEL else DEFAULT_MODEL)
    tokenizer = LaFormerTokenizer.from_pretrained(gguf)
    ids = tokenizer.encode(TEXT.read_text()[:400_000], add_special_tokens=False)
    window = 512
    prompt_len = args.prompt_tokens
    decode_len = 64
    decode_prompts = [ids[i * decode_len:(i + 1) * decode_len] for i in range(8)]
    offset = 8 * decode_len
    return dict(
        model=str(gguf), gguf=str(gguf), threads=args.threads, repeats=args.repeats, new_tokens=args.new_tokens,
        prefill_prompt=ids[offset:offset + prompt_len], decode_prompts=decode_prompts,
        ppl_windows=[ids[offset + i * window:offset + (i + 1) * window] for i in range(args.ppl_windows)],
    )


def available(mode: str) -> str | None:
    """None when ``mode`` can run here, else why not (with the install hint)."""
    import importlib.util

    if mode == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python not installed: pip install llama-cpp-python (compiles llama.cpp, a few minutes)"
    if mode == "transformers-fp32" and importlib.util.find_spec("transformers") is None:
        return "transformers not installed: pip install transformers"
    if "-int" in mode and importlib.util.find_spec("laformer.quantization") is None:
        return "laformer.quantization not available in this checkout"
    return None


_NATIVE_NOTE = " (the native step rounds activations to int8 for quantized weights: compare by dec ppl)"


def _shared_prefix(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128-token prefill, 32 new tokens, 1 ppl window")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry name or GGUF path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.data, args.out)
        return
    args.prompt_tokens, args.new_tokens, args.ppl_windows, args.repeats = (
        (128, 32, 1, 1) if args.quick else (512, 128, 4, 2))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {MODES}")

    bandwidth = memory_bandwidth_gbs(args.threads)
    data = prepare_data(args)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "data.json"
        data_path.write_text(json.dumps(data))
        for mode in modes:
            reason = available(mode)
            if reason:
                print(f"skipping {mode}: {reason}", flush=True)
                continue
            out_path = Path(tmp) / f"{mode}.json"
            print(f"running {mode} ...", flush=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--data", str(data_path),
                                   "--out", str(out_path)], env=env)
            if proc.returncode or not out_path.is_file():
                print(f"  {mode} failed (exit code {proc.returncode})", flush=True)
                continue
            results[mode] = json.loads(out_path.read_text())

    load_avg = os.getloadavg()[0]
    print(f"\nmodel {Path(data['gguf']).name}, {args.threads} threads, prefill {len(data['prefill_prompt'])} tokens, "
          f"decode {args.new_tokens} new tokens after 64-token prompts, ppl over {args.ppl_windows} x 512 tokens")
    print(f"memory read bandwidth {bandwidth:.1f} GB/s; load average at the end {load_avg:.1f} on {os.cpu_count()} "
          "CPUs (other processes share the machine: compare ratios, not absolute numbers); "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (threads spin)')}\n")
    header = (f"{'side':<24}{'load s':>7}{'RSS MB':>8}{'prefill t/s':>12}{'dec b1 t/s':>11}{'dec b8 t/s':>11}"
              f"{'ppl':>8}{'dec ppl':>8}{'MB/token':>9}{'b1 bound':>9}{'of bound':>9}{'b1/hf':>7}{'b1/llama':>9}{'b8/hf':>7}"
              f"{'pre/hf':>7}{'pre/llama':>10}")
    print(header)
    print("-" * len(header))
    hf, cpp = results.get("transformers-fp32"), results.get("llama.cpp")

    def ratio(a, b, key):
        return None if b is None or a.get(key) is None or not b.get(key) else a[key] / b[key]

    for mode, r in results.items():
        bound = bandwidth * 1e9 / r["weight_bytes"]
        print(f"{mode:<24}{r['load']:>7.1f}{r['rss']:>8.0f}{r['prefill']:>12.1f}{r['decode1']:>11.1f}"
              f"{fmt(r['decode8']):>11}{r['ppl']:>8.2f}{fmt(r.get('decode_ppl'), '.2f'):>8}"
              f"{r['weight_bytes'] / 1e6:>9.1f}{bound:>9.1f}"
              f"{r['decode1'] / bound:>9.0%}{fmt(ratio(r, hf, 'decode1'), '.2f'):>7}"
              f"{fmt(ratio(r, cpp, 'decode1'), '.2f'):>9}{fmt(ratio(r, hf, 'decode8'), '.2f'):>7}"
              f"{fmt(ratio(r, hf, 'prefill'), '.2f'):>7}{fmt(ratio(r, cpp, 'prefill'), '.2f'):>10}")
    print("ppl: one forward pass per window; dec ppl: the same windows teacher-forced through the native decode step "
          "(the eager and compiled steps compute the forward pass's arithmetic)\n")
    for mode, r in results.items():
        if r.get("warmup"):
            path = f", decoded by the {r['path']} step" if r.get("path") else ""
            print(f"{mode}: warm-up {r['warmup']:.1f} s{path}")
    for width in ("fp32", "int8", "int4"):
        native, eager, compiled = (results.get(f"laformer-{width}{step}") for step in ("", "-eager", "-compiled"))
        if eager and compiled:
            same = eager["greedy"] == compiled["greedy"] and eager["greedy8"] == compiled["greedy8"]
            print(f"{width} greedy outputs, eager vs compiled (batch 1 and 8): {'identical' if same else 'DIFFERENT'}")
        if native and (eager or compiled):
            other = eager or compiled
            rows = [native["greedy"], *native["greedy8"]], [other["greedy"], *other["greedy8"]]
            shared = sum(_shared_prefix(a, b) for a, b in zip(*rows))
            total = sum(len(a) for a in rows[0])
            print(f"{width} greedy outputs, native vs {'eager' if eager else 'compiled'}: {shared}/{total} tokens "
                  f"before the first difference, over the 9 rows{_NATIVE_NOTE if width != 'fp32' else ''}")
    eager = results.get("laformer-fp32")
    if eager:
        single_vs_batch = eager["greedy"] == eager["greedy8"][0]
        print(f"laformer fp32 greedy, batch 1 vs row 0 of batch 8: {'identical' if single_vs_batch else 'different'}")
        for mode in ("transformers-fp32", "llama.cpp", "laformer-int8", "laformer-int4"):
            if mode in results:
                same = sum(a == b for a, b in zip(eager["greedy"], results[mode]["greedy"]))
                print(f"greedy tokens shared with {mode}: {same}/{len(eager['greedy'])} (prefix agreement is what "
                      "matters; different kernels round differently)")


if __name__ == "__main__":
    main()
