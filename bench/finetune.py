"""LoRA fine-tuning: laformer against transformers + peft on the same model, data, shape and hyperparameters.

Every measurement runs in its own subprocess (so peak RSS is per side) within one invocation, sides
interleaved, and the table prints ratios. Three comparisons:

1. padded: identical (8, 128) batches of SST-2 padded to 128 tokens, LoRA r=8 on q_proj/v_proj, AdamW;
   training tokens/s, peak RSS, and validation accuracy after the same number of steps. Right padding to a
   fixed 128 is the usual tutorial pipeline (laformer's classifier skips the all-padding tail of such a
   batch, exactly); left padding makes both sides compute all 128 columns (pure compute comparison).
2. pass: one training pass over the same 2,000 SST-2 examples with each side's best data handling:
   laformer's Trainer (dynamic padding, length buckets) against a loop that pads every text to 128 tokens,
   DataLoader(shuffle=True), AdamW, with transformers + peft. The padded loop's steps all have the same
   shape, so it is timed over ``--pass-probe`` steps and scaled to the full pass (said so in the table).

3. ``--task classification --dataset NAME``: the recipe. ``laformer finetune --task classification`` at its
   defaults (or ``--sides laformer:best`` ...) against transformers + peft (LoRA r=8 alpha 16 on q/v, AdamW lr 3e-4,
   batch 16, linear decay: transformers.Trainer's defaults, dynamic padding to 128 tokens at most), the same number of
   epochs, on the same training subset. laformer selects its checkpoint on a dev slice of the *train* split
   (disjoint from the training subset); both sides are scored on the same validation subset: accuracy and
   macro-F1, wall time (load, train, score) and peak RSS. ``--concurrent`` runs the sides at the same time, so
   both see the same load on a shared machine.

    python bench/finetune.py --task classification --dataset sst2 --train-examples 800 --eval 400
    python bench/finetune.py                 # ~15 minutes on 2 cores
    python bench/finetune.py --steps 8 --eval 128 --pass-examples 400 --pass-probe 4   # a quick look
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

import torch

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = DATA_ROOT / "sst2"
DATASETS = ("sst2", "financial_phrasebank", "chnsenticorp", "banking77", "ag_news")
BATCH, LENGTH, LR, RANK, ALPHA = 8, 128, 1e-3, 8, 16
LABELS = ["negative", "positive"]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def read_split(name: str, limit: int, seed: int = 0) -> tuple[list[str], list[int]]:
    import random

    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").open()]
    random.Random(seed).shuffle(rows)
    rows = rows[:limit]
    return [r["text"] for r in rows], [LABELS.index(r["label"]) for r in rows]


def padded_batches(folder: str, texts: list[str], labels: list[int], side: str) -> list[dict[str, torch.Tensor]]:
    """The fixed-shape pipeline: every text padded (or cut) to 128 tokens on ``side``, batches of 8 in file order."""
    from laformer.tokenizer import LaFormerTokenizer

    tokenizer = LaFormerTokenizer.from_pretrained(folder)
    batches = []
    for start in range(0, len(texts) - BATCH + 1, BATCH):
        enc = tokenizer(texts[start : start + BATCH], return_tensors="pt", padding="max_length", truncation=True,
                        max_length=LENGTH, padding_side=side)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                        "labels": torch.tensor(labels[start : start + BATCH])})
    return batches


# -- the two sides ---------------------------------------------------------------------------------------

def load_laformer(folder: str):
    from laformer import LaFormerForSequenceClassification
    from laformer.peft import load_adapter

    model = LaFormerForSequenceClassification.from_pretrained(folder, id2label=dict(enumerate(LABELS)), pad_token_id=2)
    return load_adapter(model, Path(folder) / "initial_adapter")


def load_transformers(folder: str):
    import peft
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = 2
    return peft.PeftModel.from_pretrained(model, str(Path(folder) / "initial_adapter"), is_trainable=True)


def train_steps(model, batches, limit: int | None = None) -> tuple[float, int]:
    """Train on ``batches``; the seconds and number of the timed steps (all but the first, a warm-up; at most
    ``limit`` of them)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    start, timed = None, 0
    for i, batch in enumerate(batches):
        if i == 1:
            start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timed += i >= 1
        if timed == limit:
            break
    return time.perf_counter() - start, timed


@torch.no_grad()
def accuracy(model, folder: str, texts: list[str], labels: list[int]) -> float:
    from laformer.tokenizer import LaFormerTokenizer

    tokenizer = LaFormerTokenizer.from_pretrained(folder)
    model.eval()
    correct = 0
    for start in range(0, len(texts), 16):
        enc = tokenizer(texts[start : start + 16], return_tensors="pt", padding=True)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        correct += int((logits.argmax(-1) == torch.tensor(labels[start : start + 16])).sum())
    return correct / len(texts)


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = load_laformer if args.side == "laformer" else load_transformers
    if args.mode in ("right", "left"):
        texts, labels = read_split("train", (args.steps + 1) * BATCH, seed=1)
        batches = padded_batches(args.folder, texts, labels, args.mode)
        model = load(args.folder)
        seconds, _ = train_steps(model, batches)
        measured = batches[1:]
        val_texts, val_labels = read_split("validation", args.eval)
        return {"seconds": seconds, "steps": len(measured),
                "padded_tokens_per_s": sum(b["input_ids"].numel() for b in measured) / seconds,
                "real_tokens_per_s": sum(int(b["attention_mask"].sum()) for b in measured) / seconds,
                "peak_rss_gb": peak_rss_gb(),
                "val_accuracy": accuracy(model, args.folder, val_texts, val_labels) if args.mode == "right" else None}
    texts, labels = read_split("train", args.pass_examples, seed=2)
    if args.side == "laformer":
        return laformer_pass(args, texts, labels)
    return padded_pass(args, texts, labels)


def laformer_pass(args, texts, labels) -> dict:
    from laformer.tokenizer import LaFormerTokenizer
    from laformer.training import ClassificationDataset, Trainer, TrainingArguments

    model = load_laformer(args.folder)
    tokenizer = LaFormerTokenizer.from_pretrained(args.folder)
    start = time.perf_counter()
    dataset = ClassificationDataset(texts, labels, tokenizer, max_length=LENGTH)
    with tempfile.TemporaryDirectory() as out:
        run = TrainingArguments(output_dir=out, learning_rate=LR, num_epochs=1, batch_size=BATCH, max_grad_norm=None,
                                lr_scheduler="constant", bucket_by_length=True, report_to=[], progress_bar=False)
        Trainer(model, run, dataset).train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extrapolated": False, "steps": -(-len(texts) // BATCH), "peak_rss_gb": peak_rss_gb()}


def padded_pass(args, texts, labels) -> dict:
    """The tutorial loop: a Dataset padding each text to 128 tokens, DataLoader(shuffle=True), AdamW, no schedule."""
    from torch.utils.data import DataLoader, Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.folder)

    class TextClassificationDataset(Dataset):
        def __len__(self):
            return len(texts)

        def __getitem__(self, i):
            enc = tokenizer(texts[i], return_tensors="pt", max_length=LENGTH, padding="max_length", truncation=True)
            return {"input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0],
                    "labels": torch.tensor(labels[i])}

    model = load_transformers(args.folder)
    loader = DataLoader(TextClassificationDataset(), batch_size=BATCH, shuffle=True)
    seconds, timed = train_steps(model, loader, args.pass_probe)
    total_steps = len(loader)
    per_step = seconds / timed
    return {"seconds": per_step * total_steps, "extrapolated": True, "steps": total_steps,
            "probe_steps": timed, "peak_rss_gb": peak_rss_gb()}


# -- the recipe comparison (--task classification) -------------------------------------------------------

PEER_EPOCHS_FROM = "default"


def dataset_subsets(args: argparse.Namespace, folder: Path) -> list[str]:
    """Train / dev / validation subsets of ``args.dataset`` (shuffled with seed 0) as JSONL files; the label names."""
    import random

    def rows(split: str) -> list[dict]:
        found = [json.loads(line) for line in (DATA_ROOT / args.dataset / f"{split}.jsonl").open()]
        random.Random(0).shuffle(found)
        return found

    train = rows("train")
    subsets = {"train": train[: args.train_examples], "dev": train[args.train_examples : args.train_examples + args.dev],
               "validation": rows("validation")[: args.eval]}
    for name, part in subsets.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    return sorted({r["label"] for r in train})


def laformer_recipe(args: argparse.Namespace) -> dict:
    """``laformer finetune`` as a user types it (preset, nothing else), then its folder scored on validation."""
    from laformer.cli import main as cli
    from laformer.tasks import evaluate_classifier, load_finetuned

    data, preset = Path(args.folder), args.side.partition(":")[2] or "default"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        command = ["finetune", "--task", "classification", "--model", str(data / "model"),
                   "--train", str(data / "train.jsonl"), "--validation", str(data / "dev.jsonl"), "--output", out,
                   "--preset", preset, "--no-progress", "--report-to", "--threads", str(args.threads),
                   *args.laformer_args.split()]
        if cli(command):
            raise SystemExit("laformer finetune failed")
        meta_metrics = json.loads((Path(out) / "metrics.json").read_text())
        model, tokenizer, meta = load_finetuned(out)
        scores = evaluate_classifier(model, tokenizer, data / "validation.jsonl", max_length=meta["max_length"])
    return {"seconds": time.perf_counter() - start, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
            "epochs": meta_metrics["epoch"], "steps": meta_metrics["step"], "stopped_early": meta_metrics["stopped_early"],
            "max_length": meta["max_length"], "peak_rss_gb": peak_rss_gb()}


def peer_recipe(args: argparse.Namespace, labels: list[str]) -> dict:
    """transformers + peft as its documentation shows it: LoRA r=8 q/v, AdamW 3e-4, linear decay, batch 16."""
    import peft
    from sklearn.metrics import accuracy_score, f1_score
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
    from transformers import get_linear_schedule_with_warmup

    data = Path(args.folder)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(data / "model")
    tokenizer.pad_token_id = 2

    def encoded(split: str) -> list[dict]:
        rows = [json.loads(line) for line in (data / f"{split}.jsonl").open()]
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=LENGTH)
        return [{"input_ids": ids, "labels": labels.index(r["label"])} for ids, r in zip(enc["input_ids"], rows)]

    model = AutoModelForSequenceClassification.from_pretrained(data / "model", num_labels=len(labels), dtype=torch.float32)
    model.config.pad_token_id = 2
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA,
                                                       target_modules=["q_proj", "v_proj"]))
    collate = DataCollatorWithPadding(tokenizer)
    loader = DataLoader(encoded("train"), batch_size=16, shuffle=True, collate_fn=collate)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    epochs = math.ceil(args.epochs)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    preds, truth = [], []
    with torch.no_grad():
        for batch in DataLoader(encoded("validation"), batch_size=32, collate_fn=collate):
            preds += model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1).tolist()
            truth += batch["labels"].tolist()
    return {"seconds": time.perf_counter() - start, "accuracy": float(accuracy_score(truth, preds)),
            "macro_f1": float(f1_score(truth, preds, labels=list(range(len(labels))), average="macro", zero_division=0)),
            "epochs": epochs, "steps": epochs * len(loader), "peak_rss_gb": peak_rss_gb()}


def classification_bench(args: argparse.Namespace) -> None:
    from laformer import LaFormerForCausalLM
    from laformer.tokenizer import LaFormerTokenizer
    from laformer.training.recipes import get_preset

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    epochs = get_preset(PEER_EPOCHS_FROM).epochs
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        labels = dataset_subsets(args, folder)
        LaFormerForCausalLM.from_pretrained("smollm2-135m-instruct").save_pretrained(folder / "model")
        LaFormerTokenizer.from_pretrained("smollm2-135m-instruct").save_pretrained(folder / "model")
        processes, outputs = {}, {}
        for side in args.sides:
            command = [sys.executable, __file__, "--task", "classification", "--dataset", args.dataset, "--worker-side",
                       side, "--folder", str(folder), "--threads", str(args.threads), "--epochs", str(epochs),
                       "--laformer-args", args.laformer_args]
            processes[side] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                               env=env)
            if not args.concurrent:
                outputs[side] = processes[side].communicate()
        results = {}
        for side, process in processes.items():
            out, err = outputs[side] if side in outputs else process.communicate()
            if process.returncode:
                raise SystemExit(f"{side} failed:\n{err[-4000:]}")
            results[side] = json.loads(out.strip().splitlines()[-1])
            print(f"  {side:16s} {json.dumps(results[side])}", flush=True)
    print(f"\n{args.dataset}: {len(labels)} labels, {args.train_examples} train / {args.dev} dev (laformer's checkpoint "
          f"choice) / {args.eval} validation examples, {args.threads} threads, torch {torch.__version__}"
          + (f", laformer flags: {args.laformer_args}" if args.laformer_args else "")
          + (", sides run concurrently" if args.concurrent else ", sides run one after the other"))
    print("| side | epochs (steps) | val accuracy | val macro-F1 | wall (s) | peak RSS (GB) | wall / peer |")
    print("|---|---|---|---|---|---|---|")
    peer = results.get("transformers")
    for side, r in results.items():
        ratio = f"{r['seconds'] / peer['seconds']:.2f}x" if peer else "-"
        print(f"| {side} | {r['epochs']} ({r['steps']}) | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['seconds']:.0f} "
              f"| {r['peak_rss_gb']:.2f} | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": args.dataset, "labels": len(labels),
                                               "train_examples": args.train_examples, "dev": args.dev,
                                               "eval": args.eval, "results": results}, indent=2))


# -- the driver --------------------------------------------------------------------------------------------

def prepare(folder: Path) -> None:
    """The default model as a Hugging Face folder both sides load, and one initial LoRA + head both start from.

    The initial adapter is written in PEFT's format (laformer's ``save_adapter``), so the two sides train the same
    starting weights and the accuracy comparison measures the training, not the luck of two random inits.
    """
    from laformer import LaFormerForCausalLM, LaFormerForSequenceClassification
    from laformer.peft import LoraConfig, get_peft_model, save_adapter
    from laformer.tokenizer import LaFormerTokenizer

    LaFormerForCausalLM.from_pretrained("smollm2-135m-instruct").save_pretrained(folder)
    LaFormerTokenizer.from_pretrained("smollm2-135m-instruct").save_pretrained(folder)
    torch.manual_seed(0)
    model = LaFormerForSequenceClassification.from_pretrained(folder, id2label=dict(enumerate(LABELS)), pad_token_id=2)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, folder / "initial_adapter")


def launch(args: argparse.Namespace, mode: str, folder: Path) -> dict[str, dict]:
    """Both sides of one comparison, one after the other or (``--concurrent``) side by side."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    processes = {}
    for side in ("transformers", "laformer"):
        command = [sys.executable, __file__, "--worker", side, "--mode", mode, "--folder", str(folder),
                   "--steps", str(args.steps), "--eval", str(args.eval), "--pass-examples", str(args.pass_examples),
                   "--pass-probe", str(args.pass_probe), "--threads", str(args.threads)]
        processes[side] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if not args.concurrent:
            processes[side].wait()
    results = {}
    for side, process in processes.items():
        out, err = process.communicate()
        if process.returncode:
            raise SystemExit(f"{side}/{mode} failed:\n{err[-4000:]}")
        results[side] = json.loads(out.strip().splitlines()[-1])
        print(f"  {side:12s} {mode:6s} {json.dumps(results[side])}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="measured training steps at (8, 128)")
    parser.add_argument("--eval", type=int, default=400, help="validation examples for accuracy")
    parser.add_argument("--pass-examples", type=int, default=2000)
    parser.add_argument("--pass-probe", type=int, default=16, help="timed steps of the padded pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["right", "left", "pass"], choices=("right", "left", "pass"))
    parser.add_argument("--concurrent", action="store_true",
                        help="run both sides of each comparison at once (fairer on a machine shared with other work)")
    parser.add_argument("--worker", choices=("laformer", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("right", "left", "pass"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    recipe = parser.add_argument_group("the recipe comparison")
    recipe.add_argument("--task", choices=("speed", "classification"), default="speed")
    recipe.add_argument("--dataset", choices=DATASETS, default="sst2")
    recipe.add_argument("--train-examples", type=int, default=800)
    recipe.add_argument("--dev", type=int, default=200, help="train-split examples laformer selects its checkpoint on")
    recipe.add_argument("--sides", nargs="+", default=["transformers", "laformer"],
                        help="transformers, laformer (the default preset) or laformer:PRESET")
    recipe.add_argument("--laformer-args", default="", help="extra `laformer finetune` flags (for sweeps)")
    recipe.add_argument("--worker-side", help=argparse.SUPPRESS)
    recipe.add_argument("--epochs", type=float, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task == "classification":
        if args.worker_side:
            args.side = args.worker_side
            torch.set_num_threads(args.threads)
            labels = sorted({json.loads(line)["label"] for line in (DATA_ROOT / args.dataset / "train.jsonl").open()})
            print(json.dumps(peer_recipe(args, labels) if args.side == "transformers" else laformer_recipe(args)))
        else:
            classification_bench(args)
        return
    if args.worker:
        args.side = args.worker
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder)
        results = {}
        for mode in args.modes:
            for side, result in launch(args, mode, folder).items():
                results[(side, mode)] = result
    labels = {
        "right": [("(8,128) right-padded: padded tokens/s", "padded_tokens_per_s"),
                  ("(8,128) right-padded: peak RSS (GB)", "peak_rss_gb"),
                  (f"val accuracy after {args.steps + 1} steps ({args.eval} ex.)", "val_accuracy")],
        "left": [("(8,128) left-padded (all computed): tokens/s", "padded_tokens_per_s"),
                 ("(8,128) left-padded: peak RSS (GB)", "peak_rss_gb")],
        "pass": [(f"one pass over {args.pass_examples} ex. (s) *", "seconds"), ("peak RSS of the pass (GB)", "peak_rss_gb")],
    }
    print(f"\nLoRA r={RANK} q/v, AdamW lr={LR}, batch {BATCH}, {args.threads} threads, torch {torch.__version__}"
          + (", sides run concurrently" if args.concurrent else ""))
    print(f"| {'measure':46s} | {'transformers+peft':>17s} | {'laformer':>10s} | {'laformer/peer':>13s} |")
    print(f"|{'-' * 48}|{'-' * 19}|{'-' * 12}|{'-' * 15}|")
    for mode in args.modes:
        for name, key in labels[mode]:
            theirs, ours = results[("transformers", mode)][key], results[("laformer", mode)][key]
            print(f"| {name:46s} | {theirs:17.3f} | {ours:10.3f} | {ours / theirs:12.2f}x |")
    if "pass" in args.modes:
        hp, lp = results[("transformers", "pass")], results[("laformer", "pass")]
        print(f"* transformers' padded pass timed over {hp['probe_steps']} steps (all the same shape) and scaled "
              f"to its {hp['steps']} steps; the pass is {hp['seconds'] / lp['seconds']:.2f}x faster with laformer")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s}/{m}": r for (s, m), r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
