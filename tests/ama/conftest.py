import pytest

from ama.helpers import ama_config
from laformer import LaFormerForCausalLM


@pytest.fixture(scope="module")
def tiny_model() -> LaFormerForCausalLM:
    return LaFormerForCausalLM.from_config(ama_config(), seed=0).eval()


@pytest.fixture
def native_arithmetic(monkeypatch):
    """Quantized products on the PyTorch path computed as the native decode step computes them (activations
    rounded to int8 blocks of 32, the one-row kernel for any number of rows), so that the eager reference and
    the native step can agree token for token; tests/inference/conftest.py's ``int8_activations`` does the same."""
    from laformer.quantization import kernels, linear

    def qgemm(x, qweight, scales, mins, bits, group_size):
        return kernels.ctypes_kernel()(x, qweight, scales, mins, bits, group_size, int8_activations=True)

    monkeypatch.setattr(kernels, "qgemm", qgemm)
    monkeypatch.setattr(linear, "KERNEL_MAX_ROWS", 1 << 30)
