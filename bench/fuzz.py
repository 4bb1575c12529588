"""Fuzz campaign over laformer's loaders: mutated GGUF files, Hugging Face folders, PEFT adapters and data files.

Every case runs in a worker subprocess under a time and a memory limit; the only acceptable outcomes are that the
input loads or that laformer refuses it with a ``LaFormerError``. Prints the outcome counts per category and each
distinct finding (with the numbers of the cases that reproduce it: ``--cases N --start I`` reruns from case I).

    python bench/fuzz.py --cases 2000                 # the full campaign (2 workers)
    python bench/fuzz.py --cases 1 --start 1234 -v    # replay one case
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # last: tests/peft must not hide peft
from fuzz.harness import run_cases  # noqa: E402  (the harness the CI sample uses too)
from fuzz.seeds import build_seeds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--start", type=int, default=0, help="number of the first case")
    parser.add_argument("--seed", type=int, default=17, help="campaign seed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a case may run")
    parser.add_argument("--memory-mb", type=int, default=1024, help="memory a case may allocate")
    parser.add_argument("--keep", type=Path, help="copy the inputs of findings into this folder")
    parser.add_argument("--json", type=Path, help="write every case and outcome here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seeds = build_seeds(Path(tmp) / "seeds")
        report = run_cases(range(opts.start, opts.start + opts.cases), opts.seed, seeds, Path(tmp) / "work",
                           opts.workers, opts.timeout, opts.memory_mb, opts.keep)
    if opts.verbose:
        for case, outcome in report.results:
            print(f"{case.index:>6} {case.category:<8} {outcome['outcome']:<14} {case.mutation}  "
                  f"{outcome.get('type', '')} {outcome.get('message', '')[:160]}")
    print(f"campaign seed {opts.seed}, cases {opts.start}..{opts.start + opts.cases - 1}, {opts.workers} workers, "
          f"{opts.timeout:.0f} s and {opts.memory_mb} MB per case\n")
    print(report.table())
    groups = report.distinct_findings()
    print(f"\n{len(groups)} distinct finding(s)")
    for key, cases in groups.items():
        first, outcome = cases[0]
        print(f"- {key}: {len(cases)} case(s), e.g. #{first.index} {first.mutation}: {outcome.get('message', '')[:200]}")
    if opts.json:
        opts.json.write_text(json.dumps([{"case": vars(c), "outcome": o} for c, o in report.results], indent=1))
    sys.exit(1 if groups else 0)


if __name__ == "__main__":
    main()
