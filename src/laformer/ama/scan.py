"""The ``scan`` slice score: the attention mass a slice would get, estimated from a 4-bit copy of its keys.

A bound or a mean key per slice ranks the slices poorly at long context (docs/ama.md measures it: +7 % perplexity
at 8k where the true attention mass of the slices gives +1.7 %). Scoring every cached token from a 4-bit copy of
its key ranks them as well as the true mass does, at an eighth of the keys' bytes.

Per query head: the query is rounded to int8 (one scale), each token's logit is the integer product of the
query with the token's 4-bit codes times both scales / sqrt(d), a softmax runs over the tokens of the full
slices before the query's own slice, and a slice's score is its tokens' mass summed over the group's heads. The
integer products are exact in float32, so the fused decode kernel (kernel.c) computes the same numbers.
"""

from __future__ import annotations

import math

import torch

from laformer.ama import kernel
from laformer.ama.cache import SliceSummaries, unpack_key_codes

QUERY_LEVELS = 127  # queries are rounded to int8
SCORE_CHUNK_ELEMENTS = 1 << 22  # bounds the (query block, head, token) logits held at once in prefill


def round_queries(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) queries as integers -127..127 (in float32) and their scales (..., 1), max |q| / 127."""
    amax = q.abs().amax(-1, keepdim=True)
    ints = torch.round(q * (QUERY_LEVELS / amax)).nan_to_num_(0.0)  # an all-zero query gives zeros
    return ints, amax / QUERY_LEVELS


def slice_log_mass(q_rows: torch.Tensor, summaries: SliceSummaries, own: torch.Tensor,
                   valid: torch.Tensor | None) -> torch.Tensor:
    """Log attention mass (B, H_kv, Q, N) of each full slice for Q queries or query blocks, summed over rows.

    ``q_rows`` (B, H_kv, Q, R, D) are the queries of each block, one row per (group head, position); an all-zero
    row (block padding) adds nothing. ``own`` (Q,) is the slice each block lies in (only full slices before it
    are scored), ``valid`` (B, S) marks real tokens. A slice whose mass underflows gets the smallest finite
    logit, so that it can still fill a budget. Runs in C (``kernel.scan``) when it can.
    """
    mass = kernel.scan(q_rows, summaries.key_codes, summaries.key_scales, own, valid)
    if mass is None:
        mass = slice_mass(q_rows, summaries, own, valid)
    return mass.log_().clamp_min_(torch.finfo(torch.float32).min)


def slice_mass(q_rows: torch.Tensor, summaries: SliceSummaries, own: torch.Tensor,
               valid: torch.Tensor | None) -> torch.Tensor:
    """``slice_log_mass`` before the log, in PyTorch: the reference of the C code and its fallback."""
    B, Hkv, Q, G, D = q_rows.shape  # G: rows per block
    N, L = summaries.num_slices, summaries.key_codes.shape[3]
    keys = unpack_key_codes(summaries.key_codes).flatten(2, 3)  # (B, H_kv, N*L, D) integers
    token_scales = summaries.key_scales.flatten(2)[:, :, None, None]  # (B, H_kv, 1, 1, N*L)
    ints, scales = round_queries(q_rows.float())
    scales = scales / math.sqrt(D)
    slice_of_token = torch.arange(N * L, device=q_rows.device) // L
    mass = q_rows.new_zeros(B, Hkv, Q, N, dtype=torch.float32)
    chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, B * Hkv * G * N * L))
    for start in range(0, Q, chunk):
        rows = slice(start, min(Q, start + chunk))
        C, n = rows.stop - rows.start, min(N, int(own[rows].max())) * L  # only slices before the last own one
        if n == 0:
            continue
        visible = slice_of_token[:n] < own[rows, None]  # (C, n)
        if valid is not None:
            visible = visible & valid[:, None, None, :n]  # (B, 1, C, n)
        # one product per KV head: the C blocks' G heads are rows
        logits = (ints[:, :, rows].reshape(B, Hkv, C * G, D) @ keys[:, :, :n].transpose(-1, -2)).view(B, Hkv, C, G, n)
        logits = logits * token_scales[..., :n] * scales[:, :, rows]
        weights = logits.masked_fill_(~visible[..., None, :], float("-inf")).softmax(-1).nan_to_num_(0.0)
        weights = weights * (scales[:, :, rows] > 0)  # padding rows (all zero) count for nothing
        mass[:, :, rows, : n // L] = weights.unflatten(-1, (n // L, L)).sum((3, 5))
    return mass
