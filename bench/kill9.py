"""kill -9 campaign: SIGKILL a real tiny-model training run at random points, resume, compare with an uninterrupted run.

Each trial kills the run ``--kills`` times (at a random step, at a random instant within it), resumes it from its
newest usable checkpoint each time, lets it finish, and checks that the final weights equal the uninterrupted
run's bit for bit and that no kill cost more than one checkpoint interval of optimiser steps.

    python bench/kill9.py --trials 10
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # last: tests/peft must not hide peft
from training import kill9  # noqa: E402  (the trial driver the CI test uses too)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="kills per trial before the run may finish")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--start", type=int, default=0, help="number of the first trial (trial n uses seed + n)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        expected = kill9.run_to_end(Path(tmp) / "reference")
        print(f"{'trial':>5} | {'kills (last step done -> resumed from)':<40} | {'steps lost':>10} | identical")
        passed = 0
        for n in range(opts.start, opts.start + opts.trials):
            result = kill9.trial(Path(tmp) / f"trial-{n}", expected, random.Random(opts.seed + n), opts.kills)
            ok = result.identical and result.max_lost <= kill9.SAVE_STEPS
            passed += ok
            kills = ", ".join(f"{done}->{restart}" for done, restart in result.kills)
            print(f"{n:>5} | {kills:<40} | {result.max_lost:>10} | {result.identical}", flush=True)
    print(f"{passed}/{opts.trials} trials resumed to identical weights losing <= {kill9.SAVE_STEPS} steps "
          f"(checkpoint every {kill9.SAVE_STEPS} of {kill9.MAX_STEPS} steps)")
    sys.exit(0 if passed == opts.trials else 1)


if __name__ == "__main__":
    main()
