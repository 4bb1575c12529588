"""News recommender on AG News: embedding retrieval, then a fine-tuned "will read" re-ranker.

THE READERS ARE A SIMULATION (seeded, ``--seed``): AG News has articles but no reading logs. Each catalog's
articles are grouped into subtopics (k-means on TF-IDF inside each of the 4 AG News topics, e.g. "Sports:
olympic, athens, gold"); a simulated reader's interest is a mixture (Dirichlet weights) of a few subtopics, and
each article is read with probability proportional to (interest in its subtopic) x (the article's popularity,
log-normal). A reader's history is drawn from that; its last ``--held-out`` articles are hidden and must be
recommended back.

Four rankings of the catalog for every reader, without the articles already read:

- popularity: how often the other readers read each article (the baseline);
- embeddings: cosine between the reader's profile (mean ``model.encode`` embedding of the articles read) and
  each article, both centred on the catalog's mean embedding;
- embeddings -> re-ranker: the embeddings' top ``--candidates`` re-ordered by a classifier fine-tuned with LoRA
  (laformer's ``finetune_classification``) to predict "read" from the text of the article and of the reader's
  ``--evidence`` read articles nearest to it. It learns on the pairs it will judge: held-out reads ("read")
  against unread articles of the same reader's embedding shortlist ("skip"), one for one;
- embeddings + re-ranker (fused): that shortlist ordered by the sum of both stages' standardised scores.

The re-ranker learns from other simulated readers of another catalog (the training split), so it never sees an
evaluated reader or article. Metrics: recall@10 and NDCG@10 (scikit-learn's ``ndcg_score``), and the simulation's
own reading probabilities as the ceiling.

    python examples/recommender/recommend.py            # artifacts in runs/recommender
"""

from __future__ import annotations

import argparse
import json
import random
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from laformer import DEFAULT_MODEL, LaFormerError, LaFormerForCausalLM, LaFormerTokenizer
from laformer.extras import require
from laformer.tasks import classify, finetune_classification, load_finetuned
from laformer.training import TrainingArguments, load_classification_data

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[2] / "shared" / "data" / "ag_news"
DEFAULT_OUTPUT = Path("runs") / "recommender"
K = 10  # recall@K and NDCG@K
METHODS = ("popularity", "embeddings", "embeddings -> re-ranker", "embeddings + re-ranker (fused)",
           "simulation ceiling")


@dataclass
class Catalog:
    texts: list[str]
    topics: list[str]  # the AG News label
    subtopic: np.ndarray  # (N,) subtopic id of each article
    subtopic_names: list[str]
    popularity: np.ndarray  # (N,) the simulation's popularity weight


@dataclass
class Reader:
    interest: dict[int, float]  # subtopic id -> weight (sums to 1)
    read: list[int]  # the history the recommender sees, in reading order
    held_out: list[int]  # read later; what it must recommend


# -- the simulation --------------------------------------------------------------------------------------------------

def build_catalog(texts: list[str], topics: list[str], per_topic: int, seed: int) -> Catalog:
    """Subtopics by k-means on TF-IDF inside each AG News topic, named by their heaviest terms."""
    text_features = require("sklearn.feature_extraction.text", "train", "the recommender's subtopics")
    cluster = require("sklearn.cluster", "train", "the recommender's subtopics")
    vectorizer = text_features.TfidfVectorizer(stop_words="english", sublinear_tf=True, min_df=2)
    features = vectorizer.fit_transform(texts)
    terms = vectorizer.get_feature_names_out()
    subtopic = np.zeros(len(texts), dtype=int)
    names: list[str] = []
    for topic in sorted(set(topics)):
        rows = np.flatnonzero(np.array(topics) == topic)
        count = max(1, min(per_topic, len(rows) // 5))
        labels = cluster.KMeans(count, n_init=4, random_state=seed).fit_predict(features[rows])
        for c in range(count):
            members = rows[labels == c]
            heaviest = np.asarray(features[members].mean(0)).ravel().argsort()[::-1][:3]
            subtopic[members] = len(names)
            names.append(f"{topic}: {', '.join(terms[heaviest])}")
    popularity = np.random.default_rng(seed).lognormal(0.0, 0.5, len(texts))
    return Catalog(texts, topics, subtopic, names, popularity)


def simulate_readers(catalog: Catalog, count: int, history: int, held_out: int, interests: int,
                     seed: int) -> list[Reader]:
    """Readers whose interest is a Dirichlet mixture of ``interests`` subtopics; histories drawn without repeats."""
    rng = np.random.default_rng(seed)
    readers = []
    for _ in range(count):
        chosen = rng.choice(len(catalog.subtopic_names), size=interests, replace=False)
        weights = rng.dirichlet(np.ones(interests))
        interest = {int(s): float(w) for s, w in zip(chosen, weights)}
        p = reading_probability(catalog, interest)
        drawn = rng.choice(len(p), size=min(history, int((p > 0).sum())), replace=False, p=p).tolist()
        readers.append(Reader(interest, drawn[:-held_out], drawn[-held_out:]))
    return readers


def reading_probability(catalog: Catalog, interest: dict[int, float]) -> np.ndarray:
    weight = np.array([interest.get(int(s), 0.0) for s in catalog.subtopic]) * catalog.popularity
    return weight / weight.sum()


# -- the re-ranker ---------------------------------------------------------------------------------------------------

def words(text: str, count: int) -> str:
    return " ".join(text.split()[:count])


def pair_text(catalog: Catalog, evidence: list[int], item: int) -> str:
    """The re-ranker's input: the candidate, then the reader's ``evidence`` (the read articles nearest to it)."""
    read = " | ".join(words(catalog.texts[i], 8) for i in evidence)
    return f"Article: {words(catalog.texts[item], 14)}\nThe reader read: {read}"


def evidence(items: torch.Tensor, history: list[int], candidates: np.ndarray, count: int) -> list[list[int]]:
    """For each candidate, the ``count`` articles of ``history`` closest to it by embedding, nearest first.

    A reader's interests are a mixture, so the few titles that fit in the re-ranker's input are the ones that speak
    for or against this candidate, not the most recent ones (which may all be about another of its interests)."""
    similarity = items[torch.as_tensor(candidates)] @ items[history].T  # (C, H)
    nearest = similarity.topk(min(count, len(history)), dim=-1).indices.tolist()
    return [[history[j] for j in row] for row in nearest]


def reranker_pairs(catalog: Catalog, items: torch.Tensor, readers: list[Reader], candidates: int, evidence_count: int,
                   seed: int) -> list[dict]:
    """(reader, article) pairs as the re-ranker meets them at test time: the article is a held-out read ("read") or
    an unread article of the reader's own embedding shortlist ("skip"), one skip per read.

    Skips drawn from the shortlist, not from the whole catalog, because the re-ranker only ever orders a shortlist:
    random articles are off-topic and teach it what the embeddings already know."""
    rng = random.Random(seed)
    profiles = torch.nn.functional.normalize(torch.stack([items[r.read].mean(0) for r in readers]), dim=-1)
    shortlists = np.argsort(-masked((profiles @ items.T).numpy(), readers), axis=1, kind="stable")[:, :candidates]
    pairs = []
    for reader, shortlist in zip(readers, shortlists):
        unread = [int(i) for i in shortlist if i not in set(reader.held_out)]
        chosen = reader.held_out + rng.sample(unread, min(len(unread), len(reader.held_out)))
        labels = ["read"] * len(reader.held_out) + ["skip"] * (len(chosen) - len(reader.held_out))
        for item, near, label in zip(chosen, evidence(items, reader.read, np.array(chosen), evidence_count), labels):
            pairs.append({"text": pair_text(catalog, near, item), "label": label})
    rng.shuffle(pairs)
    return pairs


# -- rankings and metrics --------------------------------------------------------------------------------------------

def embed(model, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    chunks = [texts[i : i + 4 * batch_size] for i in range(0, len(texts), 4 * batch_size)]
    vectors = [model.encode(chunk, tokenizer, batch_size=batch_size, max_length=64)
               for chunk in tqdm(chunks, desc="embedding articles", unit="chunk")]
    vectors = torch.cat(vectors)
    return torch.nn.functional.normalize(vectors - vectors.mean(0), dim=-1)  # centred: the shared direction removed


def masked(scores: np.ndarray, readers: list[Reader]) -> np.ndarray:
    """Scores with each reader's already-read articles pushed below every other article."""
    out = scores.astype(float).copy()
    floor = out.min() - 1.0
    for row, reader in enumerate(readers):
        out[row, reader.read] = floor
    return out


def evaluate(scores: np.ndarray, readers: list[Reader]) -> dict[str, float]:
    ndcg_score = require("sklearn.metrics", "train", "the recommender's NDCG").ndcg_score
    truth = np.zeros_like(scores)
    for row, reader in enumerate(readers):
        truth[row, reader.held_out] = 1.0
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    recall = [len(set(top[row]) & set(r.held_out)) / len(r.held_out) for row, r in enumerate(readers)]
    return {f"recall@{K}": round(float(np.mean(recall)), 4), f"ndcg@{K}": round(float(ndcg_score(truth, scores, k=K)), 4)}


def shortlist_scores(embedding_scores: np.ndarray, catalog: Catalog, items: torch.Tensor, readers: list[Reader],
                     reranker, tokenizer, candidates: int, evidence_count: int,
                     max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The re-ranker's P(read) for each reader's top ``candidates`` by embeddings: (shortlists, p_read), both (R, C)."""
    shortlists = np.argsort(-embedding_scores, axis=1, kind="stable")[:, :candidates]
    p_read = np.zeros(shortlists.shape)
    per_call = max(1, 64 // candidates)  # readers per classify call: a few full batches each
    for start in tqdm(range(0, len(readers), per_call), desc="re-ranking", unit="call"):
        rows = range(start, min(start + per_call, len(readers)))
        texts = [pair_text(catalog, near, int(i)) for r in rows
                 for i, near in zip(shortlists[r], evidence(items, readers[r].read, shortlists[r], evidence_count))]
        scored = classify(reranker, tokenizer, texts, 32, max_length)
        p_read[start : rows.stop] = np.array([p["probabilities"]["read"] for p in scored]).reshape(len(rows), -1)
    return shortlists, p_read


def reranked(embedding_scores: np.ndarray, shortlists: np.ndarray, shortlist_scores: np.ndarray) -> np.ndarray:
    """The shortlist ordered by ``shortlist_scores``, kept above every other article (which keep the embeddings' order)."""
    out = embedding_scores.copy()
    np.put_along_axis(out, shortlists, 10.0 + shortlist_scores, axis=1)
    return out


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a held-out article of the shortlist scores above an unread one): 0.5 is a re-ranker that learned nothing."""
    if not len(positive) or not len(negative):
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).mean()
    return float(greater + 0.5 * (positive[:, None] == negative[None, :]).mean())


def standardized(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-9)


# -- the run ---------------------------------------------------------------------------------------------------------

def load_catalog(path: Path, limit: int, args: argparse.Namespace) -> Catalog:
    texts, topics = load_classification_data(path)
    if limit > 0:
        order = random.Random(args.seed).sample(range(len(texts)), min(limit, len(texts)))
        texts, topics = [texts[i] for i in order], [topics[i] for i in order]
    return build_catalog(texts, topics, args.subtopics, args.seed)


def reranker_base(args: argparse.Namespace, output: Path) -> str | Path:
    """The model the re-ranker is fine-tuned from: the first ``--reranker-layers`` layers of ``--model``.

    It scores ``--candidates`` texts per reader, so it is kept small; the cut keeps the real embeddings and
    tokenizer, and 0 keeps every layer."""
    if not args.reranker_layers:
        return args.model
    folder = output / "reranker_base"
    LaFormerForCausalLM.from_pretrained(args.model, num_hidden_layers=args.reranker_layers).save_pretrained(folder)
    LaFormerTokenizer.from_pretrained(args.model).save_pretrained(folder)
    return folder


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    history = args.history + args.held_out

    encoder = LaFormerForCausalLM.from_pretrained(args.model)
    encoder_tokenizer = LaFormerTokenizer.from_pretrained(args.model)
    train_catalog = load_catalog(args.data / "train.jsonl", args.train_articles, args)
    train_readers = simulate_readers(train_catalog, args.train_readers, history, args.held_out, args.interests,
                                     args.seed + 1)
    train_items = embed(encoder, encoder_tokenizer, train_catalog.texts)
    pairs = reranker_pairs(train_catalog, train_items, train_readers, args.candidates, args.evidence, args.seed)
    pairs_file = output / "reranker_pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    layers = f"first {args.reranker_layers} layers of " if args.reranker_layers else ""
    print(f"fine-tuning the re-ranker ({layers}{args.model}, LoRA) on {len(pairs)} pairs from {len(train_readers)} "
          f"simulated readers of {len(train_catalog.texts)} training articles, {args.steps} steps")
    training = TrainingArguments(output_dir=str(output / "reranker"), learning_rate=args.lr, max_steps=args.steps,
                                 batch_size=args.batch_size, warmup_ratio=0.1, report_to=[], logging_steps=10,
                                 seed=args.seed)
    finetune_classification(pairs_file, training, model_name=reranker_base(args, output), method="lora",
                            peft_options={"r": 8, "lora_alpha": 16}, max_length=args.max_length)
    reranker, reranker_tokenizer, meta = load_finetuned(output / "reranker")

    catalog = load_catalog(args.data / "validation.jsonl", args.articles, args)
    readers = simulate_readers(catalog, args.readers, history, args.held_out, args.interests, args.seed + 2)
    print(f"evaluating on {len(readers)} simulated readers of {len(catalog.texts)} validation articles")
    items = embed(encoder, encoder_tokenizer, catalog.texts)
    profiles = torch.nn.functional.normalize(torch.stack([items[r.read].mean(0) for r in readers]), dim=-1)

    counts = np.zeros(len(catalog.texts))
    for reader in readers:
        np.add.at(counts, reader.read, 1.0)
    # a reader's own reads are masked anyway, so counting them changes no ranking
    popularity = masked(np.tile(counts, (len(readers), 1)), readers)
    embeddings = masked((profiles @ items.T).numpy(), readers)
    shortlists, p_read = shortlist_scores(embeddings, catalog, items, readers, reranker, reranker_tokenizer,
                                          args.candidates, args.evidence, meta["max_length"])
    logit = np.log(p_read + 1e-6) - np.log1p(1e-6 - p_read)
    # fused: the first stage's evidence is kept, so a re-ranker that knows little cannot undo a good shortlist
    fused = standardized(np.take_along_axis(embeddings, shortlists, axis=1)) + standardized(logit)
    ceiling = masked(np.stack([reading_probability(catalog, r.interest) for r in readers]), readers)
    scores = dict(zip(METHODS, (popularity, embeddings, reranked(embeddings, shortlists, p_read),
                                reranked(embeddings, shortlists, fused), ceiling)))
    metrics = {name: evaluate(s, readers) for name, s in scores.items()}
    held = np.array([[int(i) in r.held_out for i in row] for row, r in zip(shortlists, readers)])

    report = {"metrics": metrics, "readers": len(readers), "articles": len(catalog.texts),
              "reranker_pairs": len(pairs), "reranker_auc": round(auc(p_read[held], p_read[~held]), 4),
              "embeddings_auc": round(auc(np.take_along_axis(embeddings, shortlists, 1)[held],
                                          np.take_along_axis(embeddings, shortlists, 1)[~held]), 4),
              "shortlist_held_out": int(held.sum()), "subtopics": catalog.subtopic_names,
              "wall_time_s": round(time.perf_counter() - started, 1),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}}
    (output / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (output / "report.md").write_text(markdown_report(report))
    write_readers(output / "readers.jsonl", catalog, readers, scores)
    plot(metrics, output / "metrics.png", len(readers))
    print(markdown_report(report))
    print(f"artifacts in {output}")
    return report


def write_readers(path: Path, catalog: Catalog, readers: list[Reader], scores: dict[str, np.ndarray]) -> None:
    """Each simulated reader, what they read and held out, and each method's top 10: to inspect by eye."""
    with path.open("w", encoding="utf-8") as f:
        for row, reader in enumerate(readers):
            entry = {"interest": {catalog.subtopic_names[s]: round(w, 3) for s, w in reader.interest.items()},
                     "read": reader.read, "held_out": reader.held_out,
                     "top10": {name: np.argsort(-s[row], kind="stable")[:K].tolist() for name, s in scores.items()}}
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def markdown_report(report: dict) -> str:
    lines = ["# News recommender on AG News (simulated readers)", "",
             f"{report['readers']} simulated readers of {report['articles']} validation articles; the re-ranker "
             f"learned from {report['reranker_pairs']} (history, article) pairs of other simulated readers.", "",
             f"| method | recall@{K} | NDCG@{K} |", "|---|---|---|"]
    lines += [f"| {name} | {m[f'recall@{K}']:.3f} | {m[f'ndcg@{K}']:.3f} |" for name, m in report["metrics"].items()]
    lines += ["", f"Inside the embeddings' shortlists ({report['shortlist_held_out']} held-out articles among them), the "
              f"chance that a held-out article scores above an unread one (AUC; 0.5 = no signal): re-ranker "
              f"{report['reranker_auc']:.3f}, embeddings {report['embeddings_auc']:.3f}."]
    lines += ["", "The simulation ceiling ranks by the simulation's own reading probabilities: no recommender "
              "that sees only texts and reads can be expected to reach it.", "",
              f"Wall time: {report['wall_time_s']} s."]
    return "\n".join(lines) + "\n"


def plot(metrics: dict[str, dict[str, float]], path: Path, readers: int) -> None:
    require("matplotlib", "train", "the recommender's plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    for offset, key in ((-0.2, f"recall@{K}"), (0.2, f"ndcg@{K}")):
        bars = ax.bar(x + offset, [metrics[n][key] for n in names], width=0.4, label=key)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(x, [textwrap.fill(n, 16) for n in names], fontsize=9)
    ax.set_title(f"AG News recommendations for {readers} simulated readers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.jsonl and validation.jsonl")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model (embeddings and re-ranker)")
    parser.add_argument("--articles", type=int, default=0, help="validation articles in the catalog (0: all)")
    parser.add_argument("--readers", type=int, default=100, help="simulated readers evaluated")
    parser.add_argument("--train-articles", type=int, default=600, help="training articles the re-ranker's readers read")
    parser.add_argument("--train-readers", type=int, default=300, help="simulated readers the re-ranker learns from")
    parser.add_argument("--subtopics", type=int, default=6, help="subtopics per AG News topic")
    parser.add_argument("--interests", type=int, default=3, help="subtopics mixed in each reader's interest")
    parser.add_argument("--history", type=int, default=10, help="articles of each history the recommender sees")
    parser.add_argument("--held-out", type=int, default=4, help="articles of each history hidden and evaluated")
    parser.add_argument("--candidates", type=int, default=20, help="embedding shortlist the re-ranker re-orders")
    parser.add_argument("--evidence", type=int, default=3, help="read articles (nearest the candidate) the re-ranker sees")
    parser.add_argument("--reranker-layers", type=int, default=6,
                        help="layers of --model kept for the re-ranker (0: all); it scores every shortlisted article")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=80)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for split in ("train.jsonl", "validation.jsonl"):
        if not (args.data / split).is_file():
            parser.error(f"AG News not found: {args.data / split} is missing; pass --data (the folder with "
                         "train.jsonl and validation.jsonl)")
    if args.held_out < 1 or args.history < 1:
        parser.error("--history and --held-out must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except LaFormerError as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
