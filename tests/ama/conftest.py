import pytest
from _training_helpers import tiny_config

from laformer import LaFormerForCausalLM


@pytest.fixture(scope="module")
def tiny_model() -> LaFormerForCausalLM:
    """A 2-layer random causal LM (4 query / 2 KV heads of 16) with room for AMA's long-context tests."""
    config = tiny_config(vocab_size=97, hidden_size=64, intermediate_size=128, max_position_embeddings=512,
                         rope_theta=10000.0, pad_token_id=None)
    return LaFormerForCausalLM.from_config(config, seed=0).eval()
