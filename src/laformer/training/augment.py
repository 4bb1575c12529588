"""Opt-in data augmentation: EDA-style word edits and back-translation through the model's own generation.

EDA (Wei & Zou, 2019) edits a few words per text: synonym replacement, random swap, random deletion.
Synonyms come from a user mapping (``--synonyms FILE``, a JSON ``{"word": ["synonym", ...]}``) merged
over a small built-in English table; the randomness comes from the ``rng`` the dataset passes, so
augmented epochs are reproducible and resumable.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from laformer.errors import TrainingError

BUILTIN_SYNONYMS: dict[str, list[str]] = {
    "good": ["fine", "nice", "decent"], "great": ["excellent", "terrific", "superb"],
    "bad": ["poor", "awful", "lousy"], "terrible": ["awful", "dreadful", "horrible"],
    "movie": ["film", "picture"], "film": ["movie", "picture"], "funny": ["amusing", "comic", "humorous"],
    "boring": ["dull", "tedious", "tiresome"], "beautiful": ["lovely", "gorgeous", "pretty"],
    "big": ["large", "huge"], "small": ["little", "tiny"], "fast": ["quick", "rapid"], "slow": ["sluggish", "unhurried"],
    "happy": ["glad", "pleased", "cheerful"], "sad": ["unhappy", "sorrowful", "gloomy"],
    "smart": ["clever", "bright"], "stupid": ["dumb", "foolish"], "story": ["tale", "narrative"],
    "increase": ["rise", "growth"], "decrease": ["decline", "drop", "fall"], "profit": ["earnings", "gain"],
    "loss": ["deficit"], "company": ["firm", "business"], "sales": ["revenue", "turnover"],
    "buy": ["purchase"], "help": ["assist", "aid"], "problem": ["issue", "trouble"], "money": ["funds", "cash"],
    "card": ["bank card"], "account": ["balance"], "wrong": ["incorrect", "mistaken"], "need": ["require", "want"],
    "very": ["really", "extremely"], "start": ["begin"], "end": ["finish", "close"], "show": ["display", "reveal"],
}


@dataclass
class EDA:
    """Randomly applies one of synonym replacement, swap or deletion to about ``alpha`` of a text's words."""

    alpha: float = 0.1
    synonyms: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(BUILTIN_SYNONYMS))
    operations: tuple[str, ...] = ("synonym", "swap", "delete")

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 0.5:
            raise TrainingError(f"EDA alpha {self.alpha} must be in (0, 0.5]; 0.1 is the paper's default")
        unknown = set(self.operations) - {"synonym", "swap", "delete"}
        if unknown or not self.operations:
            raise TrainingError(f"unknown EDA operation(s) {sorted(unknown)}; use 'synonym', 'swap' and/or 'delete'")

    def __call__(self, text: str, rng: random.Random) -> str:
        words = text.split()
        if len(words) < 2:
            return text
        n = max(1, round(self.alpha * len(words)))
        operation = rng.choice(self.operations)
        if operation == "synonym":
            candidates = [i for i, w in enumerate(words) if w.lower() in self.synonyms]
            for i in rng.sample(candidates, min(n, len(candidates))):
                words[i] = rng.choice(list(self.synonyms[words[i].lower()]))
        elif operation == "swap":
            for _ in range(n):
                i, j = rng.randrange(len(words)), rng.randrange(len(words))
                words[i], words[j] = words[j], words[i]
        else:
            kept = [w for w in words if rng.random() >= self.alpha]
            words = kept or [rng.choice(words)]
        return " ".join(words)


def load_synonyms(path: str | Path) -> dict[str, list[str]]:
    """Built-in synonyms updated with a JSON file ``{"word": ["synonym", ...]}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"cannot read synonyms from {path} ({exc}); give a JSON object of word -> list") from exc
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise TrainingError(f"{path} must hold a JSON object mapping each word to a list of synonyms")
    return {**BUILTIN_SYNONYMS, **{k.lower(): [str(s) for s in v] for k, v in data.items()}}


def back_translate(
    model: Any, tokenizer: Any, texts: Sequence[str], pivot: str = "French", max_new_tokens: int = 96, batch_size: int = 8
) -> list[str]:
    """Paraphrases made by translating into ``pivot`` and back with the model's own (greedy) generation.

    Only the first paragraph of each reply is kept (small models tend to add commentary after a blank line), and a
    paraphrase that comes back empty is replaced by its original text, so labels always stay paired. The quality
    is the model's: SmolLM2-135M translates poorly, so use a larger local checkpoint for real augmentation.
    """
    from laformer.generation import generate_text

    chat = bool(getattr(tokenizer, "chat_template", None))

    def translate(batch: list[str], source: str, target: str) -> list[str]:
        prompts = [f"Translate the following {source} text into {target}. Reply with the {target} translation only."
                   f"\n\n{t}" for t in batch]
        replies = generate_text(model, tokenizer, prompts, chat=chat, max_new_tokens=max_new_tokens)
        return [reply.strip().split("\n\n")[0].strip() for reply in replies]

    results: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        back = translate(translate(batch, "English", pivot), pivot, "English")
        results.extend(b or t for b, t in zip(back, batch))
    return results
