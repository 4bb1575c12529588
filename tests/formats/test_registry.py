"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' own GGUF loading of the same file."""

from __future__ import annotations

import pytest
import torch

from laformer import LaFormerForCausalLM
from laformer.generation import generate

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]


def test_default_model_config_and_storage(default_model):
    config = default_model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0 and config.max_position_embeddings == 8192
    types = list(default_model.checkpoint_info["tensor_types"].values())
    assert (types.count("Q4_1"), types.count("Q8_0"), types.count("F32")) == (210, 1, 61)
    assert default_model.lm_head.weight.data_ptr() == default_model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(default_model, hf_gguf_reference, prompt):
    hf_model, hf_tokenizer = hf_gguf_reference
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = default_model(ids).logits
        theirs = hf_model(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-3


def test_greedy_continuation_matches_transformers(default_model, hf_gguf_reference):
    hf_model, hf_tokenizer = hf_gguf_reference
    ids = hf_tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = hf_model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                   pad_token_id=hf_tokenizer.eos_token_id)
    ours = generate(default_model, ids, max_new_tokens=32, eos_token_id=[])
    assert ours.shape == (1, ids.shape[1] + 32)
    assert ours.tolist() == theirs.tolist()


def test_bfloat16_load_is_close(default_gguf_path, default_model):
    model = LaFormerForCausalLM.from_pretrained(default_gguf_path, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378]])
    with torch.no_grad():
        low = model(ids).logits.float()
        full = default_model(ids).logits
    # bfloat16 keeps ~3 significant digits: logits move by ~2.5% of their size, the distributions barely.
    assert (low - full).abs().mean().item() < 0.05 * full.abs().mean().item()
    kl = (full.softmax(-1) * (full.log_softmax(-1) - low.log_softmax(-1))).sum(-1)
    assert kl.max().item() < 0.02
    assert (low.argmax(-1) == full.argmax(-1)).float().mean().item() >= 0.8
