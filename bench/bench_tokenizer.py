"""Tokenizer speed: laformer vs transformers, both loading the default model's GGUF, in the same run.

    python bench/bench_tokenizer.py [--texts 2000] [--repeat 3]

Times are the best of `--repeat` runs. Texts come from /work/shared/data (sst2 + ag_news) when present.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from laformer.formats.registry import DEFAULT_MODEL, resolve
from laformer.tokenizer import LaFormerTokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def load_texts(n: int) -> list[str]:
    texts = []
    for name in ("sst2", "ag_news"):
        path = DATA / name / "train.jsonl"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                texts += [json.loads(line)["text"] for _, line in zip(range(n // 2), f)]
    return texts or ["The quick brown fox jumps over the lazy dog. 我爱自然语言处理 😀"] * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import transformers

    path = resolve(DEFAULT_MODEL)
    texts = load_texts(args.texts)
    rows: list[tuple[str, float, float]] = []

    ours_load = best_of(args.repeat, lambda: LaFormerTokenizer.from_pretrained(path))
    theirs_load = best_of(1, lambda: transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    rows.append(("load from GGUF (s)", ours_load, theirs_load))
    ours = LaFormerTokenizer.from_pretrained(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    rows.append(("encode batch, lists (s)", best_of(args.repeat, lambda: ours(texts)),
                 best_of(args.repeat, lambda: theirs(texts))))
    kwargs = dict(padding=True, truncation=True, max_length=128, return_tensors="pt")
    rows.append(("encode batch, padded 'pt' (s)", best_of(args.repeat, lambda: ours(texts, **kwargs)),
                 best_of(args.repeat, lambda: theirs(texts, **kwargs))))
    rows.append(("encode one by one (s)", best_of(args.repeat, lambda: [ours.encode(t) for t in texts]),
                 best_of(args.repeat, lambda: [theirs.encode(t) for t in texts])))
    ids = ours(texts).input_ids
    rows.append(("decode one by one (s)", best_of(args.repeat, lambda: [ours.decode(i) for i in ids]),
                 best_of(args.repeat, lambda: [theirs.decode(i) for i in ids])))
    messages = [{"role": "user", "content": t} for t in texts[:200]]
    rows.append(("chat template x200 (s)",
                 best_of(args.repeat, lambda: [ours.apply_chat_template([m], add_generation_prompt=True, tokenize=False)
                                               for m in messages]),
                 best_of(args.repeat, lambda: [theirs.apply_chat_template([m], add_generation_prompt=True,
                                                                          tokenize=False) for m in messages])))
    stream_ids = [i for row in ids[:200] for i in row]

    def stream() -> None:
        decoder = ours.stream_decoder()
        for i in stream_ids:
            decoder.step(i)
        decoder.flush()

    rows.append((f"stream decode {len(stream_ids)} tokens (s)", best_of(args.repeat, stream), float("nan")))

    print(f"{len(texts)} texts, best of {args.repeat}; ratio = transformers / laformer (>1: laformer faster)")
    print(f"{'operation':34s} {'laformer':>10s} {'transformers':>13s} {'ratio':>7s}")
    for name, a, b in rows:
        print(f"{name:34s} {a:10.4f} {b:13.4f} {b / a:7.2f}")


if __name__ == "__main__":
    main()
