"""Customer-service assistant on BANKING77: intent classifier + answer retrieval + a grounded generated reply.

A question goes to a LoRA-fine-tuned intent classifier. When it is sure (top probability >= --threshold) its intent
picks the answer; when it is unsure, the answer base is searched with ``model.encode`` embeddings instead. The
default instruct model then rewrites the chosen answer as a reply, grounded in it through the system prompt.

    python examples/customer_service/assistant.py train            # fine-tune, evaluate, write the report
    python examples/customer_service/assistant.py chat             # terminal chat with the trained assistant
    python examples/customer_service/assistant.py serve --port 8000  # HTTP service on 127.0.0.1 (laformer[serve])
"""

# No `from __future__ import annotations`: FastAPI must see the request model of build_app (a local class) as a
# class, not as the string "Message", or it reads the body as a missing query parameter and answers 422.
import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from laformer import DEFAULT_MODEL, LaFormerError, LaFormerForCausalLM, LaFormerTokenizer
from laformer.extras import require
from laformer.tasks import classify, finetune_classification, load_finetuned
from laformer.training import TrainingArguments, load_classification_data
from laformer.training.reporting import classification_summary

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[2] / "shared" / "data" / "banking77"
DEFAULT_ANSWERS = HERE / "answers.jsonl"
DEFAULT_OUTPUT = Path("runs") / "customer_service"
SYSTEM_PROMPT = ("You are the customer-service assistant of an online bank. Answer the customer's message in two or "
                 "three friendly sentences, using only this information: {answer}")
DEMO_QUESTIONS = [
    "I still haven't received my new card, it's been two weeks.",
    "How do I add my card to Apple Pay?",
    "Someone stole my wallet with my card in it!",
    "Why was I charged a fee for taking out cash?",
    "What exchange rate do you use when I pay abroad?",
]


@dataclass
class Reply:
    question: str
    intent: str
    confidence: float  # the classifier's probability for its top intent
    source: str  # "classifier" (confident) or "retrieval" (the answer base searched by embeddings)
    answer: str
    reply: str


def read_answers(path: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {row["intent"]: row["answer"] for row in rows}


def answer_documents(answers: dict[str, str]) -> list[str]:
    """What gets embedded for each intent: its name in words, then its answer."""
    return [f"{intent.replace('_', ' ').strip('?')}: {text}" for intent, text in answers.items()]


def chunked(work, texts: list[str], desc: str, size: int = 128) -> list:
    """``work`` over ``texts`` in chunks of ``size``, with a tqdm bar: the full validation split takes minutes."""
    parts = [work(texts[i : i + size]) for i in tqdm(range(0, len(texts), size), desc=desc, unit="chunk")]
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [x for part in parts for x in part]


def answer_index(generator, tokenizer, answers: dict[str, str], examples: dict[str, list[str]]) -> torch.Tensor:
    """One key per intent: the normalised mean of its answer's embedding and of its example questions'."""
    docs = answer_documents(answers)
    answer_vectors = generator.encode(docs, tokenizer, batch_size=32, max_length=96)
    keys = []
    for row, intent in enumerate(tqdm(answers, desc="indexing answers", unit="intent")):
        questions = examples.get(intent, [])
        vectors = generator.encode(questions, tokenizer, batch_size=32, max_length=64) if questions else answer_vectors[:0]
        keys.append(torch.cat([answer_vectors[row : row + 1], vectors]).mean(0))
    return torch.nn.functional.normalize(torch.stack(keys), dim=-1)


class Assistant:
    """The question -> (intent, answer, reply) pipeline over a trained output folder."""

    def __init__(self, output: Path, threshold: float | None = None, max_new_tokens: int = 80) -> None:
        settings = json.loads((output / "assistant.json").read_text())
        self.threshold = settings["threshold"] if threshold is None else threshold
        self.max_new_tokens = max_new_tokens
        self.classifier, self.tokenizer, meta = load_finetuned(output / "classifier")
        self.max_length = meta["max_length"]
        self.generator = LaFormerForCausalLM.from_pretrained(settings["generator"])
        self.generator_tokenizer = LaFormerTokenizer.from_pretrained(settings["generator"])
        self.answers = read_answers(output / "answers.jsonl")
        self.intents = list(self.answers)
        self.keys = torch.load(output / "answer_index.pt")

    def route(self, questions: list[str]) -> list[tuple[str, float, str]]:
        """(intent, classifier confidence, source) per question."""
        predictions = classify(self.classifier, self.tokenizer, questions, batch_size=32, max_length=self.max_length)
        unsure = [i for i, p in enumerate(predictions) if p["score"] < self.threshold]
        retrieved = {}
        if unsure:
            vectors = self.generator.encode([questions[i] for i in unsure], self.generator_tokenizer, max_length=64)
            for i, best in zip(unsure, (vectors @ self.keys.T).argmax(-1).tolist()):
                retrieved[i] = self.intents[best]
        return [(retrieved[i], p["score"], "retrieval") if i in retrieved else (p["label"], p["score"], "classifier")
                for i, p in enumerate(predictions)]

    def generate_reply(self, question: str, answer: str) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT.format(answer=answer)},
                    {"role": "user", "content": question}]
        prompt = self.generator_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.generator_tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = self.generator.generate(ids, max_new_tokens=self.max_new_tokens, repetition_penalty=1.1)
        return self.generator_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def reply(self, question: str) -> Reply:
        intent, confidence, source = self.route([question])[0]
        answer = self.answers[intent]
        return Reply(question, intent, round(confidence, 4), source, answer, self.generate_reply(question, answer))


# -- train: fine-tune, index, evaluate ------------------------------------------------------------------------------

def sample(texts: list[str], labels: list[str], limit: int, seed: int) -> tuple[list[str], list[str]]:
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    order = order[:limit] if limit > 0 else order
    return [texts[i] for i in order], [labels[i] for i in order]


def recall_at(similarities: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    top = similarities.topk(min(k, similarities.shape[1]), dim=-1).indices
    return float((top == truth[:, None]).any(-1).float().mean())


def train(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    answers = read_answers(args.answers)
    texts, labels = load_classification_data(args.data / "train.jsonl")
    missing = sorted(set(labels) - set(answers))
    if missing:
        raise SystemExit(f"{args.answers} has no answer for intent(s) {missing[:5]}; add one line per intent")
    train_texts, train_labels = sample(texts, labels, args.train_examples, args.seed)
    train_file = output / "train_subset.jsonl"
    train_file.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(train_texts, train_labels)))
    (output / "answers.jsonl").write_text(args.answers.read_text(encoding="utf-8"), encoding="utf-8")

    print(f"fine-tuning {args.model} ({args.method}) on {len(train_texts)} questions for {args.steps} steps")
    training = TrainingArguments(output_dir=str(output / "classifier"), learning_rate=args.lr, max_steps=args.steps,
                                 batch_size=args.batch_size, warmup_ratio=0.1, report_to=[], logging_steps=10,
                                 seed=args.seed)
    finetune_classification(train_file, training, model_name=args.model, method=args.method,
                            peft_options={"r": args.lora_r, "lora_alpha": 2 * args.lora_r}, max_length=args.max_length)

    print("indexing the answer base with model.encode")
    generator = LaFormerForCausalLM.from_pretrained(args.model)
    tokenizer = LaFormerTokenizer.from_pretrained(args.model)
    examples: dict[str, list[str]] = {}
    for text, label in zip(train_texts, train_labels):
        if len(examples.setdefault(label, [])) < args.questions_per_intent:
            examples[label].append(text)
    torch.save(answer_index(generator, tokenizer, answers, examples), output / "answer_index.pt")
    (output / "assistant.json").write_text(json.dumps({"generator": str(args.model), "threshold": args.threshold}))

    report = evaluate(args, output, answers, generator, tokenizer)
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    transcript = demo_transcript(output, args.threshold, args.demo_questions, args.max_new_tokens)
    (output / "transcript.md").write_text(transcript)
    print(transcript)
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    print(f"artifacts in {output}")
    return report


def evaluate(args: argparse.Namespace, output: Path, answers: dict[str, str], generator, tokenizer) -> dict:
    texts, labels = sample(*load_classification_data(args.data / "validation.jsonl"), args.eval_examples, args.seed)
    classifier, cls_tokenizer, meta = load_finetuned(output / "classifier")
    print(f"evaluating on {len(texts)} validation questions")
    predictions = chunked(lambda chunk: classify(classifier, cls_tokenizer, chunk, batch_size=32,
                                                 max_length=meta["max_length"]), texts, "classifying")
    predicted = [p["label"] for p in predictions]
    intents = list(answers)
    truth = torch.tensor([intents.index(label) for label in labels])
    questions = chunked(lambda chunk: generator.encode(chunk, tokenizer, batch_size=32, max_length=64), texts,
                        "embedding questions")
    answer_only = torch.nn.functional.normalize(generator.encode(answer_documents(answers), tokenizer, max_length=96), dim=-1)
    indexed = questions @ torch.load(output / "answer_index.pt").T
    unsure = [p["score"] < args.threshold for p in predictions]
    retrieved = indexed.argmax(-1).tolist()
    routed = [intents[r] if u else p for p, u, r in zip(predicted, unsure, retrieved)]
    majority = max(set(labels), key=labels.count)
    ids = {intent: i for i, intent in enumerate(intents)}
    intent = classification_summary(truth.tolist(), [ids[p] for p in predicted], intents)
    return {
        "validation_questions": len(texts),
        "intent_accuracy": round(intent["accuracy"], 4),
        "intent_macro_f1": round(intent["macro_f1"], 4),
        "majority_baseline_accuracy": round(labels.count(majority) / len(labels), 4),
        "retrieval_answer_only": {"recall@1": round(recall_at(questions @ answer_only.T, truth, 1), 4),
                                  "recall@5": round(recall_at(questions @ answer_only.T, truth, 5), 4)},
        "retrieval_answer_plus_examples": {"recall@1": round(recall_at(indexed, truth, 1), 4),
                                           "recall@5": round(recall_at(indexed, truth, 5), 4)},
        "routed_to_retrieval": round(sum(unsure) / len(unsure), 4),
        "routed_accuracy": round(sum(r == t for r, t in zip(routed, labels)) / len(labels), 4),
    }


def demo_transcript(output: Path, threshold: float, count: int, max_new_tokens: int) -> str:
    assistant = Assistant(output, threshold, max_new_tokens)
    lines = ["# Customer-service assistant: sample conversation", ""]
    for question in tqdm(DEMO_QUESTIONS[:count], desc="sample replies", unit="reply"):
        r = assistant.reply(question)
        lines += [f"**Customer:** {r.question}", "",
                  f"*intent `{r.intent}` (confidence {r.confidence:.2f}, via {r.source})*", "",
                  f"**Assistant:** {r.reply}", ""]
    return "\n".join(lines)


# -- chat and serve ------------------------------------------------------------------------------------------------

def chat(args: argparse.Namespace) -> None:
    assistant = Assistant(args.output, args.threshold, args.max_new_tokens)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Ask the bank's assistant (empty line or Ctrl-D to quit).")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            break
        r = assistant.reply(line.strip())
        print(f"[{r.intent} {r.confidence:.2f} via {r.source}]")
        print(f"assistant> {r.reply}", flush=True)


def build_app(assistant: Assistant):
    """A thin FastAPI app over ``Assistant``: POST /reply {"message"} -> the Reply as JSON."""
    fastapi = require("fastapi", "serve", "the customer-service HTTP service")
    pydantic = require("pydantic", "serve", "the customer-service HTTP service")

    class Message(pydantic.BaseModel):
        message: str = pydantic.Field(min_length=1, max_length=2000)

    app = fastapi.FastAPI(title="laformer customer-service assistant")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "intents": len(assistant.intents)}

    @app.post("/reply")
    def reply(body: Message) -> dict:
        return asdict(assistant.reply(body.message))

    return app


def serve(args: argparse.Namespace) -> None:
    uvicorn = require("uvicorn", "serve", "the customer-service HTTP service")
    app = build_app(Assistant(args.output, args.threshold, args.max_new_tokens))
    uvicorn.run(app, host="127.0.0.1", port=args.port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder of the trained assistant")
    common.add_argument("--threshold", type=float, default=None,
                        help="below this classifier confidence the answer base is searched instead (default: 0.5 "
                             "when training, then the trained value)")
    common.add_argument("--max-new-tokens", type=int, default=80)
    run = commands.add_parser("train", parents=[common], help="fine-tune, index the answers, evaluate, demo")
    run.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.jsonl and validation.jsonl")
    run.add_argument("--answers", type=Path, default=DEFAULT_ANSWERS, help="JSONL of {intent, answer}")
    run.add_argument("--model", default=DEFAULT_MODEL, help="base model (classifier, embeddings and replies)")
    run.add_argument("--method", default="lora", help="fine-tuning method (lora, adalora, adapter, prefix, full)")
    run.add_argument("--lora-r", type=int, default=8)
    run.add_argument("--train-examples", type=int, default=0, help="questions sampled for training (0: all)")
    run.add_argument("--eval-examples", type=int, default=0, help="validation questions evaluated (0: all)")
    run.add_argument("--steps", type=int, default=200)
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--max-length", type=int, default=32)
    run.add_argument("--lr", type=float, default=2e-3)
    run.add_argument("--questions-per-intent", type=int, default=8, help="training questions added to each answer key")
    run.add_argument("--demo-questions", type=int, default=len(DEMO_QUESTIONS))
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=train)
    commands.add_parser("chat", parents=[common], help="terminal chat (reads stdin)").set_defaults(func=chat)
    web = commands.add_parser("serve", parents=[common], help="HTTP service on 127.0.0.1")
    web.add_argument("--port", type=int, default=8000)
    web.set_defaults(func=serve)
    args = parser.parse_args(argv)
    if args.command == "train":
        args.threshold = 0.5 if args.threshold is None else args.threshold
        missing = [split for split in ("train.jsonl", "validation.jsonl") if not (args.data / split).is_file()]
        if missing:
            parser.error(f"BANKING77 not found: {args.data} lacks {', '.join(missing)}; pass --data (the folder "
                         "with train.jsonl and validation.jsonl)")
        if not args.answers.is_file():
            parser.error(f"answer base {args.answers} does not exist; pass --answers (JSONL of {{intent, answer}})")
    elif not (args.output / "assistant.json").is_file():
        parser.error(f"{args.output} holds no trained assistant; run `assistant.py train --output {args.output}` first")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.func(args)
    except LaFormerError as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
