"""Serving benchmark: `laformer serve` against llama-cpp-python's server on the same GGUF, driven by the openai client.

    python bench/serve.py            # 32 streaming chats of up to 48 tokens, 8 malformed requests mixed in
    python bench/serve.py --quick    # 8 chats of up to 16 tokens, 4 malformed requests

Both servers run as a user starts them (``laformer serve MODEL``, ``python -m llama_cpp.server --model GGUF``) on
loopback, with the same thread count and ``OMP_WAIT_POLICY=PASSIVE`` (a shared machine), both up for the whole run.
Each server gets the chats all at once (malformed requests mixed in) and the same chats one at a time; the phases
alternate between the servers. Greedy decoding, the model's chat template, ``stream=True``.

Columns: completion tokens per second over the phase's wall time (all streams together), p50/p95 time to first
token, the ratio of tokens/s to the same server one request at a time and to llama-cpp-python's server in the same
mode, streams completed, 5xx replies, malformed requests answered with a 4xx, and the server's peak RSS.
llama-cpp-python's server runs one request at a time (``--interrupt_requests False`` makes it queue them instead
of cutting the running stream off); laformer's shares decode steps between the requests (continuous batching).
Needs ``pip install "laformer[serve]" openai llama-cpp-python[server]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import psutil

TOPICS = ["the moon", "volcanoes", "honey bees", "the Roman empire", "coffee", "glaciers", "octopuses", "jazz",
          "electricity", "the Sahara", "chess", "penguins", "photosynthesis", "the printing press", "tea", "comets",
          "rainbows", "sharks", "the Nile", "bread", "gravity", "owls", "the Eiffel tower", "tides", "bamboo",
          "lightning", "whales", "the piano", "deserts", "mushrooms", "the internet", "marathons"]
REQUEST_TIMEOUT_S = 300
START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(name: str, command: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited while starting: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{name} did not answer within {START_TIMEOUT_S} s")


def malformed(model: str) -> list[tuple[str, bytes]]:
    """Requests every OpenAI server must refuse with a 4xx while it goes on serving the others."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bodies = [b'{"model": "' + model.encode() + b'", "messages": [', json.dumps({**chat, "max_tokens": 0}).encode(),
              json.dumps({**chat, "messages": "hi"}).encode(), json.dumps({**chat, "temperature": "hot"}).encode(),
              json.dumps({**chat, "messages": [{"role": "user", "content": "word " * 5000}]}).encode(),
              json.dumps({**chat, "messages": []}).encode(), json.dumps({**chat, "n": "two"}).encode(),
              json.dumps({"model": model, "prompt": "x", "max_tokens": -1}).encode()]
    return [("/v1/completions" if b'"prompt"' in body else "/v1/chat/completions", body) for body in bodies]


async def stream_chat(client, model: str, topic: str, max_tokens: int) -> dict:
    """One streamed greedy chat: time to first token, tokens, whether it finished."""
    start = time.perf_counter()
    first, chunks, finished, usage = None, 0, False, None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Tell me one fact about {topic}."}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        if chunk.choices[0].delta.content:
            chunks += 1
            first = first or time.perf_counter() - start
        finished = finished or chunk.choices[0].finish_reason is not None
    return {"ttft": first if first is not None else time.perf_counter() - start, "tokens": usage or chunks,
            "finished": finished}


async def bad_request(http: httpx.AsyncClient, base: str, path: str, body: bytes, delay: float) -> int:
    await asyncio.sleep(delay)
    reply = await http.post(base + path, content=body, headers={"content-type": "application/json"})
    return reply.status_code


async def phase(base: str, model: str, topics: list[str], max_tokens: int, concurrent: bool, bad: int,
                pid: int) -> dict:
    """All chats at once (with ``bad`` malformed requests spread among them) or one after another."""
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    process, peak = psutil.Process(pid), [0]
    done = asyncio.Event()

    async def watch_memory() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_memory())
    statuses: list[int] = []
    start = time.perf_counter()
    try:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as http:
            if concurrent:
                chats = [stream_chat(client, model, topic, max_tokens) for topic in topics]
                refusals = [bad_request(http, base, path, body, 0.05 * i)
                            for i, (path, body) in enumerate(malformed(model)[:bad])]
                results = await asyncio.gather(*chats, *refusals, return_exceptions=True)
                streams, statuses = results[: len(chats)], results[len(chats):]
            else:
                streams = []
                for topic in topics:
                    try:
                        streams.append(await stream_chat(client, model, topic, max_tokens))
                    except Exception as exc:  # noqa: BLE001 - a failed stream is counted, not fatal
                        streams.append(exc)
    finally:
        wall = time.perf_counter() - start
        done.set()
        await watcher
        await client.close()
    ok = [s for s in streams if isinstance(s, dict)]
    ttfts = sorted(s["ttft"] for s in ok)
    server_errors = sum(isinstance(s, openai.InternalServerError) for s in streams)
    server_errors += sum(isinstance(s, int) and s >= 500 for s in statuses)
    return {"tokens_per_s": sum(s["tokens"] for s in ok) / wall, "ttft_p50": _quantile(ttfts, 0.5),
            "ttft_p95": _quantile(ttfts, 0.95), "complete": sum(s["finished"] for s in ok), "streams": len(topics),
            "server_errors": server_errors, "refused": sum(isinstance(s, int) and 400 <= s < 500 for s in statuses),
            "bad": len(statuses), "peak_rss_mb": peak[0] / 2**20, "wall_s": wall,
            "stream_failures": [repr(s)[:200] for s in streams if not isinstance(s, dict)]}


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 chats of 16 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--laformer-args", default="", help="extra `laformer serve` options, e.g. '--quantize int8'")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    from laformer.formats.registry import DEFAULT_MODEL, resolve

    gguf = str(resolve(DEFAULT_MODEL))
    topics, max_tokens, bad = (TOPICS[:8], 16, 4) if args.quick else (TOPICS, 48, 8)
    model = "smollm2"
    servers = {}
    port = free_port()
    servers["laformer serve"] = (port, start("laformer serve", [
        sys.executable, "-m", "laformer", "serve", DEFAULT_MODEL, "--port", str(port), "--model-name", model,
        "--threads", str(args.threads), "--log-level", "warning", *args.laformer_args.split()], port))
    try:
        if not args.skip_llama_cpp:
            port = free_port()
            servers["llama-cpp-python"] = (port, start("llama-cpp-python", [
                sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", model, "--port",
                str(port), "--n_ctx", "2048", "--n_threads", str(args.threads), "--interrupt_requests", "False",
                "--verbose", "False"], port))
        results = {}
        for concurrent in (True, False):  # interleaved: each mode runs on every server before the next mode
            for name, (port, process) in servers.items():
                mode = f"{len(topics)} at once" if concurrent else "one at a time"
                print(f"running {name}: {mode} ...", file=sys.stderr, flush=True)
                results[(name, mode)] = asyncio.run(phase(f"http://127.0.0.1:{port}", model, topics, max_tokens,
                                                          concurrent, bad if concurrent else 0, process.pid))
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(timeout=30)
    report(results, args, len(topics), max_tokens)


def report(results: dict, args: argparse.Namespace, chats: int, max_tokens: int) -> None:
    print(f"\n{chats} streaming greedy chats (max_tokens {max_tokens}), {args.threads} threads, "
          f"OMP_WAIT_POLICY=PASSIVE, laformer options: {args.laformer_args or '(defaults)'}\n")
    header = ("server", "mode", "tok/s", "vs 1-at-a-time", "vs llama-cpp", "TTFT p50 s", "TTFT p95 s", "complete",
              "5xx", "bad->4xx", "peak RSS MB")
    rows = []
    for (name, mode), r in results.items():
        alone = results.get((name, "one at a time"))
        peer = results.get(("llama-cpp-python", mode))
        rows.append((name, mode, f"{r['tokens_per_s']:.1f}",
                     f"{r['tokens_per_s'] / alone['tokens_per_s']:.2f}x" if alone else "-",
                     f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "-",
                     f"{r['ttft_p50']:.2f}", f"{r['ttft_p95']:.2f}", f"{r['complete']}/{r['streams']}",
                     str(r["server_errors"]), f"{r['refused']}/{r['bad']}" if r["bad"] else "-",
                     f"{r['peak_rss_mb']:.0f}"))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
    failures = [f for r in results.values() for f in r["stream_failures"]]
    if failures:
        print("\nfailed streams:", *failures[:5], sep="\n  ")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({f"{name} / {mode}": r for (name, mode), r in results.items()}, f, indent=2)


if __name__ == "__main__":
    main()
