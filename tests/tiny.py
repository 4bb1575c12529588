"""The tiny things every test builds on (seconds, not minutes): configs and models, a word-level tokenizer,
sentiment-like data, a saved base folder, and a model's weights and metadata in llama.cpp's GGUF layout.

Plain functions, so the torchrun and kill -9 worker processes can build the same models; test functions get the
config and model factories as the ``tiny_config`` / ``tiny_model`` fixtures of conftest.py, whose ``write_gguf``
writes ``llama_metadata`` and ``llama_cpp_tensors`` to a file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from laformer import LaFormerConfig, LaFormerForCausalLM, LaFormerForSequenceClassification
from laformer.tokenizer import LaFormerTokenizer

POSITIVE = ["good", "great", "fine", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLER = ["the", "a", "movie", "film", "plot", "very", "was", "is", "and", "quite"]
WORDS = POSITIVE + NEGATIVE + FILLER + ["user", "assistant", ":", "hello", "hi", "there"]


def tiny_tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def byte_level_tokenizer():
    """A byte-level BPE tokenizer (what GGUF export needs) over lowercase letters and a space, with <s>, </s>, <pad>."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "Ġ": 3, **{c: i + 4 for i, c in enumerate(letters)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>", "<pad>"])
    return LaFormerTokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=False)


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
TOKENIZER_MATCHED = dict(vocab_size=len(WORDS) + 2, pad_token_id=0)  # the vocabulary of tiny_tokenizer()


def tiny_config(**overrides) -> LaFormerConfig:
    """Two layers, hidden 32, 4 query heads over 2 KV heads (grouped-query attention), context 64; overridable."""
    return LaFormerConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, model_class: type = LaFormerForCausalLM, **overrides):
    """A random ``model_class`` (causal LM unless told) of ``tiny_config(**overrides)``, in eval mode."""
    return model_class.from_config(tiny_config(**overrides), seed=seed).eval()


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py ``permute``: Hugging Face rotary halves -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_tensors(model: LaFormerForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp names, q/k permuted as the converter does."""
    config, state = model.config, model.state_dict()
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(config.num_hidden_layers):
        for gguf_part, hf_part in parts.items():
            w = state[f"model.layers.{i}.{hf_part}.weight"]
            if gguf_part == "attn_q":
                w = permute(w, config.num_attention_heads)
            elif gguf_part == "attn_k":
                w = permute(w, config.num_key_value_heads)
            tensors[f"blk.{i}.{gguf_part}.weight"] = w
    return tensors


def llama_metadata(config: LaFormerConfig, **extra) -> dict:
    """The ``llama.*`` and tokenizer keys convert_hf_to_gguf.py writes for ``config`` (``write_gguf``'s metadata)."""
    return dict(context_length=config.max_position_embeddings, embedding_length=config.hidden_size,
                block_count=config.num_hidden_layers, feed_forward_length=config.intermediate_size,
                head_count=config.num_attention_heads, head_count_kv=config.num_key_value_heads,
                layer_norm_rms_eps=config.rms_norm_eps, rope_freq_base=config.rope_theta,
                rope_dimension_count=config.head_dim, tokenizer_model="gpt2",
                token_list=[f"t{i}" for i in range(config.vocab_size)], bos_token_id=config.bos_token_id,
                eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, **extra)


def train_steps(model, tokens, steps: int = 3, lr: float = 1e-2):
    """A few AdamW steps of language modelling on ``tokens`` (enough to move any adapter off its start)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def tiny_classifier(seed: int = 0, labels=("negative", "positive")) -> LaFormerForSequenceClassification:
    config = tiny_config(**TOKENIZER_MATCHED, id2label=dict(enumerate(labels)))
    return LaFormerForSequenceClassification.from_config(config, seed=seed)


def tiny_causal_lm(seed: int = 0) -> LaFormerForCausalLM:
    return LaFormerForCausalLM.from_config(tiny_config(**TOKENIZER_MATCHED), seed=seed)


def sentiment_examples(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.choices(FILLER, k=rng.randint(1, 6)) + [rng.choice(POSITIVE if positive else NEGATIVE)]
        texts.append(" ".join(words + rng.choices(FILLER, k=rng.randint(0, 3))))
        labels.append("positive" if positive else "negative")
    return texts, labels


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_sentiment_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    texts, labels = sentiment_examples(n, seed)
    return write_jsonl(path, [{"text": t, "label": y} for t, y in zip(texts, labels)])


def save_tiny_base(folder: Path) -> Path:
    """A tiny causal LM saved as a Hugging Face folder with its tokenizer: what ``--model`` points at."""
    tiny_causal_lm().save_pretrained(folder)
    LaFormerTokenizer(tiny_tokenizer(), unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    return folder


def run_two_processes(worker_source: str, out: Path) -> None:
    """Run ``worker_source`` under torchrun with 2 gloo processes (1 thread each), ``out`` as its argument."""
    import os
    import subprocess
    import sys

    out.mkdir()
    script = out.parent / f"{out.name}_worker.py"
    tests = str(Path(__file__).parent)
    script.write_text(f"import sys\nsys.path.append({tests!r})  # after site-packages: tests/peft must not hide peft\n"
                      + worker_source)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
