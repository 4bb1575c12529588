import pytest

from ama.helpers import ama_config
from laformer import LaFormerForCausalLM


@pytest.fixture(scope="module")
def tiny_model() -> LaFormerForCausalLM:
    return LaFormerForCausalLM.from_config(ama_config(), seed=0).eval()
