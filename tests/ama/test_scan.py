"""The ``scan`` slice score (``ama/scan.py``): the attention mass of each slice from 4-bit keys."""

from __future__ import annotations

import pytest
import torch

from ama.helpers import backend, random_qkv
from laformer import ConfigError
from laformer.ama import SelectionRecorder
from laformer.ama.cache import summarize, unpack_key_codes
from laformer.ama.scan import slice_log_mass


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
