"""A real uvicorn server on 127.0.0.1 (a free port, in a thread) per model, shared by a test module."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'laformer[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'laformer[serve]'")


@contextmanager
def running_server(served, api_key: str | None = None):
    """Serve ``served`` until the block ends; yields the base URL (``http://127.0.0.1:PORT``)."""
    import uvicorn

    from laformer.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the server gets this socket: no race for the port
    config = uvicorn.Config(create_app(served, api_key), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def start_server():
    """``running_server`` for fixtures that serve a model of their own."""
    return running_server


@pytest.fixture(scope="session")
def small_lm(default_gguf_path):
    """The default model's first 4 layers: its real tokenizer and chat template, a fraction of the compute."""
    from laformer import LaFormerForCausalLM, LaFormerTokenizer

    model = LaFormerForCausalLM.from_pretrained(default_gguf_path, num_hidden_layers=4)
    return model, LaFormerTokenizer.from_pretrained(default_gguf_path)


@pytest.fixture(scope="module")
def small_server(small_lm):
    """``small_lm`` served as "small" with 4 rows of 256 tokens and a queue of 4; yields (base URL, ServedModel)."""
    from laformer.serve import ServedModel

    served = ServedModel.start("small", *small_lm, max_batch=4, max_length=256, max_queue=4)
    with running_server(served) as url:
        yield url, served


@pytest.fixture(scope="module")
def client(small_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=small_server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)
