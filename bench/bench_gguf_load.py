"""GGUF load time and peak memory: laformer vs the gguf package's numpy path vs transformers, in the same run.

Each contender runs in a fresh process (so peak RSS, ``ru_maxrss``, is its own), timing the load after imports.
Prints seconds, peak RSS, and ratios against laformer's float32 load (> 1 means laformer is faster / smaller).

    python bench/bench_gguf_load.py [--repeat 2] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from laformer.formats.registry import DEFAULT_MODEL, resolve

SETUP = """
import json, resource, sys, time
import torch
path = sys.argv[1]
"""
CONTENDERS = {
    "laformer fp32": """
from laformer import LaFormerForCausalLM
start = time.perf_counter()
LaFormerForCausalLM.from_pretrained(path)
""",
    "laformer fp32 + tokenizer": """
from laformer import LaFormerForCausalLM
from laformer.tokenizer import LaFormerTokenizer
start = time.perf_counter()
LaFormerForCausalLM.from_pretrained(path)
LaFormerTokenizer.from_pretrained(path)
""",
    "laformer bf16": """
from laformer import LaFormerForCausalLM
start = time.perf_counter()
LaFormerForCausalLM.from_pretrained(path, dtype="bfloat16")
""",
    "gguf-py reader + numpy dequantize": """
import gguf
start = time.perf_counter()
reader = gguf.GGUFReader(path)
weights = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
""",
    "transformers (gguf_file=)": """
import os, transformers
start = time.perf_counter()
transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32)
""",
}
REPORT = """
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(code: str, path: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", SETUP + code + REPORT, path], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2, help="fresh processes per contender; the best time is kept")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out transformers (~40 s per load)")
    args = parser.parse_args()
    path = str(resolve(DEFAULT_MODEL))
    names = [n for n in CONTENDERS if not (args.skip_transformers and n.startswith("transformers"))]
    results = {}
    for name in names:
        runs = [run(CONTENDERS[name], path) for _ in range(args.repeat)]
        results[name] = {"seconds": min(r["seconds"] for r in runs), "peak_mb": max(r["peak_mb"] for r in runs)}
    base = results["laformer fp32"]
    print(f"{DEFAULT_MODEL} ({path.rsplit('/', 1)[-1]}), best of {args.repeat} fresh processes")
    print(f"{'contender':36} {'load s':>8} {'peak MiB':>9} {'time / laformer':>16} {'RSS / laformer':>15}")
    for name, r in results.items():
        print(f"{name:36} {r['seconds']:8.2f} {r['peak_mb']:9.0f} {r['seconds'] / base['seconds']:16.2f} "
              f"{r['peak_mb'] / base['peak_mb']:15.2f}")


if __name__ == "__main__":
    main()
