"""The default model's evaluation text and its float perplexity, shared by the int8 and int4 checks."""

from __future__ import annotations

import pytest
import torch

from laformer.prune import perplexity

TEXT = (
    "The history of the city begins in the Roman period, when a small settlement grew up at a crossing of the "
    "river. Over the following centuries it became a market town, and by the middle ages it was one of the "
    "largest ports of the region. Its cathedral, begun in the twelfth century, took almost two hundred years to "
    "complete, and the old town around it still follows the street plan of that time."
)


@pytest.fixture(scope="package")
def eval_ids(default_tokenizer):
    return torch.tensor(default_tokenizer.encode(TEXT))


@pytest.fixture(scope="package")
def fp32_perplexity(default_model, eval_ids):
    return perplexity(default_model, eval_ids)

