"""Run fuzz cases in a small pool of worker subprocesses, each case under a time and a memory limit.

Acceptable outcomes are "loads" and "LaFormerError"; an other exception, a memory error ("memory"), a case that
runs past the time limit ("hang") or a worker that dies ("crash") is a finding. A worker that hangs or dies is
replaced, so one bad case never hides the next.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import select
import shutil
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from fuzz.mutate import Case, make_case

ACCEPTABLE = ("loads", "LaFormerError")
OUTCOMES = ("loads", "LaFormerError", "exception", "memory", "hang", "crash")
_WORKER = Path(__file__).with_name("worker.py")


class Worker:
    """One worker subprocess; ``run`` sends it a case and waits at most ``timeout`` seconds for the outcome."""

    def __init__(self, seeds_file: Path, memory_mb: int, log: Path) -> None:
        src = Path(__file__).resolve().parents[2] / "src"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(_WORKER.parents[1])]),
               "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        self.log = log.open("ab")
        self.process = subprocess.Popen([sys.executable, str(_WORKER), str(seeds_file), str(memory_mb)], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        if self._read(600) != "ready":
            self.close()
            raise RuntimeError(f"fuzz worker failed to start; see {log}")

    def _read(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return None
        return self.process.stdout.readline().decode().strip()

    def run(self, case: Case, timeout: float) -> dict:
        try:
            self.process.stdin.write((json.dumps({"target": case.target, "path": case.path}) + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._read(timeout)
        if line is None:
            return {"outcome": "hang", "message": f"no answer within {timeout:.0f} s"}
        if not line:
            code = self.process.wait()
            return {"outcome": "crash", "message": f"worker exited with {code}"}
        return json.loads(line)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.alive:
            self.process.kill()
        self.process.wait()
        self.log.close()


@dataclasses.dataclass
class Report:
    results: list[tuple[Case, dict]]

    def counts(self) -> dict[str, Counter]:
        table: dict[str, Counter] = defaultdict(Counter)
        for case, outcome in self.results:
            table[case.category][outcome["outcome"]] += 1
        return dict(table)

    def findings(self) -> list[tuple[Case, dict]]:
        return [(c, o) for c, o in self.results if o["outcome"] not in ACCEPTABLE]

    def distinct_findings(self) -> dict[str, list[tuple[Case, dict]]]:
        """Findings grouped by (category, outcome, exception type, where it was raised)."""
        groups: dict[str, list[tuple[Case, dict]]] = defaultdict(list)
        for case, outcome in self.findings():
            key = f"{case.category}: {outcome['outcome']} {outcome.get('type', '')} at {outcome.get('where', '?')}"
            groups[key].append((case, outcome))
        return dict(groups)

    def table(self) -> str:
        lines = [f"{'category':<10}" + "".join(f"{o:>14}" for o in OUTCOMES) + f"{'total':>8}"]
        counts = self.counts()
        for category in sorted(counts):
            row = counts[category]
            lines.append(f"{category:<10}" + "".join(f"{row[o]:>14}" for o in OUTCOMES) + f"{sum(row.values()):>8}")
        total = Counter()
        for row in counts.values():
            total.update(row)
        lines.append(f"{'all':<10}" + "".join(f"{total[o]:>14}" for o in OUTCOMES) + f"{sum(total.values()):>8}")
        return "\n".join(lines)


def run_cases(indices: Iterable[int], campaign_seed: int, seeds: dict[str, Path], work: Path, workers: int = 2,
              timeout: float = 60.0, memory_mb: int = 1024, keep: Path | None = None) -> Report:
    """Make and run the cases ``indices`` of a campaign; a finding's input is copied under ``keep``."""
    work.mkdir(parents=True, exist_ok=True)
    seeds_file = work / "seeds.json"
    seeds_file.write_text(json.dumps({k: str(v) for k, v in seeds.items()}))
    todo: queue.Queue[int] = queue.Queue()
    for index in indices:
        todo.put(index)
    results: list[tuple[Case, dict]] = []
    lock = threading.Lock()

    def drain(slot: int) -> None:
        worker = Worker(seeds_file, memory_mb, work / f"worker-{slot}.log")
        try:
            while True:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                folder = work / "cases" / f"case-{index:06d}"  # only ever this folder is deleted
                case = make_case(index, campaign_seed, seeds, folder)
                outcome = worker.run(case, timeout)
                if not worker.alive or outcome["outcome"] in ("hang", "crash"):
                    worker.close()
                    worker = Worker(seeds_file, memory_mb, work / f"worker-{slot}.log")
                if keep is not None and outcome["outcome"] not in ACCEPTABLE and folder.is_dir():
                    shutil.copytree(folder, keep / folder.name, dirs_exist_ok=True)
                shutil.rmtree(folder, ignore_errors=True)
                with lock:
                    results.append((case, outcome))
        finally:
            worker.close()

    threads = [threading.Thread(target=drain, args=(slot,)) for slot in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Report(sorted(results, key=lambda r: r[0].index))
