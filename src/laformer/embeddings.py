"""Sentence embeddings from any laformer model: mean of the decoder's last hidden states over real tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from laformer.errors import ConfigError


@torch.no_grad()
def encode(
    model: torch.nn.Module,
    tokenizer,
    texts: str | Sequence[str],
    batch_size: int = 16,
    max_length: int = 512,
    normalize: bool = True,
) -> torch.Tensor:
    """Embed ``texts`` as a float32 (N, hidden) tensor, L2-normalised unless ``normalize=False``.

    Works with the bare decoder, the causal LM and the classifier alike (only ``model.decoder`` runs). Texts are
    batched by length so little compute goes to padding; the result keeps the input order.
    """
    if batch_size < 1 or max_length < 1:
        raise ConfigError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    texts = [texts] if isinstance(texts, str) else list(texts)

    def pool(chunk: list[str]) -> torch.Tensor:
        batch = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", truncation=True,
                          max_length=max_length)
        return _mean_pool(model.decoder, batch.input_ids, batch.attention_mask)

    return _by_length(model, texts, pool, batch_size, normalize)


@torch.no_grad()
def encode_ids(
    model: torch.nn.Module, ids: Sequence[Sequence[int]], batch_size: int = 16, normalize: bool = True
) -> torch.Tensor:
    """Embed inputs that are already token ids (lists of ints, e.g. what an OpenAI client sends) as ``encode``
    embeds texts."""
    if batch_size < 1 or any(not row for row in ids):
        raise ConfigError("encode_ids needs batch_size >= 1 and non-empty id lists")

    def pool(chunk: list[Sequence[int]]) -> torch.Tensor:
        width = max(len(row) for row in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, row in enumerate(chunk):  # left padding, as encode's tokenizer call
            input_ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        return _mean_pool(model.decoder, input_ids, mask)

    return _by_length(model, list(ids), pool, batch_size, normalize)


def _by_length(model: torch.nn.Module, items: list, pool, batch_size: int, normalize: bool) -> torch.Tensor:
    """``pool`` over chunks of similar length (little padding), the rows put back in input order."""
    if not items:
        return torch.empty(0, model.decoder.config.hidden_size)
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    pooled = [pool([items[i] for i in order[start: start + batch_size]]) for start in range(0, len(items), batch_size)]
    embeddings = torch.empty(len(items), pooled[0].shape[-1])
    embeddings[order] = torch.cat(pooled).cpu()
    return F.normalize(embeddings, dim=-1) if normalize else embeddings


def _mean_pool(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    device = decoder.embed_tokens.weight.device
    mask = attention_mask.to(device)
    hidden = decoder(input_ids.to(device), attention_mask=mask).last_hidden_state.float()  # (B, T, D)
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
