"""Actively Mediated Attention: a drop-in attention backend that attends exactly to a few chosen slices.

Per layer and KV head (the query heads of a grouped-query group share one choice):

1. Score every full slice of the cache (``scan``: the attention mass its tokens get, estimated from a 4-bit copy
   of the keys, see ``scan.py``; ``bound``: sum_d max(q_d kmin_d, q_d kmax_d), an upper bound of q.k; ``mean``:
   q . mean key), summed over the group's heads, and turn the scores into sampling probabilities
   ``p = softmax(score)`` over the candidate slices.
2. Keep the sink slices and the local window, then the most probable candidates until the budget is spent
   (top-k, or Gumbel top-k to sample).
3. Attend exactly to the tokens of those slices only (they are gathered; the rest is never read).
4. Mediation: every unselected slice becomes one pseudo-token (its mean key, with a log(count) logit bias, and
   its mean value); that softmax partition merges with the exact one through their log-sum-exps,
   ``out = (e^lse_x out_x + g e^lse_m out_m) / (e^lse_x + g e^lse_m)``, where the gate ``g`` is 1
   (``estimate``) or learned per layer and head (``learned``). That merge is exactly one softmax over the
   exact tokens and the pseudo-tokens with ``log(count) + log g`` added to the pseudo-token logits, which is
   how it is computed: a single fused ``scaled_dot_product_attention`` call with an additive mask.

Decode (one query) runs in one call of the fused C kernel (``kernel.py``) when it can; the PyTorch code here is
its reference and fallback, gathering from the cache viewed as whole slices plus the partial last slice.
Prefill cuts the queries into blocks of ``query_block`` queries inside one slice; every block selects its own
slices causally (summing its queries' scan masses), so exact attention grows as context x budget rather than
context^2; the scan that ranks the slices still reads every earlier token, at 4 bits.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from laformer.ama import kernel
from laformer.ama.cache import SliceSummaries, update_summaries
from laformer.ama.config import AMAConfig
from laformer.ama.scan import slice_log_mass
from laformer.ama.step import NativeAttention
from laformer.attention import attention_backend, sdpa_attention
from laformer.cache import KVCache
from laformer.config import LaFormerConfig

if TYPE_CHECKING:  # the engine's cache; AMA itself sits below the inference package
    from laformer.inference.static_cache import StaticKVCache

NEG_INF = float("-inf")
BLOCK_CHUNK_ELEMENTS = 1 << 23  # bounds the gathered keys and attention masks held at once in prefill


class MediationGate(nn.Module):
    """The learned gate of one layer: ``log g = w . f + b`` per query head, from two features of the slices
    left out (the fraction of the visible tokens they hold, and the sampling probability they carry).
    Initialised to zero, so it starts as the training-free ``estimate`` (g = 1)."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, 2))
        self.bias = nn.Parameter(torch.zeros(num_heads))

    def forward(self, left_out: torch.Tensor, left_mass: torch.Tensor) -> torch.Tensor:
        """Log-gates (B, H_kv, Q, G) from (B, 1|H_kv, Q) features of each query block."""
        Hkv = left_mass.shape[1]
        features = torch.stack(torch.broadcast_tensors(left_out, left_mass), -1)  # (B, H_kv, Q, 2)
        w = self.weight.view(Hkv, -1, 2)  # (H_kv, G, 2)
        return torch.einsum("bhqf,hgf->bhqg", features.to(w.dtype), w) + self.bias.view(Hkv, -1)[:, None]


class AMAAttention:
    """The backend an ``AMAConfig`` stands for (``set_attention(AMAConfig(...))`` builds one through
    ``attention_backend``); see the module docstring for the mechanism."""

    contiguous_keys = True  # slices are runs of cache columns: the decode engine keeps rows in lockstep for it

    def __init__(self, config: AMAConfig, decoder: nn.Module) -> None:
        self.config = config
        self.recorder = config.recorder
        self.gates: list[MediationGate] | None = None
        self._layout_key: tuple | None = None
        self._layout_value: tuple[torch.Tensor, ...] = ()
        if config.mediation == "learned":
            self.gates = [attach_gate(layer.self_attn) for layer in decoder.layers]
        self.fused = kernel.supports(config)  # decode through kernel.c when the tensors allow it
        self._native: NativeAttention | None = None  # the native step's hook, kept while the engine's cache stays

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        layer_idx: int,
        cache: KVCache | None,
    ) -> torch.Tensor:
        cfg = self.config
        S = k.shape[2]
        if layer_idx < cfg.dense_layers or -(-S // cfg.slice_len) <= cfg.budget_slices:
            return sdpa_attention(q, k, v, mask, layer_idx=layer_idx, cache=cache)  # everything fits the budget
        T = q.shape[2]
        valid = key_validity(mask, T)
        summaries = update_summaries(cache, layer_idx, k, v, valid, cfg.slice_len, cfg.score)
        if T == 1 and self.fused and self.recorder is None and kernel.fits(q, k, v):
            return kernel.decode(q, k, v, valid, summaries, cfg)
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        gate = self.gates[layer_idx] if self.gates is not None else None
        if T == 1:
            out = self._decode(q.to(dtype), k, v, valid, summaries, layer_idx, gate)
        else:
            out = self._prefill(q.to(dtype), k, v, mask, valid, summaries, layer_idx, gate)
        return out.to(q.dtype)

    def native_attention(self, model_config: LaFormerConfig, cache: StaticKVCache) -> NativeAttention | str:
        """This backend's hook for the engine's native decode step over ``cache`` (a lockstep ``StaticKVCache``),
        or why that step cannot run it."""
        cfg = self.config
        if not self.fused:
            return ("AMA with Gumbel sampling, the learned gate or recorded selections decodes on the PyTorch step "
                    "(as it does without the AMA kernel)")
        if cfg.score == "scan" and cache.keys[0].shape[-1] % 2:
            return "AMA's scan score needs an even head dim"
        if self._native is None or self._native.cache is not cache:
            self._native = NativeAttention(cfg, model_config, cache)
        return self._native

    # ------------------------------------------------------------------ selection

    def _layout(
        self, first: int, blocks: int, per_slice: int, n_cols: int, n_full: int, device
    ) -> tuple[torch.Tensor, ...]:
        """Which slices each query block must keep (sinks, local window) and which it may choose from; block
        ``i`` lies in slice ``first + i // per_slice``.

        Depends only on positions, so it is computed once per step and shared by every layer.
        """
        key = (first, blocks, per_slice, n_cols, n_full, device)
        if self._layout_key != key:
            cfg = self.config
            own = torch.arange(blocks, device=device) // per_slice + first
            j = torch.arange(n_cols, device=device)
            local_start = (own - cfg.local_slices + 1).clamp_min(0)[:, None]  # (Q, 1)
            sink_end = local_start.clamp_max(cfg.sink_slices)
            forced = (j < sink_end) | ((j >= local_start) & (j <= own[:, None]))  # (Q, n_cols)
            choosable = (j[:n_full] >= sink_end) & (j[:n_full] < local_start)  # (Q, F)
            self._layout_key, self._layout_value = key, (forced, choosable)
        return self._layout_value

    def _plan(
        self, qrows: torch.Tensor, positions, summaries: SliceSummaries, first: int, n_cols: int, n_pick: int,
        valid: torch.Tensor | None, per_slice: int = 1,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose slices for Q query blocks, block ``i`` holding queries of slice ``first + i // per_slice``.

        ``qrows`` (B, H_kv, Q, R, D) are the blocks' queries, one row per (group head, position), zero rows
        being block padding; ``positions`` the real queries per block (a number or (Q, 1)); ``valid`` (B, S) the
        real keys. Scores are summed over the group's heads and averaged over positions (``scan`` sums every
        query's mass). Returns the candidate probabilities (B, H_kv, Q, F)
        (None unless recorded, sampled or gated), the chosen slice indices and whether each is real
        (B, H_kv, Q, n_pick), and the pseudo-token bias base (B, 1, Q, n_cols): log(count) on candidates.
        """
        cfg, s = self.config, summaries
        Fs, dtype = s.num_slices, qrows.dtype
        cand_bias, prio_bias, pseudo_base = self._masks(s, first, qrows.shape[2], per_slice, n_cols, qrows.device)
        if cfg.score == "scan":  # every query's own mass: a block's mean query would blur what each one needs
            own = first + torch.arange(qrows.shape[2], device=qrows.device) // per_slice
            logits = slice_log_mass(qrows, s, own, valid).to(dtype)  # (B, H_kv, Q, F)
        else:
            if cfg.score == "bound":  # sum_d max(q_d kmin_d, q_d kmax_d) = q . center + |q| . radius
                q_agg = torch.cat([qrows, qrows.abs()], -1).sum(3)  # (B, H_kv, Q, 2D)
            else:
                q_agg = qrows.sum(3)
            if not isinstance(positions, (int, float)) or positions != 1:
                q_agg = q_agg / positions
            logits = q_agg @ s.score_keys(cfg.score, qrows.shape[-1], dtype)  # (B, H_kv, Q, F): score / sqrt(d)
        probs = None
        if self.recorder is not None or cfg.sampling == "gumbel" or self.gates is not None:
            # Over candidates only; a block with none gets zeros. Selection is discrete: no gradient here.
            probs = (logits.detach() + cand_bias[..., :Fs]).softmax(-1).nan_to_num(0.0)
        if cfg.sampling == "gumbel":
            logits = logits - torch.empty_like(logits).exponential_().log()
        priority = F.pad(logits, (0, n_cols - Fs)) + prio_bias  # +inf: sinks and window, -inf: not choosable
        top = priority.topk(min(n_pick, n_cols), dim=-1)
        return probs, top.indices, top.values > NEG_INF, pseudo_base

    def _masks(
        self, s: SliceSummaries, first: int, blocks: int, per_slice: int, n_cols: int, device
    ) -> tuple[torch.Tensor, ...]:
        """Per-layer masks that only change when a slice fills, each (B, 1, Q, n_cols): the candidate bias (0 or
        -inf), the selection priority bias (+inf for kept slices, 0 for candidates, -inf otherwise), and the
        pseudo-token bias base, log(count) on candidates and -inf elsewhere."""
        key = (first, blocks, per_slice, n_cols)
        if s.cache.get("masks_key") != key:
            forced, choosable = self._layout(first, blocks, per_slice, n_cols, s.num_slices, device)
            cand = F.pad(choosable & (s.count[:, :, None, :] > 0), (0, n_cols - s.num_slices))  # (B, 1, Q, n_cols)
            cand_bias = torch.zeros(cand.shape, device=device).masked_fill_(~cand, NEG_INF)
            log_count = F.pad(s.log_count, (0, n_cols - s.num_slices))[:, :, None]
            masks = (cand_bias, cand_bias.masked_fill(forced, float("inf")), log_count.masked_fill(~cand, NEG_INF))
            s.cache.update(masks_key=key, masks=masks)
        return s.cache["masks"]

    def _record(self, layer: int, key_len: int, probs, idx, ok, n_cols: int) -> None:
        chosen = torch.zeros(*idx.shape[:-1], n_cols, dtype=torch.bool, device=idx.device).scatter_(-1, idx, ok)
        self.recorder.add(layer, key_len, F.pad(probs, (0, n_cols - probs.shape[-1])), chosen)

    # ------------------------------------------------------------------ decode: one query

    def _decode(self, q, k, v, valid, summaries, layer_idx, gate) -> torch.Tensor:
        cfg, L = self.config, self.config.slice_len
        B, H, _, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G, Fs = H // Hkv, S // L
        tail = slice(Fs * L, S)  # the partial last slice, always attended
        partial = int(S > Fs * L)
        qrows = q.view(B, Hkv, 1, G, D)  # (B, H_kv, Q=1, R=G, D)
        probs, idx, ok, pseudo_base = self._plan(qrows, 1.0, summaries, (S - 1) // L, Fs, cfg.budget_slices - partial,
                                                 valid)
        if self.recorder is not None:
            own_slice = idx.new_full((B, Hkv, 1, partial), (S - 1) // L)
            self._record(layer_idx, S, probs, torch.cat([idx, own_slice], -1),
                         torch.cat([ok, torch.ones_like(own_slice, dtype=torch.bool)], -1), Fs + partial)
        sel = idx[:, :, 0]  # (B, H_kv, n)
        chosen_k, chosen_v = gather_slices((k, v), sel, L)  # only the chosen slices are read
        keys, values = [chosen_k.flatten(2, 3), k[:, :, tail]], [chosen_v.flatten(2, 3), v[:, :, tail]]
        n_exact = sel.shape[-1] * L + S - Fs * L
        bias = None
        if valid is not None:  # without padding every chosen slice is real (ok is all True)
            allowed = ok[:, :, 0, :, None].expand(-1, -1, -1, L)  # (B, H_kv, n, L)
            allowed = allowed & gather_slices((valid[:, None, :, None].expand(-1, Hkv, -1, -1),), sel, L)[0][..., 0]
            allowed = torch.cat([allowed.flatten(2), valid[:, None, tail].expand(B, Hkv, -1)], -1)
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, NEG_INF)
            bias = bias[:, :, None]  # (B, H_kv, 1, n_exact)
        if cfg.mediation != "off":
            pseudo = self._pseudo_bias(pseudo_base, idx, probs, summaries, gate, S, q.dtype)[:, :, 0]  # (B,H_kv,1|G,F)
            if bias is None:
                bias = F.pad(pseudo, (n_exact, 0), value=0.0)
            else:
                bias = torch.cat([bias.expand(-1, -1, pseudo.shape[2], -1), pseudo], -1)
            keys.append(summaries.kmean)  # float32, like every summary
            values.append(summaries.vmean)
        if any(x.dtype != q.dtype for x in keys):
            keys, values = [x.to(q.dtype) for x in keys], [x.to(q.dtype) for x in values]
        keys, values = torch.cat(keys, 2), torch.cat(values, 2)
        out = F.scaled_dot_product_attention(q.view(B, Hkv, G, D), keys, values, attn_mask=bias)  # (B, H_kv, G, D)
        return out.view(B, H, 1, D)

    # ------------------------------------------------------------------ prefill: block-sparse

    def _prefill(self, q, k, v, mask, valid, summaries, layer_idx, gate) -> torch.Tensor:
        cfg, L, Lq = self.config, self.config.slice_len, self.config.prefill_block
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G, Fs = H // Hkv, summaries.num_slices
        P0 = S - T  # position of the first query
        c0, N = P0 // L, -(-S // L)
        per_slice = L // Lq
        nb, front, back = (N - c0) * per_slice, P0 - c0 * L, N * L - S  # nb query blocks of Lq queries
        # Queries padded to whole slices, rows of a block ordered (group head, position): (B, H_kv, nb, G*Lq, D)
        qb = F.pad(q, (0, 0, front, back)).view(B, Hkv, G, nb, Lq, D).transpose(2, 3).reshape(B, Hkv, nb, G * Lq, D)
        kb = F.pad(k, (0, 0, 0, back)).unflatten(2, (N, L))  # (B, H_kv, N, L, D)
        vb = F.pad(v, (0, 0, 0, back)).unflatten(2, (N, L))
        start_pos = c0 * L + torch.arange(nb, device=q.device) * Lq  # first position of each query block
        n_pick = min(cfg.budget_slices, N)
        positions = (torch.clamp(start_pos + Lq, max=S) - torch.clamp(start_pos, min=P0)).clamp_min(1)[:, None]
        probs, idx, ok, pseudo_base = self._plan(qb, positions, summaries, c0, N, n_pick, valid,
                                                 per_slice)
        if self.recorder is not None:
            self._record(layer_idx, S, probs, idx, ok, N)
        mediate = cfg.mediation != "off"
        if mediate:
            pseudo = self._pseudo_bias(pseudo_base, idx, probs, summaries, gate, S, q.dtype)  # (B,H_kv,nb,1|G,F)
        b = torch.arange(B, device=q.device)[:, None, None, None]
        h = torch.arange(Hkv, device=q.device)[None, :, None, None]
        offsets = torch.arange(L, device=q.device)
        n_keys = n_pick * L + (Fs if mediate else 0)
        chunk = max(1, BLOCK_CHUNK_ELEMENTS // (B * Hkv * (Lq * n_keys + 2 * n_keys * D)))
        outs = []
        for start in range(0, nb, chunk):
            blk = slice(start, min(start + chunk, nb))
            sel, sel_ok = idx[:, :, blk], ok[:, :, blk]  # (B, H_kv, C, n)
            C = sel.shape[2]
            keys = kb[b, h, sel].flatten(3, 4)  # (B, H_kv, C, n*L, D): only the chosen slices are read
            values = vb[b, h, sel].flatten(3, 4)
            key_pos = (sel[..., None] * L + offsets).flatten(3)  # (B, H_kv, C, n*L)
            q_pos = start_pos[blk, None] + offsets[:Lq]  # (C, Lq)
            allowed = (key_pos[:, :, :, None, :] <= q_pos[:, :, None]) & sel_ok.repeat_interleave(L, -1)[:, :, :, None]
            if mask is not None:
                q_row = (q_pos - P0).clamp(0, T - 1)[None, None, :, :, None]
                allowed = allowed & mask[:, 0][b[..., None], q_row, key_pos.clamp_max(S - 1)[:, :, :, None, :]]
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, NEG_INF)
            bias = bias[:, :, :, None]  # (B, H_kv, C, 1, Lq, n*L): one mask for the group's heads
            if mediate:
                keys = torch.cat([keys, summaries.kmean[:, :, None].expand(-1, -1, C, -1, -1).to(keys.dtype)], 3)
                values = torch.cat([values, summaries.vmean[:, :, None].expand(-1, -1, C, -1, -1).to(keys.dtype)], 3)
                rows = pseudo.shape[3]  # 1, or G with a per-head learned gate
                bias = torch.cat([bias.expand(-1, -1, -1, rows, -1, -1),
                                  pseudo[:, :, blk, :, None].expand(-1, -1, -1, -1, Lq, -1)], -1)
            n = keys.shape[3]
            # Each (batch, KV head, block) is one SDPA batch row; its G query heads share the keys and the mask.
            out = F.scaled_dot_product_attention(
                qb[:, :, blk].reshape(B * Hkv * C, G, Lq, D),
                keys.reshape(B * Hkv * C, 1, n, D).to(q.dtype).expand(-1, G, -1, -1),
                values.reshape(B * Hkv * C, 1, n, D).to(q.dtype).expand(-1, G, -1, -1),
                attn_mask=bias.reshape(B * Hkv * C, bias.shape[3], Lq, n),
            )
            outs.append(out.view(B, Hkv, C, G * Lq, D))
        out = torch.cat(outs, 2).view(B, Hkv, nb, G, Lq, D).transpose(2, 3).reshape(B, H, nb * Lq, D)
        return out[:, :, front : front + T]

    # ------------------------------------------------------------------ mediation

    def _pseudo_bias(self, pseudo_base, idx, probs, summaries, gate, key_len, dtype) -> torch.Tensor:
        """Logit bias (B, H_kv, Q, 1|G, F) of the pseudo-tokens: log(count) (+ log g) for unselected
        candidates, -inf for the rest.

        Adding it to q . mean_key / sqrt(d) and taking one softmax with the exact tokens is the two-partition
        merge ``(e^lse_x out_x + g e^lse_m out_m) / (e^lse_x + g e^lse_m)``.
        """
        B, Hkv = idx.shape[:2]
        bias = pseudo_base.expand(B, Hkv, -1, -1).scatter(-1, idx, NEG_INF)
        if bias.shape[-1] != summaries.num_slices:
            bias = bias[..., : summaries.num_slices]
        bias = (bias if bias.dtype == dtype else bias.to(dtype))[:, :, :, None]
        if gate is not None:
            unselected = bias[:, :, :, 0] > NEG_INF
            left_out = (summaries.count[:, :, None] * unselected).sum(-1) / key_len  # (B, H_kv, Q)
            left_mass = (probs * unselected).sum(-1)
            log_gate = gate(left_out, left_mass).to(dtype)[..., None]  # (B, H_kv, Q, G, 1)
            bias = bias + torch.where(unselected[:, :, :, None], log_gate, 0.0)  # no gradient through -inf
        return bias


@attention_backend.register(AMAConfig)
def _ama_backend(config: AMAConfig, decoder: nn.Module) -> AMAAttention:
    """``model.set_attention(AMAConfig(...))`` and ``generate(attention=AMAConfig(...))`` build their backend here."""
    return AMAAttention(config, decoder)


def gather_slices(xs: tuple[torch.Tensor, ...], sel: torch.Tensor, slice_len: int) -> list[torch.Tensor]:
    """Whole slices ``sel`` (B, H, n) of each (B, H, S, D) tensor in ``xs``, as (B, H, n, slice_len, D),
    copying only those.

    When the storage is laid out in whole slices (a ``SlicedKVCache``, or S a multiple of the slice length)
    this is a single ``index_select`` over a (blocks, slice_len * D) view; otherwise one per (batch, head).
    """
    B, H, S, D = xs[0].shape
    row = slice_len * D
    out_shape = (*sel.shape, slice_len, D)
    strides = xs[0].stride()
    if all(x.stride() == strides for x in xs) and strides[2:] == (D, 1) and strides[0] % row == 0 \
            and strides[1] % row == 0 and all(x.storage_offset() % row == 0 for x in xs):
        starts = _block_starts(B, H, strides[0] // row, strides[1] // row, sel.device)
        rows = (sel + starts).flatten()
        size = ((B - 1) * strides[0] + (H - 1) * strides[1]) // row + S // slice_len
        return [x.as_strided((size, row), (row, 1), x.storage_offset()).index_select(0, rows).view(out_shape)
                for x in xs]
    outs = []
    for x in xs:
        full = x[:, :, : S // slice_len * slice_len].unflatten(2, (-1, slice_len))
        outs.append(torch.stack([full[b, h].index_select(0, sel[b, h]) for b in range(B) for h in range(H)]))
    return [out.view(out_shape) for out in outs]


@functools.lru_cache(maxsize=16)
def _block_starts(B: int, H: int, batch_stride: int, head_stride: int, device: torch.device) -> torch.Tensor:
    """(B, H, 1) index of the first slice-sized block of every (batch, head) row in a flat block view."""
    b = torch.arange(B, device=device)[:, None, None] * batch_stride
    return b + torch.arange(H, device=device)[None, :, None] * head_stride


def key_validity(mask: torch.Tensor | None, query_len: int) -> torch.Tensor | None:
    """(B, S) True for real (non-padding) keys, read off the backend's (B, 1, T, S) mask.

    A padding key is attended by no query but its own (``build_attention_mask`` lets every query see itself),
    so a key is real if another query sees it; the last key, which no later query could see, counts as real.
    """
    if mask is None:
        return None
    m = mask[:, 0]  # (B, T, S)
    if query_len == 1:
        return m[:, 0]
    S = m.shape[-1]
    P0 = S - query_len
    current = torch.arange(query_len, device=m.device)
    seen = m.sum(1)  # (B, S)
    seen[:, P0:] -= m[:, current, current + P0].long()
    valid = seen > 0
    valid[:, -1] = True
    return valid


def attach_gate(attn: nn.Module) -> MediationGate:
    """Give an attention module its learned mediation gate (kept if it already has one), as a submodule so
    that optimisers, PEFT and ``state_dict`` see it: ``model.layers.N.self_attn.ama_gate``."""
    if not isinstance(getattr(attn, "ama_gate", None), MediationGate):
        device = attn.q_proj.weight.device
        attn.ama_gate = MediationGate(attn.num_heads).to(device)
    return attn.ama_gate
