"""Generation and embedding speed: laformer vs transformers on the default model, in the same run.

    python bench/bench_generation.py [--new-tokens 32] [--repeat 3] [--threads 2]

Both sides run the same float32 weights: laformer's GGUF load, written once as a Hugging Face folder (laformer's own
``save_pretrained``) for transformers. Greedy decoding, KV cache on both sides; the runs alternate and the best of
``--repeat`` counts, so a busy machine hurts both alike. Also checks that the greedy tokens agree.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from laformer import DEFAULT_MODEL, LaFormerForCausalLM
from laformer.embeddings import encode
from laformer.generation import generate
from laformer.tokenizer import LaFormerTokenizer

PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Explain in one paragraph why the sky is blue.",
    "List three uses of a paperclip.",
]


def best_of(repeat: int, runs: dict[str, callable]) -> dict[str, float]:
    """Alternate the contenders ``repeat`` times; each one's fastest time in seconds."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@torch.no_grad()
def hf_encode(model, tokenizer, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """The same mean pooling written against transformers (tokenizing included, as in laformer's ``encode``)."""
    pooled = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start: start + batch_size], return_tensors="pt", padding=True)
        hidden = model.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.nn.functional.normalize(torch.cat(pooled), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    model = LaFormerForCausalLM.from_pretrained(DEFAULT_MODEL)
    tokenizer = LaFormerTokenizer.from_pretrained(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf_tokenizer.padding_side = "left"
    hf_model.generation_config.eos_token_id = None  # both sides generate exactly --new-tokens tokens
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in PROMPTS]
    n = args.new_tokens
    hf_options = dict(max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    rows = []
    for batch_size in (1, 4):
        batch = tokenizer(texts[:batch_size], return_tensors="pt", padding=True, padding_side="left")
        hf_batch = hf_tokenizer(texts[:batch_size], return_tensors="pt", padding=True)
        ours = generate(model, batch.input_ids, batch.attention_mask, max_new_tokens=n, eos_token_id=[])
        with torch.no_grad():
            theirs = hf_model.generate(**hf_batch, **hf_options)
        same = torch.equal(ours, theirs)
        times = best_of(args.repeat, {
            "laformer": lambda: generate(model, batch.input_ids, batch.attention_mask, max_new_tokens=n,
                                         eos_token_id=[]),
            "transformers": lambda: hf_model.generate(**hf_batch, **hf_options),
        })
        rows.append((f"generate b={batch_size}, {n} new tokens", batch_size * n / times["laformer"],
                     batch_size * n / times["transformers"], "tok/s", same))

    sentences = [f"{p} This is sentence number {i}." for i, p in enumerate(PROMPTS * 8)]
    ours, theirs = encode(model, tokenizer, sentences), hf_encode(hf_model, hf_tokenizer, sentences)
    times = best_of(args.repeat, {
        "laformer": lambda: encode(model, tokenizer, sentences),
        "transformers": lambda: hf_encode(hf_model, hf_tokenizer, sentences),
    })
    close = torch.allclose(ours, theirs, atol=1e-4)
    rows.append((f"embed {len(sentences)} sentences", len(sentences) / times["laformer"],
                 len(sentences) / times["transformers"], "sent/s", close))

    print(f"threads={args.threads}, best of {args.repeat}, float32, {DEFAULT_MODEL}")
    print(f"{'task':<34}{'laformer':>12}{'transformers':>14}{'ratio':>8}  {'unit':<7}{'same result':>12}")
    for task, ours_rate, theirs_rate, unit, same in rows:
        print(f"{task:<34}{ours_rate:>12.1f}{theirs_rate:>14.1f}{ours_rate / theirs_rate:>8.2f}  {unit:<7}"
              f"{str(same):>12}")


if __name__ == "__main__":
    main()
