"""Pruning: sparsity achieved, matrices really shrunk, pruned checkpoints reload, the cost report, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from laformer import ConfigError, GenerationError, LaFormerForCausalLM
from laformer.prune import magnitude_prune, perplexity, prune_ffn, prune_heads
from laformer.quantization import quantize_model


PRUNE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, tie_word_embeddings=True)


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75])
def test_magnitude_prune_per_layer_reaches_sparsity(sparsity, tiny_model):
    model = tiny_model(**PRUNE)
    achieved = magnitude_prune(model, sparsity)
    assert len(achieved) == 2 * 7
    for name, value in achieved.items():
        numel = model.get_submodule(name).weight.numel()
        assert abs(value - sparsity) <= 1 / numel + 1e-6, name
    assert model.model.embed_tokens.weight.ne(0).all()  # the embedding and tied head are left alone
    assert torch.isfinite(model(IDS).logits).all()


def test_magnitude_prune_global_threshold(tiny_model):
    model = tiny_model(**PRUNE)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.1)  # much smaller weights: pruned harder globally
    achieved = magnitude_prune(model, 0.5, scope="global")
    sizes = {n: model.get_submodule(n).weight.numel() for n in achieved}
    overall = sum(achieved[n] * sizes[n] for n in achieved) / sum(sizes.values())
    assert overall == pytest.approx(0.5, abs=1e-3)
    assert achieved["model.layers.0.mlp.down_proj"] > 0.9
    assert model.config.extra["pruning"]["magnitude"] == {"sparsity": 0.5, "scope": "global"}


def test_prune_ffn_shrinks_and_reloads(tmp_path, tiny_model):
    model = tiny_model(**PRUNE)
    assert prune_ffn(copy.deepcopy(model), 0.25) == [64, 64]  # rounded to a multiple of 32: stays quantizable
    sizes = prune_ffn(model, 0.25, multiple_of=1)
    assert sizes == [72, 72]
    mlp = model.model.layers[1].mlp
    assert mlp.gate_proj.weight.shape == (72, 64) and mlp.down_proj.weight.shape == (64, 72)
    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[1].mlp.up_proj.out_features == 72
    assert torch.equal(loaded(IDS).logits, logits)


def test_prune_ffn_keeps_the_important_channels(tiny_model):
    model = tiny_model(**PRUNE)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] *= 100  # channel 5 dominates the output
        model.model.layers[0].mlp.down_proj.weight[:, 7] = 0  # channel 7 contributes nothing
    original = copy.deepcopy(model.model.layers[0].mlp)
    prune_ffn(model, 0.5, multiple_of=1)
    kept = model.model.layers[0].mlp.down_proj.weight
    columns = [c for c in range(96) if any(torch.equal(kept[:, j], original.down_proj.weight[:, c]) for j in range(48))]
    assert 5 in columns and 7 not in columns


@pytest.mark.parametrize("calibrate", [False, True])
def test_prune_heads_removes_kv_groups_and_reloads(tmp_path, calibrate, tiny_model):
    model = tiny_model(**PRUNE)
    heads = prune_heads(model, 0.5, IDS if calibrate else None)
    assert heads == [[2, 1], [2, 1]]  # 4 heads in 2 KV groups -> 1 group of 2 query heads
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 32)
    logits = model(IDS).logits
    cached = model(IDS[:, :10], use_cache=True)  # the KV cache works with the smaller layers
    step = model(IDS[:, 10:11], past_key_values=cached.past_key_values).logits
    torch.testing.assert_close(step[:, -1], logits[:, 10], rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded(IDS).logits, logits)


def test_prune_heads_equals_zeroing_their_output(tiny_model):
    """Removing a group gives exactly the model whose o_proj ignores that group's query heads."""
    model = tiny_model(**PRUNE)
    reference = copy.deepcopy(model)
    prune_heads(model, 0.5)
    for ref, pruned in zip(reference.model.layers, model.model.layers):
        ref_q, pruned_q = ref.self_attn.q_proj.weight, pruned.self_attn.q_proj.weight
        kept = [r for r in range(64) if any(torch.equal(pruned_q[i], ref_q[r]) for i in range(32))]
        assert len(kept) == 32
        dropped = torch.ones(64, dtype=torch.bool)
        dropped[kept] = False
        with torch.no_grad():
            ref.self_attn.o_proj.weight[:, dropped] = 0
    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)


def test_pruned_then_quantized_roundtrip(tmp_path, tiny_model):
    model = tiny_model(**PRUNE)
    prune_ffn(model, 0.5)
    prune_heads(model, 0.5)
    quantize_model(model, "int4", 32)
    model.save_pretrained(tmp_path)
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_perplexity_report(tiny_model):
    model = tiny_model(**PRUNE)
    ids = IDS[0]
    value = perplexity(model, ids, window=5)
    assert math.isfinite(value) and 1 < value < 1000
    assert perplexity(model, ids, window=100) == pytest.approx(perplexity(model, ids[None], window=100))
    with pytest.raises(GenerationError, match="at least 2 tokens"):
        perplexity(model, ids[:1])


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.3"])
def test_bad_fractions_raise(bad, tiny_model):
    model = tiny_model(**PRUNE)
    for prune in (magnitude_prune, prune_ffn, prune_heads):
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            prune(model, bad)


def test_bad_scope_and_quantized_model_raise(tiny_model):
    with pytest.raises(ConfigError, match="scope"):
        magnitude_prune(tiny_model(**PRUNE), 0.3, scope="row")
    quantized = quantize_model(tiny_model(**PRUNE), "int8")
    with pytest.raises(ConfigError, match="prune before"):
        prune_ffn(quantized, 0.3)
    with pytest.raises(ConfigError, match="no float decoder linears"):
        magnitude_prune(quantized, 0.3)


def test_cli_prune(tmp_path, capsys, tiny_model):
    from laformer.cli import main

    tiny_model(**PRUNE).save_pretrained(tmp_path / "float")
    assert main(["prune", str(tmp_path / "float"), str(tmp_path / "out"), "--method", "ffn", "--sparsity", "0.5"]) == 0
    assert "ffn pruning" in capsys.readouterr().out
    loaded = LaFormerForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.model.layers[0].mlp.gate_proj.out_features == 64
    assert main(["prune", str(tmp_path / "float"), str(tmp_path / "o2"), "--sparsity", "1.0"]) == 1
    assert main(["prune", str(tmp_path / "float"), str(tmp_path / "o3"), "--method", "heads",
                 "--importance", "activations"]) == 1  # needs --eval-text
