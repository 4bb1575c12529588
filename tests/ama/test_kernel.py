"""The fused C kernels (``ama/kernel.c``/``kernel.py``) against the PyTorch reference, and their checked ABI."""

from __future__ import annotations

import ctypes

import pytest
import torch

from ama.helpers import needs_kernel, planted_keys, random_qkv
from laformer import LaFormerError, native
from laformer.ama import AMAConfig, SlicedKVCache, kernel
from laformer.ama.attention import AMAAttention
from laformer.ama.cache import summarize, update_summaries
from laformer.ama.scan import slice_mass
from laformer.attention import build_attention_mask, sdpa_attention


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


# ---------------------------------------------------------------- the checked interface


class Layer(ctypes.Structure):  # kernel.Layer with two of its integers swapped: the same size, other offsets
    _fields_ = [(n, t) for n, t in kernel.Layer._fields_ if n not in ("capacity", "count_batch_stride")]
    _fields_.insert(-2, ("count_batch_stride", ctypes.c_int64))
    _fields_.insert(-2, ("capacity", ctypes.c_int64))


@needs_kernel
def test_a_struct_mirror_that_disagrees_with_the_c_code_is_refused():
    assert ctypes.sizeof(Layer) == ctypes.sizeof(kernel.Layer)
    structs = (kernel.Settings, Layer, kernel.Scan, kernel.Step)
    native.check_abi(kernel.library(), "kernel.c", "laformer_ama", kernel.ABI_VERSION, kernel.STRUCTS)  # as built
    with pytest.raises(native.ABIMismatchError, match="lays out its structs"):
        native.check_abi(kernel.library(), "kernel.c", "laformer_ama", kernel.ABI_VERSION, structs)


@needs_kernel
def test_a_library_of_another_abi_version_is_refused_at_load(monkeypatch):
    monkeypatch.setattr(kernel, "ABI_VERSION", kernel.ABI_VERSION + 1)
    kernel.library.cache_clear()
    try:
        with pytest.raises(LaFormerError, match=f"ABI version {kernel.ABI_VERSION - 1} but laformer expects"):
            kernel.library()
    finally:
        monkeypatch.undo()
        kernel.library.cache_clear()
    assert kernel.available()
