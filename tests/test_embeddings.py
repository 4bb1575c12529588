"""Sentence embeddings: padding invariance, unit norm, order, every model class, semantic sanity."""

from __future__ import annotations

import pytest
import torch

from laformer import (
    ConfigError,
    LaFormerForCausalLM,
    LaFormerForSequenceClassification,
    LaFormerModel,
)
from laformer.embeddings import encode

BYTES = dict(vocab_size=260, hidden_size=64, intermediate_size=128, max_position_embeddings=128)  # 256 bytes + pad


class ByteTokenizer:
    """UTF-8 bytes as ids, padded with 256: the tokenizer interface ``encode`` relies on."""

    def __call__(self, texts, return_tensors="pt", padding=True, padding_side="left", truncation=False,
                 max_length=None):
        rows = [list(t.encode())[: max_length if truncation else None] for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), 256)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            ids[i, span], mask[i, span] = torch.tensor(row), 1
        return type("Batch", (), {"input_ids": ids, "attention_mask": mask})()


@pytest.fixture(scope="module")
def model(tiny_model) -> LaFormerModel:
    return tiny_model(model_class=LaFormerModel, **BYTES)


def test_padding_does_not_change_an_embedding(model):
    tokenizer = ByteTokenizer()
    alone = encode(model, tokenizer, ["short text"])
    padded = encode(model, tokenizer, ["a much longer text that forces padding onto the short one", "short text"])
    torch.testing.assert_close(padded[1:], alone, atol=1e-5, rtol=1e-5)


def test_unit_norm_and_input_order(model):
    tokenizer = ByteTokenizer()
    texts = ["ccc ccc ccc", "a", "bb bb", "dddd dddd dddd dddd", "e"]
    batched = encode(model, tokenizer, texts, batch_size=2)
    assert batched.shape == (5, 64) and batched.dtype == torch.float32
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(5))
    one_by_one = torch.cat([encode(model, tokenizer, [t]) for t in texts])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    raw = encode(model, tokenizer, texts, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), batched, atol=1e-5, rtol=1e-5)


def test_truncation_and_empty_input(model):
    tokenizer = ByteTokenizer()
    torch.testing.assert_close(encode(model, tokenizer, "abcdefgh", max_length=3), encode(model, tokenizer, "abc"))
    assert encode(model, tokenizer, []).shape == (0, 64)


@pytest.mark.parametrize("cls", [LaFormerModel, LaFormerForCausalLM, LaFormerForSequenceClassification])
def test_every_model_class_embeds_through_its_decoder(cls, tiny_model):
    model = tiny_model(model_class=cls, **BYTES)
    tokenizer = ByteTokenizer()
    expected = encode(model.decoder, tokenizer, ["hello", "world"])
    torch.testing.assert_close(model.encode(["hello", "world"], tokenizer), expected)


@pytest.mark.parametrize("options", [dict(batch_size=0), dict(max_length=0)])
def test_invalid_options_raise(model, options):
    with pytest.raises(ConfigError):
        encode(model, ByteTokenizer(), ["x"], **options)


def test_paraphrase_is_nearer_than_unrelated(default_model, default_tokenizer):
    texts = [
        "The cat is sleeping on the sofa.",
        "A cat naps on the couch.",
        "Quarterly revenue rose by eight percent.",
    ]
    emb = default_model.encode(texts, default_tokenizer)
    similarity = emb @ emb.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[1, 0] > similarity[1, 2]
