"""Prefix tuning as an attention-backend wrapper: gradients, KV cache, generation, padding, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from laformer import CheckpointError, ConfigError, LaFormerForCausalLM
from laformer.attention import sdpa_attention
from laformer.peft import PrefixAttention, PrefixConfig, get_peft_model, load_adapter, save_adapter, unload

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8], [9, 7, 9, 3, 2, 38, 4, 6]])


NO_EOS = dict(eos_token_id=None)  # generation runs its full length


def prefixed(base: LaFormerForCausalLM, projection: bool = False) -> LaFormerForCausalLM:
    model = get_peft_model(base, PrefixConfig(num_virtual_tokens=5, prefix_projection=projection,
                                              encoder_hidden_size=16))
    with torch.no_grad():  # a prefix that matters, as after training
        model.prefix_encoder.embedding.weight.normal_(std=1.0)
    return model


def test_prefix_changes_output_and_only_it_trains(tiny_model):
    base = tiny_model(**NO_EOS)
    with torch.no_grad():
        before = base(TOKENS).logits
    model = prefixed(tiny_model(**NO_EOS))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prefix_encoder.embedding.weight"}
    assert isinstance(model.model.layers[1].self_attn.backend, PrefixAttention)
    with torch.no_grad():
        assert (model(TOKENS).logits - before).abs().max() > 1e-3
    model.train()
    model(TOKENS, labels=TOKENS).loss.backward()
    assert model.prefix_encoder.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("prefix_encoder"))


def test_backend_matches_explicit_attention_over_prefix_and_keys(tiny_model):
    model = prefixed(tiny_model(**NO_EOS))
    backend = model.model.layers[1].self_attn.backend
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    out = backend(q, k, v, None, layer_idx=1, cache=None)
    pk, pv = model.prefix_encoder.layer_prefix(1)
    keys = torch.cat([pk.expand(2, -1, -1, -1), k], 2).repeat_interleave(2, dim=1)  # (B, H, P + S, D)
    values = torch.cat([pv.expand(2, -1, -1, -1), v], 2).repeat_interleave(2, dim=1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(8)
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    allowed = torch.cat([torch.ones(3, 5, dtype=torch.bool), causal], dim=1)
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_prefix_stays_out_of_the_cache_and_cached_decoding_matches_recompute(tiny_model):
    model = prefixed(tiny_model(**NO_EOS))
    with torch.no_grad():
        out = model(TOKENS, use_cache=True)
        assert out.past_key_values.get_seq_length() == TOKENS.shape[1]
        generated = model.generate(TOKENS, max_new_tokens=6)
        ids = TOKENS
        for _ in range(6):  # the same greedy decoding without a cache, recomputing everything
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


def test_left_padding_gives_the_unpadded_result(tiny_model):
    model = prefixed(tiny_model(**NO_EOS), projection=True)
    short = torch.tensor([[7, 3, 11, 5]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)
    batch = torch.cat([padded, TOKENS[:1, :7]], dim=0)
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    with torch.no_grad():
        alone = model(short).logits[0, -1]
        together = model(batch, attention_mask=mask).logits[0, -1]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_projection_computes_each_layers_slice_of_the_mlp(tiny_model):
    model = prefixed(tiny_model(**NO_EOS), projection=True)
    encoder = model.prefix_encoder
    assert encoder.transform is not None and encoder.transform[2].out_features == 2 * 2 * 2 * 8
    full = encoder.transform(encoder.embedding.weight).view(5, 2, 2, 2, 8)  # (P, layer, k/v, Hkv, D)
    for layer in range(2):
        pk, pv = encoder.layer_prefix(layer)
        assert pk.shape == (2, 5, 8)
        torch.testing.assert_close(pk, full[:, layer, 0].transpose(0, 1))
        torch.testing.assert_close(pv, full[:, layer, 1].transpose(0, 1))


def test_save_load_round_trip_and_unload(tmp_path, tiny_model):
    model = prefixed(tiny_model(**NO_EOS), projection=True)
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny_model(**NO_EOS), tmp_path)
    assert fresh.peft_config == model.peft_config
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS).logits, model(TOKENS).logits, atol=0, rtol=0)
    unload(fresh)
    assert fresh.model.layers[0].self_attn.backend is sdpa_attention and not hasattr(fresh, "prefix_encoder")
    with torch.no_grad():
        torch.testing.assert_close(fresh(TOKENS).logits, tiny_model(**NO_EOS)(TOKENS).logits, atol=0, rtol=0)


def test_errors(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PrefixConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="needs a laformer model"):
        get_peft_model(torch.nn.Linear(2, 2), PrefixConfig())
    save_adapter(prefixed(tiny_model(**NO_EOS)), tmp_path)
    with pytest.raises(CheckpointError, match="different base model"):
        load_adapter(tiny_model(**NO_EOS, num_key_value_heads=4), tmp_path)


def test_padded_batch_generation_matches_each_prompt_alone(tiny_model):
    model = prefixed(tiny_model(**NO_EOS))
    short, long = torch.tensor([[7, 3, 11]]), TOKENS[:1, :6]
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (torch.arange(6)[None] >= torch.tensor([[3], [0]])).long()
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
        assert torch.equal(together[0, 6:], model.generate(short, max_new_tokens=4)[0, 3:])
        assert torch.equal(together[1, 6:], model.generate(long, max_new_tokens=4)[0, 6:])
