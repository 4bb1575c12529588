"""Slice summaries and the slice-blocked cache (``ama/cache.py``)."""

from __future__ import annotations

import torch

from laformer.ama import AMAConfig, SlicedKVCache
from laformer.ama.cache import summarize
from laformer.cache import KVCache


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
