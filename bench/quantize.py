"""Weight-only quantization: per-linear kernels, then whole-model decode speed and perplexity, in one run.

Part 1 times one SmolLM2-shaped linear (fp32 ``F.linear`` vs PyTorch's quantized kernels vs laformer's) at M = 1,
8 and 512 rows. Each timing cycles through enough weight copies to overflow the CPU caches, as a decode step
that touches every layer does ("laformer int8" rounds the activations to int8 at 512 rows, "w-only" keeps them
float). Part 2 loads the default model in fp32, int8 and int4 and reports batch-1 decode
tokens/s (the lean decode engine; per wall second and per CPU second of this process, the steadier measure on a
shared host) and perplexity on wikitext-2 test text. Ratios are against fp32 in this run.

    python bench/quantize.py [--threads 2] [--tokens 64] [--ppl-tokens 1024] [--skip-kernels] [--skip-model]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from laformer.quantization import WeightOnlyInt4Linear, WeightOnlyInt8Linear

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "longtext" / "wikitext2_test.raw.txt"
SHAPES = [(1536, 576, "gate/up 576->1536"), (576, 1536, "down 1536->576"), (49152, 576, "lm_head 576->49152")]


def timed_us(calls: list, budget: float = 0.6) -> float:
    """Median microseconds per call, cycling through ``calls`` (one per weight copy)."""
    for call in calls[:2]:
        call()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < budget or len(times) < 3:
        t = time.perf_counter()
        for call in calls:
            call()
        times.append((time.perf_counter() - t) / len(calls))
    return 1e6 * statistics.median(times)


def torch_kernels(weight: torch.Tensor, group: int) -> dict:
    """PyTorch's own quantized kernels for ``weight``, where this build has them (name -> callable(x))."""
    out = {}
    N, K = weight.shape
    try:
        scales = weight.abs().amax(1) / 127
        w8 = torch.round(weight / scales[:, None]).to(torch.int8)
        torch.ops.aten._weight_int8pack_mm(torch.randn(1, K), w8, scales)
        out["aten int8pack"] = lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, scales)
    except (RuntimeError, AttributeError):
        pass
    try:
        w = weight.view(N, K // group, group)
        low, high = w.amin(-1), w.amax(-1)
        s = ((high - low) / 15).clamp_min(1e-8)
        q = torch.round((w - low[..., None]) / s[..., None]).clamp(0, 15).to(torch.int32).view(N, K)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        zeros = low + 8 * s  # the kernel computes (q - 8) * scale + zero
        sz = torch.stack([s, zeros], -1).transpose(0, 1).contiguous()  # (K/group, N, 2)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.randn(1, K), packed, group, sz)
        out["aten int4pack"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    except (RuntimeError, AttributeError):
        pass
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        linear = nn.Linear(K, N, bias=False)
        linear.weight.data.copy_(weight)
        linear.qconfig = torch.ao.quantization.default_dynamic_qconfig
        dynamic = DynamicLinear.from_float(linear)
        out["fbgemm dyn int8"] = dynamic
    except (RuntimeError, AttributeError, AssertionError):
        pass
    return out


def kernel_table(copies_bytes: int = 96 << 20) -> None:
    print("\n## Per-linear kernels (us per call; ratio = fp32 / kernel, > 1 is faster)")
    print(f"{'shape':<20} {'M':>4} {'kernel':<16} {'us':>9} {'vs fp32':>8}")
    for N, K, label in SHAPES:
        copies = max(1, min(16, copies_bytes // (4 * N * K)))
        weights = [torch.randn(N, K) * 0.02 for _ in range(copies)]
        variants: dict[str, list] = {"fp32 F.linear": [lambda x, w=w: F.linear(x, w) for w in weights]}
        for w in weights:
            linear = nn.Linear(K, N, bias=False)
            linear.weight.data.copy_(w)
            variants.setdefault("laformer int8", []).append(WeightOnlyInt8Linear.from_float(linear))
            weight_only = WeightOnlyInt8Linear.from_float(linear)
            weight_only.int8_activations = False  # float activations at every M
            variants.setdefault("laformer int8 w-only", []).append(weight_only)
            variants.setdefault("laformer int4 g64", []).append(WeightOnlyInt4Linear.from_float(linear, 64))
            for name, fn in torch_kernels(w, 64).items():
                variants.setdefault(name, []).append(fn)
        for M in (1, 8, 512):
            x = torch.randn(M, K)
            budget = 0.3 if M < 512 else 1.0
            base = None
            with torch.inference_mode():
                for name, fns in variants.items():
                    fns = fns if M < 512 or N * K < 1e7 else fns[:1]
                    us = timed_us([lambda f=f: f(x) for f in fns], budget)
                    base = base or us
                    print(f"{label:<20} {M:>4} {name:<16} {us:>9.0f} {base / us:>7.2f}x")


def decode_tokens_per_s(model, tokens: int) -> tuple[float, float]:
    """Tokens per wall-clock second and per CPU second of this process (the latter is steadier on a busy host)."""
    from laformer.inference.engine import DecodeEngine

    engine = DecodeEngine(copy.deepcopy(model))  # fuses q/k/v and gate/up (float or quantized) in its copy
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253]])
    logits = engine.prefill(prompt, max_new_tokens=tokens + 1)
    token = logits.argmax(-1)
    for _ in range(4):  # warm-up
        token = engine.decode(token).argmax(-1)
    engine.prefill(prompt, max_new_tokens=tokens + 1)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(tokens):
        token = engine.decode(token).argmax(-1)
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)


def model_table(tokens: int, ppl_tokens: int) -> None:
    from laformer import LaFormerForCausalLM
    from laformer.formats.gguf import read_gguf_tensors
    from laformer.formats.registry import DEFAULT_MODEL, resolve
    from laformer.prune import perplexity
    from laformer.quantization import quantize_model
    from laformer.tokenizer import LaFormerTokenizer

    fp32 = LaFormerForCausalLM.from_pretrained(DEFAULT_MODEL)
    tokenizer = LaFormerTokenizer.from_pretrained(DEFAULT_MODEL)
    ids = torch.tensor(tokenizer.encode(WIKITEXT.read_text()[: ppl_tokens * 8]))[:ppl_tokens]
    raw = read_gguf_tensors(resolve(DEFAULT_MODEL))
    variants = {
        "fp32": lambda: fp32,
        "int8 (per channel)": lambda: quantize_model(copy.deepcopy(fp32), "int8"),
        "int4 (GGUF Q4_1 direct)": lambda: quantize_model(copy.deepcopy(fp32), "int4", gguf_tensors=raw),
        "int4 g32 from float": lambda: quantize_model(copy.deepcopy(fp32), "int4", 32),
        "int4 g64 from float": lambda: quantize_model(copy.deepcopy(fp32), "int4", 64),
    }
    print(f"\n## Default model: batch-1 decode and perplexity ({ids.numel()} wikitext-2 tokens)")
    print(f"{'weights':<24} {'tok/s':>7} {'tok/cpu-s':>9} {'vs fp32':>8} {'ppl':>8} {'vs fp32':>8}")
    base_speed = base_ppl = None
    for name, build in variants.items():
        model = build()
        speed, cpu_speed = decode_tokens_per_s(model, tokens)
        ppl = perplexity(model, ids)
        base_speed, base_ppl = base_speed or cpu_speed, base_ppl or ppl
        print(f"{name:<24} {speed:>7.1f} {cpu_speed:>9.1f} {cpu_speed / base_speed:>7.2f}x {ppl:>8.3f} "
              f"{100 * (ppl / base_ppl - 1):>+7.2f}%", flush=True)
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed per model")
    parser.add_argument("--ppl-tokens", type=int, default=1024, help="wikitext-2 tokens for perplexity")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU capability {capability}")
    if not args.skip_kernels:
        kernel_table()
    if not args.skip_model:
        model_table(args.tokens, args.ppl_tokens)


if __name__ == "__main__":
    main()
