"""``/v1/embeddings`` and ``/v1/classify``: inputs in, vectors or labels out, computed off the event loop."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from laformer.embeddings import encode_ids
from laformer.serve.completions import check_token_ids
from laformer.serve.errors import bad_request, unsupported
from laformer.serve.metrics import Metrics
from laformer.serve.protocol import ClassifyRequest, EmbeddingRequest
from laformer.serve.served import CLASSIFICATION, ServedModel


def embedding_inputs(served: ServedModel, request: EmbeddingRequest) -> list[list[int]]:
    """Token ids of every input (a string, strings, ids or id lists), each within the served length."""
    data = request.input
    items = [data] if isinstance(data, str) or (data and all(isinstance(x, int) for x in data)) else list(data)
    if not items:
        raise bad_request("input is empty; send a string, a list of strings or token ids", "input")
    ids = []
    for i, item in enumerate(items):
        if isinstance(item, str) and not item:
            raise bad_request(f"input[{i}] is an empty string; embeddings need some text", "input")
        row = check_token_ids(served, served.tokenizer.encode(item) if isinstance(item, str) else list(item),
                              f"input[{i}]")
        if len(row) > served.max_length:
            raise bad_request(f"input[{i}] has {len(row)} tokens, more than the {served.max_length} this server "
                              "embeds at once; split the text", "input", "context_length_exceeded")
        ids.append(row)
    return ids


async def embeddings(served: ServedModel, metrics: Metrics, request: EmbeddingRequest) -> dict[str, Any]:
    from starlette.concurrency import run_in_threadpool

    served.check_model(request.model)
    hidden = served.model.config.hidden_size
    if request.dimensions not in (None, hidden):
        raise unsupported("dimensions", f"this model's embeddings have {hidden} dimensions; omit the field")
    ids = embedding_inputs(served, request)
    vectors = (await run_in_threadpool(encode_ids, served.model, ids)).numpy()
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, request.encoding_format)}
            for i, v in enumerate(vectors)]
    tokens = sum(len(row) for row in ids)
    metrics.count_usage(tokens)
    return {"object": "list", "data": data, "model": served.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A float list, or base64 of little-endian float32 (what the openai client asks for by default)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def classify(served: ServedModel, metrics: Metrics, request: ClassifyRequest) -> dict[str, Any]:
    """Labels and probabilities from a ``laformer finetune --task classification`` model."""
    from starlette.concurrency import run_in_threadpool

    from laformer.tasks import classify as classify_texts

    served.check_model(request.model)
    served.require_task(CLASSIFICATION, "/v1/classify")
    texts = [request.input] if isinstance(request.input, str) else list(request.input)
    if not texts or not all(texts):
        raise bad_request("input needs at least one non-empty text", "input")
    results = await run_in_threadpool(classify_texts, served.model, served.tokenizer, texts, 16,
                                      served.classify_max_length)
    tokens = sum(len(served.tokenizer.encode(t)) for t in texts)
    metrics.count_usage(tokens)
    return {"object": "list", "model": served.name, "data": [{"index": i, **r} for i, r in enumerate(results)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
