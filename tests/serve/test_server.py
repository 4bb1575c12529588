"""``laformer serve`` itself: the CLI in a subprocess, what it loads (adapters merged), and its missing-extra error."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from tiny import save_tiny_base, tiny_causal_lm


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_cli_serves_with_an_api_key_until_stopped(base):
    port = free_port()
    command = [sys.executable, "-m", "laformer", "serve", str(base), "--port", str(port), "--api-key", "k",
               "--model-name", "tiny", "--max-batch", "2", "--threads", "1", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # bounded: the model loads in about a second
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.1)
        body = {"model": "tiny", "prompt": "the movie was", "max_tokens": 4, "temperature": 0}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        reply = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] <= 4
        chat = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer k"},
                          json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "chat template" in chat.json()["error"]["message"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_an_adapter_folder_is_merged_into_the_served_model(base, tmp_path):
    from laformer.peft import LoraConfig, get_peft_model, save_adapter
    from laformer.serve import load_served

    tuned = get_peft_model(tiny_causal_lm(), LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained-looking adapter (B starts at zero)
    save_adapter(tuned, tmp_path / "adapter")
    served = load_served(str(base), adapter=str(tmp_path / "adapter"), max_batch=1, max_length=32)
    try:
        assert getattr(served.model, "peft_config", None) is None
        ids = torch.tensor([[3, 4, 5, 6]])
        with torch.no_grad():
            torch.testing.assert_close(served.model(ids).logits, tuned.eval()(ids).logits, atol=1e-5, rtol=1e-4)
    finally:
        served.close()


def test_a_missing_serve_extra_names_the_pip_install(monkeypatch, capsys, base):
    from laformer.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now fails as if it were not installed
    assert main(["serve", str(base)]) == 1
    assert 'pip install "laformer[serve]"' in capsys.readouterr().err
