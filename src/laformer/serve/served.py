"""What one server serves: the model, its tokenizer, its task and (for a causal LM) the batching scheduler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from laformer.serve.errors import APIError
from laformer.serve.scheduler import Scheduler

CAUSAL_LM, CLASSIFICATION = "causal-lm", "classification"


@dataclass
class ServedModel:
    """``max_length`` bounds prompt + completion (the scheduler's cache) and every embedded or classified input."""

    name: str
    model: nn.Module
    tokenizer: object
    task: str = CAUSAL_LM
    max_length: int = 2048
    classify_max_length: int | None = None  # the fine-tune's training length, applied by /v1/classify
    scheduler: Scheduler | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def start(cls, name: str, model: nn.Module, tokenizer, *, task: str = CAUSAL_LM, max_batch: int = 8,
              max_length: int = 2048, max_queue: int = 64, classify_max_length: int | None = None) -> ServedModel:
        """Serve ``model``; a causal LM gets its scheduler thread (``close`` stops it)."""
        max_length = min(max_length, model.config.max_position_embeddings)
        scheduler = None
        if task == CAUSAL_LM:
            scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_length=max_length, max_queue=max_queue)
        return cls(name, model, tokenizer, task, max_length, classify_max_length, scheduler)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    def check_model(self, requested: str | None) -> None:
        """A request naming another model gets OpenAI's 404, so a misconfigured client fails loudly."""
        if requested is not None and requested != self.name:
            raise APIError(404, f"The model {requested!r} does not exist; this server serves {self.name!r} "
                                "(see GET /v1/models)", "model_not_found", "model")

    def require_task(self, task: str, endpoint: str) -> None:
        if self.task != task:
            hint = "/v1/classify and /v1/embeddings" if self.task == CLASSIFICATION else \
                "/v1/chat/completions, /v1/completions and /v1/embeddings"
            raise APIError(400, f"{endpoint} needs a {task} model, but {self.name!r} is a {self.task} model; use "
                                f"{hint} with it", "wrong_model_task")


def default_name(model_arg: str) -> str:
    """The model id clients send: a registry name as given, a file or folder by its name without suffix."""
    path = Path(model_arg)
    return path.stem if path.suffix == ".gguf" else path.name if path.exists() else model_arg
