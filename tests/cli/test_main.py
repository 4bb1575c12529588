"""The ``laformer`` command: help, generate, chat, info, convert, and error reporting."""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
import sys

import pytest
import torch

from laformer import LaFormerForCausalLM
from laformer.cli import common, main
from laformer.generation import generate
from laformer.inference import DecodeEngine

SUBCOMMANDS = ["generate", "chat", "info", "convert"]


@pytest.fixture
def default_loaded(monkeypatch, default_model, default_tokenizer):
    """Make every command use the session's default model instead of loading it again."""
    loads = []

    def load_model(args, model_class=None, with_tokenizer=True):
        loads.append(args.model)  # a copy: generation's decode engine fuses the model's projections in place
        return copy.deepcopy(default_model), default_tokenizer if with_tokenizer else None

    monkeypatch.setattr(common, "load_model", load_model)
    return loads


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, default_tokenizer, tiny_model):
    """A random two-layer model with the default tokenizer, saved as a Hugging Face folder (loads in a blink)."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(vocab_size=default_tokenizer.vocab_size, max_position_embeddings=256, tie_word_embeddings=True,
               eos_token_id=2).save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: laformer {command}") and "--dtype" in out


def test_installed_entry_point():
    exe = shutil.which("laformer")
    command = [exe, "--help"] if exe else [sys.executable, "-m", "laformer", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert all(name in result.stdout for name in SUBCOMMANDS)


def test_generate_chat_streams_the_answer_and_hides_stop_strings(default_loaded, capsys):
    args = ["generate", "What is the capital of France?", "--chat", "--max-new-tokens", "8"]
    assert main(args) == 0
    full = capsys.readouterr().out.strip()
    assert "Paris" in full and default_loaded == ["smollm2-135m-instruct"]
    assert main(args + ["--stop", "Paris"]) == 0
    assert capsys.readouterr().out.strip() == full[: full.index("Paris")].strip()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_generate_quantized_at_load_decodes_like_the_library(tmp_path, default_tokenizer, quantize, capsys,
                                                              tiny_model):
    tiny_model(vocab_size=default_tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
               tie_word_embeddings=True, eos_token_id=2,
               initializer_range=0.3).save_pretrained(tmp_path)  # widely spread logits: no near-ties between paths
    default_tokenizer.save_pretrained(tmp_path)
    assert main(["generate", "Hello", "--model", str(tmp_path), "--max-new-tokens", "6", "--quantize", quantize]) == 0
    out = capsys.readouterr().out
    model = LaFormerForCausalLM.from_pretrained(tmp_path, quantize=quantize)
    tokenizer = default_tokenizer
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    expected = generate(model, ids, max_new_tokens=6, engine=DecodeEngine(model))[0, ids.shape[1]:]
    assert out == tokenizer.decode(expected.tolist(), skip_special_tokens=True) + "\n"


def test_generate_from_a_folder_with_sampling(tiny_folder, capsys):
    args = ["generate", "Hello", "--model", str(tiny_folder), "--max-new-tokens", "5", "--temperature", "0.8",
            "--top-k", "20", "--top-p", "0.9", "--seed", "7", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
        first = capsys.readouterr().out
        assert main(args) == 0
        assert capsys.readouterr().out == first and first.endswith("\n")
    finally:
        torch.set_num_threads(threads)


def test_chat_keeps_history_and_resets(default_loaded, monkeypatch, capsys):
    import laformer.generation

    prompts = []
    real_stream = laformer.generation.stream

    def spy(model, input_ids, tokenizer, **options):
        prompts.append(tokenizer.decode(input_ids[0].tolist()))
        return real_stream(model, input_ids, tokenizer, **options)

    monkeypatch.setattr(laformer.generation, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("My name is Ada.\nWhat is my name?\n/reset\nHello\n/exit\nignored\n"))
    assert main(["chat", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "(conversation reset)" in out
    assert len(prompts) == 3
    assert "My name is Ada." in prompts[1] and prompts[1].count("<|im_start|>assistant") == 2
    assert "Ada" not in prompts[2]


def test_info_of_the_default_model(default_loaded, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for expected in ("LlamaForCausalLM", "134,515,008", "30", "576", "9 (KV heads 3", "1536", "49152", "8192",
                     "theta 100000", "Q4_1", "Q8_0", "F32", "gguf"):
        assert expected in out, expected


def test_info_of_a_folder(tiny_folder, capsys):
    assert main(["info", str(tiny_folder)]) == 0
    out = capsys.readouterr().out
    params = LaFormerForCausalLM.from_pretrained(tiny_folder).num_parameters()
    assert f"{params:,}" in out and "huggingface" in out and "float32 x" in out


def test_convert_default_model_matches_transformers(default_loaded, default_model, default_tokenizer, tmp_path,
                                                     capsys):
    transformers = pytest.importorskip("transformers")
    out_dir = tmp_path / "hf"
    assert main(["convert", "smollm2-135m-instruct", str(out_dir)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    text = "Converted models keep their logits: 你好 🙂"
    ids = default_tokenizer(text, return_tensors="pt").input_ids
    assert hf_tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        diff = (hf_model(ids).logits - default_model(ids).logits).abs().max().item()
    assert diff < 1e-3


def test_convert_folder_round_trip_and_refuses_to_overwrite(tiny_folder, tmp_path, capsys):
    out_dir = tmp_path / "copy"
    assert main(["convert", str(tiny_folder), str(out_dir)]) == 0
    original, copy = LaFormerForCausalLM.from_pretrained(tiny_folder), LaFormerForCausalLM.from_pretrained(out_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(copy(ids).logits, original(ids).logits)
    capsys.readouterr()
    assert main(["convert", str(tiny_folder), str(out_dir)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(tiny_folder), str(out_dir), "--overwrite"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "hi", "--model", "/no/such/model.gguf"], "no model at"),
        (["generate", "hi", "--temperature", "-1"], "--temperature"),
        (["info", "/no/such/folder"], "no model at"),
    ],
)
def test_errors_are_reported_with_exit_code_1(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("laformer: error:") and message in err


def test_generate_validation_error_from_the_library(tiny_folder, capsys):
    assert main(["generate", "hi", "--model", str(tiny_folder), "--max-new-tokens", "1000"]) == 1
    assert "context" in capsys.readouterr().err
