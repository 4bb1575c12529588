"""The AMA attention backend (``ama/attention.py``): exactness, selection, mediation, padding, the gate."""

from __future__ import annotations

import math

import pytest
import torch

from ama.helpers import ama_config, backend, planted_keys, random_qkv
from laformer import LaFormerForCausalLM
from laformer.ama import AMAConfig, MediationGate, SelectionRecorder, SlicedKVCache
from laformer.ama.attention import AMAAttention, key_validity
from laformer.ama.cache import summarize, update_summaries
from laformer.attention import build_attention_mask, sdpa_attention


@pytest.mark.parametrize("mediation", ["off", "estimate"])
@pytest.mark.parametrize("query_len", [70, 21, 1])  # prefill, chunked prefill after a past, decode
def test_sparse_kernels_equal_full_attention_when_every_slice_fits(mediation, query_len):
    q, k, v = random_qkv(T=query_len)
    ama = backend(slice_len=8, budget=80, local_window=16, mediation=mediation)
    summaries = update_summaries(None, 0, k, v, None, 8, score="scan")
    if query_len == 1:
        out = ama._decode(q, k, v, None, summaries, 0, None)
    else:
        out = ama._prefill(q, k, v, None, None, summaries, 0, None)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, None), atol=1e-5, rtol=1e-5)

def test_model_with_budget_over_context_equals_full_attention(tiny_model):
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    full = tiny_model(ids, attention_mask=mask).logits
    tiny_model.decoder.set_attention(AMAConfig(slice_len=8, budget=64, local_window=16))
    try:
        ama = tiny_model(ids, attention_mask=mask).logits
        ama_gen = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=8)
    finally:
        tiny_model.decoder.set_attention(None)
    torch.testing.assert_close(ama, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(ama_gen, tiny_model.generate(ids, attention_mask=mask, max_new_tokens=8))

@pytest.mark.parametrize("score", ["scan", "bound", "mean"])
def test_decode_selects_the_slices_whose_keys_match_the_query(score):
    q, k, v = planted_keys()
    recorder = SelectionRecorder()
    cfg = AMAConfig(slice_len=4, budget=20, sink_slices=1, local_window=8, score=score)  # 2 slices to select
    ama = AMAAttention(cfg, torch.nn.Module())
    ama.recorder = recorder
    ama(q, k, v, None, layer_idx=0, cache=None)
    record = recorder.records[0]
    chosen = record.chosen[0, 0, 0].nonzero().flatten().tolist()
    assert chosen == [0, 5, 8, 10, 11]  # sink, the two planted slices, local window
    probs = record.probs[0, 0, 0]
    others = probs[[1, 2, 3, 4, 6, 7, 9]]
    assert sorted(probs.topk(2).indices.tolist()) == [5, 8] and probs[[5, 8]].min() > 2 * others.max()
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
    assert probs[[0, 10, 11]].sum() == 0  # sinks and the local window are not candidates

def test_prefill_block_serves_each_of_its_queries():
    """Two queries of one prefill block need different slices (3 and 6); a decoy slice (8) matches their mean
    query best but neither query well. Summing each query's scan mass picks the slices the queries need."""
    g = torch.Generator().manual_seed(0)
    D, L = 8, 4
    k = 0.1 * torch.randn(1, 1, 14 * L, D, generator=g)
    k[0, 0, 3 * L : 4 * L, 0] += 5.0
    k[0, 0, 6 * L : 7 * L, 1] += 5.0
    k[0, 0, 8 * L : 9 * L, :2] += 2.83
    q = torch.zeros(1, 1, 2, D)
    q[0, 0, 0, 0] = q[0, 0, 1, 1] = 1.0  # the block's queries: positions 54 and 55 of slice 13
    recorder = SelectionRecorder()
    ama = backend(slice_len=L, budget=20, sink_slices=1, local_window=8, query_block=2)  # 2 slices to choose
    ama.recorder = recorder
    ama(q, k, torch.randn_like(k), None, layer_idx=0, cache=None)
    chosen = recorder.records[0].chosen[0, 0, -1].nonzero().flatten().tolist()
    assert chosen == [0, 3, 6, 12, 13]

def test_prefill_blocks_select_causally():
    q, k, v = planted_keys(hot=(2, 9))
    q = q.expand(1, 2, k.shape[2], 8).contiguous()
    recorder = SelectionRecorder()
    ama = backend(slice_len=4, budget=16, sink_slices=1, local_window=8)  # 1 slice to select
    ama.recorder = recorder
    ama(q, k, v, None, layer_idx=0, cache=None)
    chosen = recorder.records[0].chosen[0, 0]  # (blocks, slices)
    assert chosen.shape == (12, 12)
    for block in range(12):
        assert not chosen[block, block + 1 :].any()  # never a future slice
    assert chosen[8, 2] and chosen[11, 9] and not chosen[11, 2]  # the best past hot slice wins

def test_gumbel_sampling_varies_but_keeps_sinks_and_window():
    q, k, v = planted_keys()
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        recorder = SelectionRecorder()
        ama = backend(slice_len=4, budget=16, sink_slices=1, local_window=8, sampling="gumbel", score="mean")
        ama.recorder = recorder
        ama(q * 0.01, k, v, None, layer_idx=0, cache=None)  # flat probabilities: sampling must vary
        chosen = recorder.records[0].chosen[0, 0, 0]
        assert chosen[[0, 10, 11]].all() and int(chosen.sum()) == 4
        seen.add(tuple(chosen.nonzero().flatten().tolist()))
    assert len(seen) > 1

def naive_ama(q, k, v, chosen_tokens, summaries, mediation):
    """One query per row: exact softmax over chosen tokens, plus one pseudo-token per unselected slice."""
    B, H, _, D = q.shape
    G = H // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scores = (q @ kk.transpose(-1, -2))[:, :, 0] / math.sqrt(D)  # (B, H, S)
    scores = scores.masked_fill(~chosen_tokens.repeat_interleave(G, 1), float("-inf"))
    if mediation == "off":
        return (scores.softmax(-1)[:, :, None] @ vv)
    mean_k = summaries["kmean"].repeat_interleave(G, 1)
    pseudo = (q @ mean_k.transpose(-1, -2))[:, :, 0] / math.sqrt(D) + summaries["count"].log()
    pseudo = pseudo.masked_fill(~summaries["unselected"].repeat_interleave(G, 1), float("-inf"))
    weights = torch.cat([scores, pseudo], -1).softmax(-1)
    values = torch.cat([vv, summaries["vmean"].repeat_interleave(G, 1)], 2)
    return weights[:, :, None] @ values

@pytest.mark.parametrize("mediation", ["off", "estimate"])
def test_decode_matches_naive_reference(mediation):
    q, k, v = random_qkv(T=1, S=75)  # 9 full slices of 8 and a partial one
    recorder = SelectionRecorder()
    ama = backend(slice_len=8, budget=40, local_window=16, mediation=mediation)
    ama.recorder = recorder
    out = ama(q, k, v, None, layer_idx=0, cache=None)
    chosen = recorder.records[0].chosen[:, :, 0]  # (B, Hkv, 10)
    chosen_tokens = chosen.repeat_interleave(8, -1)[..., :75]
    s = summarize(k, v, None, 8, 0, 9)
    unselected = ~chosen[..., :9]
    ref = naive_ama(q, k, v, chosen_tokens, dict(kmean=s.kmean, vmean=s.vmean, count=s.count,
                                                 unselected=unselected), mediation)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert int(chosen[0, 0].sum()) == 5  # budget 40 / slice 8

def test_mediation_brings_sparse_attention_closer_to_full():
    q, k, v = random_qkv(T=200, S=200, seed=3)
    full = sdpa_attention(q, k, v, None)
    errors = {}
    for mediation in ("off", "estimate"):
        out = backend(slice_len=8, budget=48, local_window=16, mediation=mediation)(q, k, v, None, layer_idx=0,
                                                                                    cache=None)
        errors[mediation] = (out - full).abs().mean()
    assert errors["estimate"] < 0.8 * errors["off"]

def test_padding_keys_are_never_read():
    q, k, v = random_qkv(B=2, T=1, S=90)
    padding = torch.ones(2, 90, dtype=torch.bool)
    padding[1, :13] = False
    mask = build_attention_mask(padding, 1, 90, q.device)
    ama = backend(slice_len=8, budget=40, local_window=16)
    out = ama(q, k, v, mask, layer_idx=0, cache=None)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, :13] = 1e4
    v2[1, :, :13] = -1e4
    torch.testing.assert_close(ama(q, k2, v2, mask, layer_idx=0, cache=None), out)
    prefill_mask = build_attention_mask(padding, 90, 90, q.device)
    q_full = random_qkv(B=2, T=90, S=90)[0]
    real = padding[:, None, :, None]
    before = ama(q_full, k, v, prefill_mask, layer_idx=0, cache=None) * real
    torch.testing.assert_close(ama(q_full, k2, v2, prefill_mask, layer_idx=0, cache=None) * real, before)

def test_key_validity_for_left_and_right_padding():
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    mask = build_attention_mask(padding, 5, 5, torch.device("cpu"))
    valid = key_validity(mask, 5)
    assert valid[0].tolist() == [False, False, True, True, True]
    assert valid[1].tolist() == [True, True, True, False, True]  # the last key counts as real whatever it is
    assert key_validity(mask[:, :, -1:], 1)[0].tolist() == padding[0].tolist()

def test_gather_slices_reads_the_same_blocks_from_any_layout():
    from laformer.ama.attention import gather_slices

    k = torch.randn(2, 3, 40, 4)
    sel = torch.randint(0, 4, (2, 3, 2))
    blocks = k[:, :, :32].unflatten(2, (4, 8))
    expected = blocks[torch.arange(2)[:, None, None], torch.arange(3)[None, :, None], sel]
    sliced, _ = SlicedKVCache(1, slice_len=8).update(k, k, 0)
    for x in (k, k[:, :, :37], sliced):  # whole-slice layout, per-row fallback, a sliced cache's view
        torch.testing.assert_close(gather_slices((x,), sel, 8)[0], expected)

def test_bfloat16_model_runs_sparse_and_stays_close():
    model = LaFormerForCausalLM.from_config(ama_config(), seed=0).eval()
    ids = torch.randint(0, 97, (1, 100), generator=torch.Generator().manual_seed(5))
    cfg = AMAConfig(slice_len=8, budget=48, local_window=16)
    model.decoder.set_attention(cfg)
    reference = model(ids).logits
    model.to(torch.bfloat16)
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)
    generated = model.generate(ids, max_new_tokens=5)
    assert generated.shape == (1, 105)

def test_learned_gate_starts_as_estimate_and_trains():
    model = LaFormerForCausalLM.from_config(ama_config(), seed=0)
    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(6))
    model.decoder.set_attention(AMAConfig(slice_len=8, budget=32, local_window=16, mediation="estimate"))
    estimate = model(ids).logits
    model.decoder.set_attention(AMAConfig(slice_len=8, budget=32, local_window=16, mediation="learned"))
    gates = [layer.self_attn.ama_gate for layer in model.model.layers]
    assert all(isinstance(g, MediationGate) for g in gates)
    assert "model.layers.0.self_attn.ama_gate.weight" in dict(model.named_parameters())
    torch.testing.assert_close(model(ids).logits, estimate)
    for name, p in model.named_parameters():
        p.requires_grad_("ama_gate" in name)  # the base frozen, as under LoRA
    model(ids, labels=ids).loss.backward()
    for gate in gates:
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
        assert gate.bias.grad.abs().sum() > 0

def test_learned_gate_trains_next_to_lora_with_the_base_frozen():
    from laformer.peft import LoraConfig, get_peft_model

    model = LaFormerForCausalLM.from_config(ama_config(), seed=0)
    model.decoder.set_attention(AMAConfig(slice_len=8, budget=32, local_window=16, mediation="learned"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["ama_gate"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "ama_gate" in n} and {n for n in trainable if "lora_" in n}
    assert not {n for n in trainable if "ama_gate" not in n and "lora_" not in n}
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[1].self_attn.ama_gate.weight.grad.abs().sum() > 0

def test_dense_layers_keep_full_attention(tiny_model):
    cfg = AMAConfig(slice_len=8, budget=32, local_window=16, dense_layers=1, return_selection=True)
    ids = torch.randint(0, 97, (1, 80), generator=torch.Generator().manual_seed(7))
    tiny_model.decoder.set_attention(cfg)
    try:
        tiny_model(ids)
    finally:
        tiny_model.decoder.set_attention(None)
    assert cfg.recorder.layers() == [1]  # layer 0 ran dense and recorded nothing
    assert cfg.recorder.records[0].chosen.shape == (1, 2, 10, 10)  # one selection per query block

@pytest.mark.slow
def test_default_model_sparse_prefill_stays_close(default_model):
    """A random 64-token block repeated 4 times: the last repeat is predictable only by looking far back."""
    ids = torch.randint(100, 20000, (1, 64), generator=torch.Generator().manual_seed(9)).repeat(1, 4)
    full = default_model(ids, logits_to_keep=64).logits
    default_model.decoder.set_attention(AMAConfig(slice_len=16, budget=128, local_window=32))
    try:
        ama = default_model(ids, logits_to_keep=64).logits
    finally:
        default_model.decoder.set_attention(None)
    agree = (ama.argmax(-1) == full.argmax(-1)).float().mean()
    copied = (ama.argmax(-1)[0, :-1] == ids[0, -63:]).float().mean()
    assert agree > 0.9 and copied > 0.9
