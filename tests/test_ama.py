"""Actively Mediated Attention: exactness at full budget, selection on hand-built keys, the sparse kernels
against a naive reference, padding, GQA, the KV cache, bfloat16, the learned gate, recording and errors."""

from __future__ import annotations

import math

import pytest
import torch

from laformer import ConfigError, LaFormerConfig, LaFormerForCausalLM
from laformer.ama import AMAConfig, MediationGate, SlicedKVCache, SelectionRecorder, kernel
from laformer.ama.attention import AMAAttention, key_validity
from laformer.ama.cache import summarize, unpack_key_codes, update_summaries
from laformer.ama.scan import slice_log_mass, slice_mass
from laformer.attention import build_attention_mask, sdpa_attention
from laformer.cache import KVCache


def tiny_config(**overrides) -> LaFormerConfig:
    fields = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0)
    fields.update(overrides)
    return LaFormerConfig(**fields)


@pytest.fixture(scope="module")
def tiny_model() -> LaFormerForCausalLM:
    return LaFormerForCausalLM.from_config(tiny_config(), seed=0).eval()


needs_kernel = pytest.mark.skipif(not kernel.available(), reason="no C compiler for the AMA kernel")


def backend(**fields) -> AMAAttention:
    return AMAAttention(AMAConfig(**fields), torch.nn.Module())


def random_qkv(B=2, H=4, Hkv=2, T=70, S=70, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, S, D, generator=g),
            torch.randn(B, Hkv, S, D, generator=g))


# ---------------------------------------------------------------- exactness when the budget covers the context


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


# ---------------------------------------------------------------- selection on hand-built keys


def planted_keys(n_slices=12, L=4, D=8, hot=(5, 8), seed=0):
    """Keys that are small noise except in the ``hot`` slices, which align with the query direction."""
    g = torch.Generator().manual_seed(seed)
    k = 0.1 * torch.randn(1, 1, n_slices * L, D, generator=g)
    direction = torch.zeros(D)
    direction[0] = 1.0
    for s in hot:
        k[0, 0, s * L : (s + 1) * L] += 3.0 * direction
    q = direction.view(1, 1, 1, D).repeat(1, 2, 1, 1)  # two query heads share the KV head
    return q, k, torch.randn(1, 1, n_slices * L, D, generator=g)


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


def test_scan_mass_is_the_softmax_of_the_rounded_keys():
    q, k, v = random_qkv(B=2, H=6, Hkv=2, T=1, S=72, D=16, seed=5)
    valid = torch.ones(2, 72, dtype=torch.bool)
    valid[1, :11] = False
    s = summarize(k, v, valid, 8, 0, 9, score="scan")
    rounded_keys = unpack_key_codes(s.key_codes).flatten(2, 3) * s.key_scales.flatten(2)[..., None]
    assert (rounded_keys - k).abs().max() <= k.abs().amax(-1).max() / 14 + 1e-6  # half a 4-bit step
    q_heads = q.view(2, 2, 1, 3, 16)
    log_mass = slice_log_mass(q_heads, s, torch.tensor([8]), valid)  # own slice 8: slices 0-7 are scored
    step = q_heads.abs().amax(-1, keepdim=True) / 127
    q_rounded = torch.round(q_heads / step) * step
    logits = q_rounded @ rounded_keys[:, :, None, :64].transpose(-1, -2) / 4  # (B, H_kv, 1, G, 64)
    logits = logits.masked_fill(~valid[:, None, None, None, :64], float("-inf"))
    expected = logits.softmax(-1).unflatten(-1, (8, 8)).sum((3, 5))
    torch.testing.assert_close(log_mass[..., :8].exp(), expected, atol=1e-4, rtol=1e-4)
    assert log_mass[..., 8].max() < -1e30  # the own slice is not scored
    torch.testing.assert_close(log_mass[..., :8].exp().sum(-1), torch.full((2, 2, 1), 3.0))  # one per head


@needs_kernel
@pytest.mark.parametrize("D", [64, 16])  # the AVX2 path (64 channels per step) and the scalar one
def test_scan_in_c_equals_the_pytorch_reference(D):
    g = torch.Generator().manual_seed(D)
    B, Hkv, Q, R, S, L = 2, 3, 5, 6, 203, 8
    k = torch.randn(B, Hkv, S, D, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :19] = False
    s = summarize(k, k, valid, L, 0, S // L, score="scan")
    q_rows = 2 * torch.randn(B, Hkv, Q, R, D, generator=g)
    q_rows[:, :, 0, -2:] = 0.0  # block padding
    own = torch.tensor([0, 3, 7, 20, 25])  # nothing scored, a few slices, up to all of them
    for mask in (None, valid):
        torch.testing.assert_close(kernel.scan(q_rows, s.key_codes, s.key_scales, own, mask),
                                   slice_mass(q_rows, s, own, mask), atol=1e-6, rtol=1e-5)


def test_scan_needs_an_even_head_dim():
    q, k, v = random_qkv(T=1, S=75, D=15)
    with pytest.raises(ConfigError, match="even head dim"):
        backend(slice_len=8, budget=40, local_window=16)(q, k, v, None, layer_idx=0, cache=None)
    backend(slice_len=8, budget=40, local_window=16, score="bound")(q, k, v, None, layer_idx=0, cache=None)


def test_scan_finds_the_slice_the_bound_misses():
    """A slice of spread-out keys has a high min/max bound but no token that matches the query; a slice whose
    keys all lean towards the query gets the attention mass. ``scan`` picks the second, ``bound`` the first."""
    g = torch.Generator().manual_seed(0)
    D, L = 16, 4
    k = 0.1 * torch.randn(1, 1, 12 * L, D, generator=g)
    for i in range(L):  # slice 3: token i is +6 on channel i and -6 on the next, so q.k = 0 but the bound is 24
        k[0, 0, 3 * L + i, i], k[0, 0, 3 * L + i, (i + 1) % L] = 6.0, -6.0
    k[0, 0, 6 * L : 7 * L, :4] += 1.5  # slice 6: every token has q.k = 6
    q = torch.zeros(1, 2, 1, D)
    q[..., :4] = 1.0
    chosen = {}
    for score in ("scan", "bound"):
        recorder = SelectionRecorder()
        ama = backend(slice_len=L, budget=16, sink_slices=1, local_window=8, score=score)  # 1 slice to choose
        ama.recorder = recorder
        ama(q, k, torch.randn_like(k), None, layer_idx=0, cache=None)
        chosen[score] = recorder.records[0].chosen[0, 0, 0, 1:10].nonzero().flatten().add(1).tolist()
    assert chosen == {"scan": [6], "bound": [3]}


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


# ---------------------------------------------------------------- the sparse kernels against a naive reference


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


# ---------------------------------------------------------------- the fused decode kernel against the PyTorch path


def both_decodes(cfg: AMAConfig, q, k, v, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's and the PyTorch reference's output for the same decode step."""
    ama = AMAAttention(cfg, torch.nn.Module())
    assert ama.fused
    fused = ama(q, k, v, mask, layer_idx=0, cache=None)
    ama.fused = False
    return fused, ama(q, k, v, mask, layer_idx=0, cache=None)


@needs_kernel
@pytest.mark.parametrize("mediation", ["off", "estimate"])
@pytest.mark.parametrize("score", ["scan", "bound", "mean"])
@pytest.mark.parametrize("shape", [(1, 9, 3, 1000, 64), (2, 4, 2, 75, 16), (3, 6, 2, 203, 16), (2, 4, 4, 64, 8)])
def test_fused_decode_equals_the_pytorch_path(mediation, score, shape):
    B, H, Hkv, S, D = shape  # GQA groups of 3, 2 and 1; a partial last slice or none
    q, k, v = random_qkv(B=B, H=H, Hkv=Hkv, T=1, S=S, D=D, seed=S)
    cfg = AMAConfig(slice_len=8, budget=48, local_window=16, mediation=mediation, score=score)
    fused, reference = both_decodes(cfg, 3 * q, k, v)  # sharper scores than unit noise
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_fused_decode_selects_the_planted_slices():
    q, k, v = planted_keys()
    fused, reference = both_decodes(AMAConfig(slice_len=4, budget=20, local_window=8, mediation="off"), q, k, v)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    keep = torch.zeros(48, dtype=torch.bool)
    for s in (0, 5, 8, 10, 11):  # sink, the two planted slices, local window
        keep[s * 4 : (s + 1) * 4] = True
    torch.testing.assert_close(fused, sdpa_attention(q, k[:, :, keep], v[:, :, keep], None), atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("mediation", ["off", "estimate"])
@pytest.mark.parametrize("score", ["scan", "bound"])  # the bound's min/max skip padding tokens too
def test_fused_decode_with_padding_in_a_batch(mediation, score):
    q, k, v = random_qkv(B=3, H=6, Hkv=2, T=1, S=203, seed=11)
    padding = torch.ones(3, 203, dtype=torch.bool)
    padding[1, :13] = False  # left padding, part of a slice
    padding[2, :70] = False  # whole slices of padding, the sink among them
    mask = build_attention_mask(padding, 1, 203, q.device)
    cfg = AMAConfig(slice_len=8, budget=48, local_window=16, mediation=mediation, score=score)
    fused, reference = both_decodes(cfg, q, k, v, mask)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_fused_decode_with_every_slice_in_budget_is_full_attention():
    q, k, v = random_qkv(T=1, S=70)
    cfg = AMAConfig(slice_len=8, budget=80, local_window=16)
    summaries = update_summaries(None, 0, k, v, None, 8, score="scan")
    out = kernel.decode(q, k, v, None, summaries, cfg)  # the kernel, not the shortcut
    torch.testing.assert_close(out, sdpa_attention(q, k, v, None), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_fused_decode_gives_the_same_generation(tiny_model):
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    cfg = AMAConfig(slice_len=8, budget=32, local_window=16)
    outputs = []
    for fused in (True, False):
        tiny_model.decoder.set_attention(cfg)
        backend = tiny_model.model.layers[1].self_attn.backend
        backend.fused = fused
        try:
            cache = SlicedKVCache(2, slice_len=8)
            tiny_model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            token = ids[:, -1:]
            full_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            outputs.append(tiny_model(token, attention_mask=full_mask, past_key_values=cache, use_cache=True).logits)
        finally:
            tiny_model.decoder.set_attention(None)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_fused_decode_is_skipped_for_what_it_does_not_do():
    for fields in (dict(sampling="gumbel"), dict(mediation="learned"), dict(return_selection=True)):
        assert not kernel.supports(AMAConfig(slice_len=8, budget=32, local_window=16, **fields))
    q, k, v = random_qkv(T=1)
    assert not kernel.fits(q, k.bfloat16(), v.bfloat16())


# ---------------------------------------------------------------- padding, cache, dtype


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


def test_incremental_summaries_match_a_rebuild_and_survive_crop(tiny_model):
    cfg = AMAConfig(slice_len=8, budget=32, local_window=16)
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(2))
    tiny_model.decoder.set_attention(cfg)
    try:
        for cache in (KVCache(2), SlicedKVCache(2, slice_len=8)):
            tiny_model(ids[:, :45], past_key_values=cache, use_cache=True)
            for t in range(45, 60):
                tiny_model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            state = cache.layer_state[1]
            fresh = summarize(cache.keys[1], cache.values[1], None, 8, 0, 7, score="scan")
            assert state.key_codes is not None  # the default score scans a 4-bit key copy
            for a, b in zip(state.fields(), fresh.fields()):
                torch.testing.assert_close(a, b)
            cache.crop(50)
            assert cache.layer_state[1] is None
            logits = tiny_model(ids[:, 50:51], past_key_values=cache, use_cache=True).logits
            assert cache.layer_state[1].num_slices == 6 and torch.isfinite(logits).all()
    finally:
        tiny_model.decoder.set_attention(None)


def test_sliced_cache_gives_the_same_generation(tiny_model):
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(4))
    cfg = AMAConfig(slice_len=8, budget=32, local_window=16)
    plain = tiny_model.generate(ids, max_new_tokens=12, attention=cfg)
    sliced = tiny_model.generate(ids, max_new_tokens=12, attention=cfg, cache=SlicedKVCache(2, slice_len=8))
    assert torch.equal(plain, sliced)
    cache = SlicedKVCache(2, slice_len=8)
    tiny_model(ids, past_key_values=cache, use_cache=True)
    cache.reorder(torch.tensor([1]))
    assert cache.keys[0].shape[0] == 1 and cache.get_seq_length() == 50
    tiny_model(ids[1:, :1], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 51


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
    model = LaFormerForCausalLM.from_config(tiny_config(), seed=0).eval()
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


# ---------------------------------------------------------------- the learned gate


def test_learned_gate_starts_as_estimate_and_trains():
    model = LaFormerForCausalLM.from_config(tiny_config(), seed=0)
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

    model = LaFormerForCausalLM.from_config(tiny_config(), seed=0)
    model.decoder.set_attention(AMAConfig(slice_len=8, budget=32, local_window=16, mediation="learned"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["ama_gate"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "ama_gate" in n} and {n for n in trainable if "lora_" in n}
    assert not {n for n in trainable if "ama_gate" not in n and "lora_" not in n}
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[1].self_attn.ama_gate.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- configuration, reporting, drawing


@pytest.mark.parametrize("fields", [
    dict(slice_len=0),
    dict(budget=100, slice_len=64),
    dict(local_window=32, slice_len=64),
    dict(budget=128, slice_len=64, local_window=128),
    dict(score="dot"),
    dict(mediation="always"),
    dict(sampling="nucleus"),
    dict(dense_layers=-1),
    dict(query_block=3),
    dict(query_block=0),
])
def test_bad_configs_raise_config_error(fields):
    with pytest.raises(ConfigError):
        AMAConfig(**fields)


def test_budget_description_and_streaming_baseline():
    assert AMAConfig(budget=1024).describe() == "budget 1024 = sinks 32 + local 512 + 15 selected x 32"
    assert AMAConfig(budget=512).local_tokens == 256 and AMAConfig(budget=64, slice_len=32).local_tokens == 32
    explicit = AMAConfig(budget=1024, local_window=128)
    assert explicit.describe() == "budget 1024 = sinks 32 + local 128 + 27 selected x 32"
    streaming = AMAConfig(budget=512, local_window=480, mediation="off")
    assert streaming.num_selected == 0


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


def test_return_selection_through_generate_and_heatmap(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    from laformer.ama.viz import selection_heatmap

    cfg = AMAConfig(slice_len=8, budget=32, local_window=16, return_selection=True)
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(8))
    tiny_model.generate(ids, max_new_tokens=12, attention=cfg)
    steps = cfg.recorder.decode_steps(layer=1)
    assert len(steps) == 11 and steps[0].chosen.shape[:3] == (1, 2, 1)
    path = selection_heatmap(cfg.recorder, tmp_path / "selection.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_from_pretrained_switches_attention_on(tmp_path):
    LaFormerForCausalLM.from_config(tiny_config(), seed=0).save_pretrained(tmp_path)
    model = LaFormerForCausalLM.from_pretrained(tmp_path, attention=AMAConfig(slice_len=8, budget=32,
                                                                               local_window=16))
    assert isinstance(model.model.layers[1].self_attn.backend, AMAAttention)


# ---------------------------------------------------------------- the default model


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


def test_cli_attention_options():
    from laformer.cli import build_parser
    from laformer.cli.common import attention_config

    parser = build_parser()
    cfg = attention_config(parser.parse_args(["generate", "hi", "--attention", "ama", "--ama-budget", "512",
                                              "--ama-slice-len", "32", "--ama-mediation", "off"]))
    assert (cfg.budget, cfg.slice_len, cfg.mediation) == (512, 32, "off")
    assert attention_config(parser.parse_args(["generate", "hi"])) is None
    with pytest.raises(ConfigError):
        attention_config(parser.parse_args(["generate", "hi", "--attention", "ama", "--ama-budget", "100"]))
