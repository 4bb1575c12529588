"""Financial sentiment monitor on Financial PhraseBank: score a headline stream, track rolling sentiment, raise alerts.

A LoRA-fine-tuned classifier (negative / neutral / positive) scores each headline of a time-ordered JSONL stream
(``{"time": ISO-8601, "text": ...}`` per line, from a file or stdin). The monitor keeps the rolling negative share
of the whole stream and of each topic and company it recognises, and raises an alert by this rule:

    the negative share of the last --window headlines is >= --threshold, and exceeds the share of the
    --baseline headlines before them by >= --jump, once at least --window headlines came before the window (a
    baseline to jump from); after an alert the rule re-arms once the share falls below half the threshold
    (one alert per burst, not one per headline).

Topics come from keyword lists (TOPICS below); a company is a capitalised name followed by a legal suffix
(Oyj, Plc, AB, Corp, ...). Both are plain, stated rules, shown so a user can swap in their own.

    python examples/financial_monitor/monitor.py run       # fine-tune, replay the validation split, evaluate alerts
    python examples/financial_monitor/monitor.py watch --stream headlines.jsonl   # or --stream - for stdin
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from laformer import DEFAULT_MODEL, LaFormerError
from laformer.extras import require
from laformer.tasks import classify, finetune_classification, load_finetuned
from laformer.training import TrainingArguments, load_classification_data
from laformer.training.reporting import classification_summary

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[2] / "shared" / "data" / "financial_phrasebank"
DEFAULT_OUTPUT = Path("runs") / "financial_monitor"
TOPICS = {
    "earnings": ("profit", "loss", "sales", "revenue", "earnings", "eps", "margin", "result", "turnover"),
    "jobs": ("staff", "jobs", "employees", "layoff", "redundanc", "personnel", "workforce", "cut"),
    "deals": ("acqui", "contract", "order", "agreement", "deal", "merger", "stake", "purchase"),
    "markets": ("share", "stock", "price", "market", "index", "trading", "investor"),
}
COMPANY = re.compile(r"\b([A-Z][\w&\-]*(?:\s+[A-Z][\w&\-]*)*)\s+(?:Oyj|OYJ|Plc|plc|PLC|Corp|Corporation|Inc|AB|ASA|"
                     r"Group|Ltd|Oy|AG|SA)\b")
STEP = timedelta(minutes=15)  # spacing of the constructed replay's headlines


def topics_of(text: str) -> list[str]:
    words = re.findall(r"[a-z]+", text.lower())
    found = [topic for topic, stems in TOPICS.items() if any(w.startswith(s) for w in words for s in stems)]
    return found or ["other"]


def company_of(text: str) -> str | None:
    match = COMPANY.search(text)
    return match.group(1) if match else None


@dataclass
class AlertRule:
    window: int = 12
    baseline: int = 48
    threshold: float = 0.5
    jump: float = 0.3


@dataclass
class Track:
    """Rolling labels of one key (the whole stream, a topic or a company) and its alert state."""

    rule: AlertRule
    labels: deque = field(default_factory=deque)
    armed: bool = True

    def add(self, label: str) -> tuple[float, bool]:
        """Append a label; returns (negative share of the window, whether an alert fires now)."""
        self.labels.append(label == "negative")
        if len(self.labels) > self.rule.window + self.rule.baseline:
            self.labels.popleft()
        recent = list(self.labels)[-self.rule.window:]
        before = list(self.labels)[: -self.rule.window]
        share = sum(recent) / len(recent)
        base = sum(before) / len(before) if before else 0.0
        warmed_up = len(before) >= self.rule.window  # no "jump" before there is a baseline to jump from
        fire = (self.armed and warmed_up and share >= self.rule.threshold and share - base >= self.rule.jump)
        if fire:
            self.armed = False
        elif share < self.rule.threshold / 2:
            self.armed = True
        return share, fire


def read_stream(source: str) -> Iterator[dict]:
    handle = sys.stdin if source == "-" else open(source, encoding="utf-8")
    with handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" not in row or "time" not in row:
                raise SystemExit(f"{source}, line {lineno}: each line needs 'time' (ISO-8601) and 'text'")
            row["time"] = datetime.fromisoformat(row["time"])
            yield row


def chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def monitor(model, tokenizer, rows: Iterable[dict], rule: AlertRule, batch_size: int = 16,
            max_length: int | None = None) -> tuple[list[dict], list[dict]]:
    """Score ``rows`` in arrival order; returns the scored rows and the alerts (key ``all``, topics, companies)."""
    tracks: dict[str, Track] = {}
    scored, alerts = [], []
    for chunk in tqdm(chunks(rows, batch_size), desc="scoring headlines", unit="batch"):
        for row, p in zip(chunk, classify(model, tokenizer, [r["text"] for r in chunk], batch_size, max_length)):
            row = {**row, "predicted": p["label"], "p_negative": p["probabilities"].get("negative", 0.0),
                   "topics": topics_of(row["text"]), "company": company_of(row["text"])}
            keys = ["all"] + [f"topic:{t}" for t in row["topics"]] + ([f"company:{row['company']}"] if row["company"] else [])
            for key in keys:
                share, fire = tracks.setdefault(key, Track(rule)).add(row["predicted"])
                if key == "all":
                    row["negative_share"] = share
                if fire:
                    alerts.append({"time": row["time"], "key": key, "negative_share": round(share, 3),
                                   "text": row["text"]})
            scored.append(row)
    return scored, alerts


# -- the constructed replay ------------------------------------------------------------------------------------------

def burst_replay(texts: list[str], labels: list[str], bursts: int, burst_size: int, seed: int,
                 start: datetime) -> tuple[list[dict], list[tuple[datetime, datetime]]]:
    """Validation headlines as a stream: non-negative ones shuffled, negatives injected as ``bursts`` clusters.

    Each cluster is ``burst_size`` negatives mixed with a quarter as many background headlines (80 % negative),
    at evenly spaced, known positions; returns the rows and each burst's (first, last) time, the alerts we expect.
    """
    rng = random.Random(seed)
    negatives = [t for t, y in zip(texts, labels) if y == "negative"]
    background = [(t, y) for t, y in zip(texts, labels) if y != "negative"]
    rng.shuffle(negatives)
    rng.shuffle(background)
    bursts = min(bursts, len(negatives) // burst_size)
    gap = len(background) // (bursts + 1)
    rows: list[tuple[str, str]] = []
    spans = []
    for b in range(bursts + 1):
        rows += background[b * gap : (b + 1) * gap] if b < bursts else background[b * gap :]
        if b == bursts:
            break
        cluster = [(t, "negative") for t in negatives[b * burst_size : (b + 1) * burst_size]]
        mixed = cluster + [rows.pop() for _ in range(burst_size // 4)]  # background moved into the burst
        rng.shuffle(mixed)
        spans.append((len(rows), len(rows) + len(mixed) - 1))
        rows += mixed
    stream = [{"time": start + i * STEP, "text": t, "label": y} for i, (t, y) in enumerate(rows)]
    return stream, [(stream[a]["time"], stream[b]["time"]) for a, b in spans]


def alert_scores(alerts: list[dict], spans: list[tuple[datetime, datetime]], tolerance: timedelta) -> dict:
    """Stream-level alerts against the known bursts: an alert inside [first, last + tolerance] of a burst is a hit."""
    stream_alerts = [a for a in alerts if a["key"] == "all"]
    hits = [any(s <= a["time"] <= e + tolerance for s, e in spans) for a in stream_alerts]
    found = [any(s <= a["time"] <= e + tolerance for a in stream_alerts) for s, e in spans]
    return {"alerts": len(stream_alerts), "true_alerts": sum(hits), "bursts": len(spans), "bursts_found": sum(found),
            "precision": round(sum(hits) / len(hits), 4) if hits else None,
            "recall": round(sum(found) / len(found), 4) if found else None}


# -- outputs ---------------------------------------------------------------------------------------------------------

def plot(scored: list[dict], alerts: list[dict], spans: list[tuple[datetime, datetime]], rule: AlertRule,
         path: Path, title: str) -> None:
    require("matplotlib", "train", "the monitor's plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [r["time"] for r in scored]
    window = rule.window
    positive = [sum(r["predicted"] == "positive" for r in scored[max(0, i - window + 1): i + 1]) / min(i + 1, window)
                for i in range(len(scored))]
    fig, ax = plt.subplots(figsize=(11, 4))
    for n, (start, end) in enumerate(spans):
        ax.axvspan(start, end, color="orange", alpha=0.25, label="injected negative burst" if n == 0 else None)
    ax.plot(times, [r["negative_share"] for r in scored], color="firebrick", label=f"negative share (last {window})")
    ax.plot(times, positive, color="seagreen", alpha=0.7, label=f"positive share (last {window})")
    ax.axhline(rule.threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {rule.threshold}")
    stream_alerts = [a for a in alerts if a["key"] == "all"]
    for n, alert in enumerate(stream_alerts):
        ax.axvline(alert["time"], color="black", linewidth=1.5, label="alert" if n == 0 else None)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of headlines")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def key_summary(scored: list[dict]) -> list[dict]:
    """Headline count and predicted sentiment shares per topic and per recognised company."""
    groups: dict[str, list[str]] = {}
    for row in scored:
        for key in [f"topic:{t}" for t in row["topics"]] + ([f"company:{row['company']}"] if row["company"] else []):
            groups.setdefault(key, []).append(row["predicted"])
    summary = []
    for key, labels in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        counts = Counter(labels)
        summary.append({"key": key, "headlines": len(labels),
                        **{f"{s}_share": round(counts[s] / len(labels), 3) for s in ("negative", "neutral", "positive")}})
    return summary


def write_outputs(output: Path, name: str, scored: list[dict], alerts: list[dict], rule: AlertRule,
                  spans: list[tuple[datetime, datetime]] = ()) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    plot(scored, alerts, list(spans), rule, output / f"{name}.png", f"{name}: rolling sentiment and alerts")
    with (output / f"{name}_scored.jsonl").open("w", encoding="utf-8") as f:
        for row in scored:
            f.write(json.dumps({**row, "time": row["time"].isoformat()}, ensure_ascii=False) + "\n")
    result = {"headlines": len(scored), "alerts": [{**a, "time": a["time"].isoformat()} for a in alerts],
              "by_key": key_summary(scored), "plot": str(output / f"{name}.png")}
    (output / f"{name}_alerts.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def markdown_report(report: dict, rule: AlertRule) -> str:
    lines = ["# Financial sentiment monitor: report", "",
             f"Alert rule: negative share of the last {rule.window} headlines >= {rule.threshold} and at least "
             f"{rule.jump} above the {rule.baseline} headlines before them (at least {rule.window} of them); re-armed below "
             f"{rule.threshold / 2}.", "",
             f"Classifier on the validation split: accuracy {report['classifier']['accuracy']}, macro-F1 "
             f"{report['classifier']['macro_f1']} ({report['classifier']['headlines']} headlines).", "",
             "| replay | headlines | bursts | alerts | true alerts | precision | recall |", "|---|---|---|---|---|---|---|"]
    for name in ("burst_replay", "neutral_replay"):
        s = report[name]
        lines.append(f"| {name} | {s['headlines']} | {s['bursts']} | {s['alerts']} | {s['true_alerts']} | "
                     f"{s['precision']} | {s['recall']} |")
    lines += ["", "No-alert baseline on the burst replay: recall 0.", "", "Stream alerts (burst replay):", ""]
    lines += [f"- {a['time']} `{a['key']}` negative share {a['negative_share']}: {a['text'][:90]}"
              for a in report["burst_replay"]["alert_list"]]
    lines += ["", "Busiest topics and companies (burst replay, predicted shares):", "",
              "| key | headlines | negative | neutral | positive |", "|---|---|---|---|---|"]
    lines += [f"| {k['key']} | {k['headlines']} | {k['negative_share']} | {k['neutral_share']} | {k['positive_share']} |"
              for k in report["burst_replay"]["by_key"][:12]]
    return "\n".join(lines) + "\n"


# -- commands --------------------------------------------------------------------------------------------------------

def rule_from(args: argparse.Namespace) -> AlertRule:
    return AlertRule(args.window, args.baseline, args.threshold, args.jump)


def balanced(order: list[int], labels: list[str], seed: int) -> list[int]:
    """Oversample every class to the largest one's count: negatives are rare but they are what the alerts need."""
    by_label: dict[str, list[int]] = {}
    for i in order:
        by_label.setdefault(labels[i], []).append(i)
    most = max(len(ids) for ids in by_label.values())
    rng = random.Random(seed)
    out = [i for ids in by_label.values() for i in (ids * (most // len(ids) + 1))[:most]]
    rng.shuffle(out)
    return out


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    output, rule = args.output, rule_from(args)
    output.mkdir(parents=True, exist_ok=True)
    texts, labels = load_classification_data(args.data / "train.jsonl")
    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    order = order[: args.train_examples] if args.train_examples > 0 else order
    if args.balance:
        order = balanced(order, labels, args.seed)
    train_file = output / "train_subset.jsonl"
    train_file.write_text("".join(json.dumps({"text": texts[i], "label": labels[i]}) + "\n" for i in order))
    print(f"fine-tuning {args.model} ({args.method}) on {len(order)} headlines (balanced: {args.balance}) "
          f"for {args.steps} steps")
    training = TrainingArguments(output_dir=str(output / "classifier"), learning_rate=args.lr, max_steps=args.steps,
                                 batch_size=args.batch_size, warmup_ratio=0.1, report_to=[], logging_steps=10,
                                 seed=args.seed)
    finetune_classification(train_file, training, model_name=args.model, method=args.method,
                            max_length=args.max_length)
    model, tokenizer, meta = load_finetuned(output / "classifier")

    val_texts, val_labels = load_classification_data(args.data / "validation.jsonl")
    start = datetime(2024, 1, 2, 9, 0)
    replay, spans = burst_replay(val_texts, val_labels, args.bursts, args.burst_size, args.seed, start)
    neutral = [{"time": start + i * STEP, "text": t, "label": y}
               for i, (t, y) in enumerate((t, y) for t, y in zip(val_texts, val_labels) if y == "neutral")]
    report: dict = {"rule": vars(rule)}
    tolerance = STEP * (rule.window // 2)
    for name, rows, known in (("burst_replay", replay, spans), ("neutral_replay", neutral, [])):
        with (output / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({**row, "time": row["time"].isoformat()}, ensure_ascii=False) + "\n")
        scored, alerts = monitor(model, tokenizer, [dict(r) for r in rows], rule, max_length=meta["max_length"])
        result = write_outputs(output, name, scored, alerts, rule, known)
        report[name] = {**alert_scores(alerts, known, tolerance), "headlines": len(scored),
                        "alert_list": result["alerts"], "by_key": result["by_key"], "plot": result["plot"]}
        if name == "burst_replay":
            truth, predicted = [r["label"] for r in scored], [r["predicted"] for r in scored]
            names = sorted(set(truth) | set(predicted))
            summary = classification_summary([names.index(t) for t in truth], [names.index(p) for p in predicted], names)
            report["classifier"] = {"headlines": len(truth), "accuracy": round(summary["accuracy"], 4),
                                    "macro_f1": round(summary["macro_f1"], 4)}
        report[name]["burst_spans"] = [[s.isoformat(), e.isoformat()] for s, e in known]
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    (output / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (output / "report.md").write_text(markdown_report(report, rule))
    print(markdown_report(report, rule))
    print(f"artifacts in {output}")
    return report


def watch(args: argparse.Namespace) -> dict:
    model, tokenizer, meta = load_finetuned(args.classifier)
    rule = rule_from(args)
    scored, alerts = monitor(model, tokenizer, read_stream(args.stream), rule, max_length=meta["max_length"])
    if not scored:
        raise SystemExit(f"the stream {args.stream} held no headlines")
    for alert in alerts:
        print(f"ALERT {alert['time'].isoformat()} {alert['key']}: negative share {alert['negative_share']} "
              f"({alert['text'][:80]})")
    result = write_outputs(args.output, "stream", scored, alerts, rule)
    print(f"{len(scored)} headlines, {len(alerts)} alerts; plot {result['plot']}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    common.add_argument("--window", type=int, default=12, help="headlines in the rolling window")
    common.add_argument("--baseline", type=int, default=48, help="headlines before the window it is compared with")
    common.add_argument("--threshold", type=float, default=0.5, help="negative share that raises an alert")
    common.add_argument("--jump", type=float, default=0.3, help="minimum rise over the baseline share")
    cmd = commands.add_parser("run", parents=[common], help="fine-tune, replay validation, evaluate alerts")
    cmd.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.jsonl and validation.jsonl")
    cmd.add_argument("--model", default=DEFAULT_MODEL)
    cmd.add_argument("--method", default="lora", help="fine-tuning method (lora, adalora, adapter, prefix, full)")
    cmd.add_argument("--train-examples", type=int, default=0, help="0: all")
    cmd.add_argument("--steps", type=int, default=100)
    cmd.add_argument("--batch-size", type=int, default=16)
    cmd.add_argument("--max-length", type=int, default=48)
    cmd.add_argument("--lr", type=float, default=2e-3)
    cmd.add_argument("--no-balance", dest="balance", action="store_false",
                     help="train on the natural class mix instead of oversampling to balanced classes")
    cmd.add_argument("--bursts", type=int, default=2, help="negative bursts injected into the replay (each judged "
                     "against a clean baseline only while the gaps between them exceed --baseline)")
    cmd.add_argument("--burst-size", type=int, default=12, help="negative headlines per burst")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.set_defaults(func=run)
    cmd = commands.add_parser("watch", parents=[common], help="score a stream and alert")
    cmd.add_argument("--stream", default="-", help="JSONL file of {time, text}, or - for stdin")
    cmd.add_argument("--classifier", type=Path, default=DEFAULT_OUTPUT / "classifier",
                     help="a fine-tuned classifier folder (run's output/classifier)")
    cmd.set_defaults(func=watch)
    args = parser.parse_args(argv)
    missing = [split for split in ("train.jsonl", "validation.jsonl")
               if args.command == "run" and not (args.data / split).is_file()]
    if missing:
        parser.error(f"Financial PhraseBank not found: {args.data} lacks {', '.join(missing)}; pass --data (the "
                     "folder with train.jsonl and validation.jsonl)")
    if args.command == "watch" and args.stream != "-" and not Path(args.stream).is_file():
        parser.error(f"stream file {args.stream} does not exist")
    if args.command == "watch" and not (args.classifier / "laformer_finetune.json").is_file():
        parser.error(f"{args.classifier} holds no fine-tuned classifier; run `monitor.py run` first or pass --classifier")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.func(args)
    except LaFormerError as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
