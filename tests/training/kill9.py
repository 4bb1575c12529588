"""kill -9 trials: a real training run (a subprocess) is SIGKILLed at random points, resumed, and compared.

Run as a script, it is that training run: ``python kill9.py OUT_DIR [--resume]`` trains the tiny classifier,
prints ``step N`` after each optimiser step and writes the final trainable weights to ``OUT_DIR/final.safetensors``.
``trial`` drives it; ``bench/kill9.py`` runs the 10-trial campaign, the test a few.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_STEPS, SAVE_STEPS = 12, 3
FINAL = "final.safetensors"
_TESTS = Path(__file__).resolve().parents[1]


def train(out_dir: Path, resume: bool) -> None:
    if str(_TESTS) not in sys.path:  # at the end: at the front, tests/peft would hide Hugging Face's peft
        sys.path.append(str(_TESTS))
    from tiny import sentiment_examples, tiny_classifier, tiny_tokenizer
    from safetensors.torch import save_file

    from laformer.training import ClassificationDataset, Trainer, TrainingArguments, build_label_map

    torch.set_num_threads(1)
    texts, labels = sentiment_examples(24)
    label2id = build_label_map(labels)
    dataset = ClassificationDataset(texts, [label2id[y] for y in labels], tiny_tokenizer(), max_length=16)
    args = TrainingArguments(output_dir=str(out_dir), learning_rate=3e-3, max_steps=MAX_STEPS, batch_size=4,
                             save_steps=SAVE_STEPS, save_total_limit=2, dropout=0.1, lr_scheduler="cosine",
                             warmup_steps=2, progress_bar=False, report_to=[], logging_steps=100)

    class Announce:
        def on_step_end(self, step: int) -> None:
            print(f"step {step}", flush=True)

    model = tiny_classifier(seed=1)
    Trainer(model, args, dataset, hooks=Announce()).train(resume_from=resume or None)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              str(out_dir / FINAL))


def _command(out_dir: Path, resume: bool) -> list[str]:
    return [sys.executable, __file__, str(out_dir)] + (["--resume"] if resume else [])


def _env() -> dict[str, str]:
    import laformer

    src = str(Path(laformer.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(_TESTS)]), "OMP_WAIT_POLICY": "PASSIVE"}


def run_to_end(out_dir: Path, resume: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    done = subprocess.run(_command(out_dir, resume), env=_env(), capture_output=True, text=True,
                          timeout=1200)  # a hang guard: seconds-long runs take minutes on a loaded machine
    if done.returncode:
        raise RuntimeError(f"training run failed:\n{done.stderr[-3000:]}")
    return load_file(str(out_dir / FINAL))


def run_and_kill(out_dir: Path, resume: bool, kill_after: int, delay: float) -> int:
    """Start a run, SIGKILL it ``delay`` s after it reports step ``kill_after``; the last step it reported."""
    child = subprocess.Popen(_command(out_dir, resume), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    last = 0
    for line in child.stdout:
        last = _reported_step(line, last)
        if last >= kill_after:
            break
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    for line in child.stdout:  # what it printed before it died, still in the pipe
        last = _reported_step(line, last)
    child.stdout.close()
    return last


def _reported_step(line: str, last: int) -> int:
    return int(line.split()[1]) if line.startswith("step ") else last


def resume_step(out_dir: Path) -> int:
    """The step a resume would restart from (0: none to resume from)."""
    from laformer.errors import TrainingError
    from laformer.training.checkpoint import load_latest_checkpoint

    try:
        return load_latest_checkpoint(out_dir / "checkpoints")[2]["step"]
    except TrainingError:
        return 0


@dataclass
class Trial:
    kills: list[tuple[int, int]]  # (last step the killed run finished, step the resume restarted from)
    identical: bool
    max_lost: int  # optimiser steps redone after a kill, at most


def trial(out_dir: Path, expected: dict[str, torch.Tensor], rng: random.Random, kills: int = 2) -> Trial:
    """Kill a run ``kills`` times at random steps (and random instants within them), then let it finish."""
    record, resume = [], False
    for _ in range(kills):
        reported = run_and_kill(out_dir, resume, rng.randint(1, MAX_STEPS - 1), rng.uniform(0, 0.05))
        restart = resume_step(out_dir)
        record.append((reported, restart))
        resume = restart > 0
    final = run_to_end(out_dir, resume)
    identical = set(final) == set(expected) and all(torch.equal(final[k], expected[k]) for k in expected)
    return Trial(record, identical, max(reported - restart for reported, restart in record))


if __name__ == "__main__":
    train(Path(sys.argv[1]), "--resume" in sys.argv[2:])
