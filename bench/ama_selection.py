"""How good is AMA's choice of slices? Perplexity at equal budget under different slice scorers, up to an oracle.

The first three quarters of a window are prefilled once with full attention; the scored quarter then runs with
every query choosing its own slices (the decode rule: sinks + local window + the best-scored candidates, exact
attention over those only, no mediation), as ``bench/ama.py --ppl-prefill shared`` measures AMA itself. Only the
scorer changes between rows:

- ``bound``: AMA's default, sum over the group's heads of the min/max upper bound of q.k (Quest's criterion);
- ``mean-mass``: per head, softmax over the candidates of q . mean key, summed over the group's heads;
- ``scanN``: every candidate token's q.k computed with keys rounded to N bits (one scale per token), per-head
  softmax, attention mass summed per slice and over the group's heads: what a scan of an N-bit key copy gives;
- ``pcaR[-bits][-max]``: the same mass from keys projected on their R principal directions (fitted on the keys
  cached before the scored queries), optionally rounded to ``bits``; ``-max`` ranks by each slice's best token;
- ``qpcaR``: the rank-R form of q.k that is best under the queries' and keys' covariances (Loki-style low-rank
  keys, query-aware);
- ``oracle``: the same with the exact keys: the true attention mass of each slice, the best any scorer can do.

This is a measurement tool written in plain PyTorch (dense scores, so not fast): it says what a better scorer
would buy before anyone builds one.

    python bench/ama_selection.py --context 8192 --local 512 --methods full,bound,scan4,pca16,qpca32,oracle [--passkey-trials 20]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ama  # noqa: E402  (the same windows, passkey prompts and baseline as bench/ama.py)

from laformer import LaFormerForCausalLM  # noqa: E402
from laformer.ama.cache import SlicedKVCache  # noqa: E402
from laformer.tokenizer import LaFormerTokenizer  # noqa: E402

QUERY_CHUNK = 256  # queries scored at once (bounds the dense score matrix)


def rounded(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """Keys rounded to ``bits``-bit integers with one scale per token (symmetric), back in float."""
    levels = 2 ** (bits - 1) - 1
    scale = keys.abs().amax(-1, keepdim=True).clamp_min(1e-30) / levels
    return torch.round(keys / scale) * scale


def principal_directions(keys: torch.Tensor):
    """Per KV head, the key mean (H_kv, 1, D) and the principal directions (H_kv, D, D), largest variance first,
    as both the key and the query projection."""
    mean = keys.mean(1, keepdim=True)
    centered = keys - mean
    cov = centered.transpose(-1, -2) @ centered / keys.shape[1]
    vectors = torch.linalg.eigh(cov)[1].flip(-1)
    return mean, (vectors, vectors)


def bilinear_directions(q: torch.Tensor, keys: torch.Tensor):
    """Per KV head, key and query projections (H_kv, D, D) whose first r columns give the rank-r form A that
    minimises E[(q.k - q A k)^2] under the queries' second moment (taken from the scored queries themselves,
    pooled over the group) and the keys' covariance."""
    Hkv, _, D = keys.shape
    mean = keys.mean(1, keepdim=True)
    centered = keys - mean
    eye = torch.eye(D) * 1e-6
    ck = centered.transpose(-1, -2) @ centered / keys.shape[1]
    qg = q.reshape(Hkv, -1, D)  # the group's heads pooled
    cq = qg.transpose(-1, -2) @ qg / qg.shape[1]
    lq, lk = torch.linalg.cholesky(cq + eye * cq.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]), \
        torch.linalg.cholesky(ck + eye * ck.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None])
    u, _, _ = torch.linalg.svd(lq.transpose(-1, -2) @ lk)
    key_basis = lq @ u  # z = U^T Lq^T k
    query_basis = torch.linalg.solve_triangular(lq.transpose(-1, -2), u, upper=True)  # Lq^-T U
    return mean, (key_basis, query_basis)


def slice_scores(method: str, q, k, scores, slices: int, slice_len: int, group: int, basis=None,
                 basis_mean=None) -> torch.Tensor:
    """(H_kv, Q, slices) score of each full slice for each query; larger is better.

    ``q`` (H, Q, D), ``k`` (H_kv, S, D), ``scores`` (H, Q, S) exact q.k / sqrt(d) with the causal mask applied.
    """
    H, Q, D = q.shape
    Hkv = H // group
    blocks = k[:, : slices * slice_len].reshape(Hkv, slices, slice_len, D)
    if method == "bound":  # sum_d max(q_d kmin_d, q_d kmax_d) = q . center + |q| . radius
        low, high = blocks.amin(2), blocks.amax(2)
        center, radius = [t.repeat_interleave(group, 0) for t in ((high + low) / 2, (high - low) / 2)]
        bound = q @ center.transpose(-1, -2) + q.abs() @ radius.transpose(-1, -2)
        return bound.view(Hkv, group, Q, slices).sum(1)
    if method == "mean-mass":
        logits = q @ blocks.mean(2).repeat_interleave(group, 0).transpose(-1, -2) / math.sqrt(D)
        return logits.softmax(-1).view(Hkv, group, Q, slices).sum(1)
    if method.startswith(("pca", "qpca")):  # q.k from keys projected on R directions, optionally rounded
        rank, *options = method.lstrip("q")[3:].split("-")
        key_basis, query_basis = basis
        z = (k - basis_mean) @ key_basis[..., : int(rank)]  # (H_kv, S, r)
        bits = [int(o) for o in options if o.isdigit()]
        if bits:
            z = rounded(z, bits[0])
        qz = q @ query_basis[..., : int(rank)].repeat_interleave(group, 0)  # (H, Q, r)
        approx = qz @ z.repeat_interleave(group, 0).transpose(-1, -2) / math.sqrt(D)
        scores = approx.masked_fill(scores == float("-inf"), float("-inf"))
        if "max" in options:
            best = scores[..., : slices * slice_len].unflatten(-1, (slices, slice_len)).amax(-1)  # (H, Q, slices)
            return best.softmax(-1).view(Hkv, group, Q, slices).sum(1)
    elif method.startswith("scan"):
        keys = rounded(k, int(method[4:])).repeat_interleave(group, 0)
        scores = (q @ keys.transpose(-1, -2) / math.sqrt(D)).masked_fill(scores == float("-inf"), float("-inf"))
    elif method != "oracle":
        raise SystemExit(f"unknown method {method!r}: use full, bound, mean-mass, scanN, pcaR, qpcaR or oracle")
    mass = scores[..., : slices * slice_len].softmax(-1)  # over all visible tokens: only the ranking matters
    return mass.reshape(Hkv, group, Q, slices, slice_len).sum((1, 4))


def selective_attention(method: str, budget: int, slice_len: int, local: int):
    """An attention backend that runs ``method``'s choice for every query of a chunked (cached) forward."""
    chosen_slices = (budget - slice_len - local) // slice_len  # after one sink slice and the local window

    def backend(q, k, v, mask, *, layer_idx=0, cache=None):
        _, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        group = H // Hkv
        if S <= budget:
            return ama.full_attention(q, k, v, mask, layer_idx=layer_idx, cache=cache)
        slices = S // slice_len
        keys, values = k[0].repeat_interleave(group, 0), v[0].repeat_interleave(group, 0)
        out = torch.empty_like(q)
        column = torch.arange(slices)
        basis_mean, basis = None, None
        if method.startswith("pca"):
            basis_mean, basis = principal_directions(k[0, :, : max(S - T, budget)])
        elif method.startswith("qpca"):
            basis_mean, basis = bilinear_directions(q[0], k[0, :, : max(S - T, budget)])
        for first in range(0, T, QUERY_CHUNK):
            rows = slice(first, min(T, first + QUERY_CHUNK))
            position = torch.arange(S - T + rows.start, S - T + rows.stop)
            scores = (q[0, :, rows] @ keys.transpose(-1, -2)) / math.sqrt(D)
            scores = scores.masked_fill(torch.arange(S) > position[:, None], float("-inf"))
            own = (position // slice_len)[:, None]
            kept = (column == 0) | ((column <= own) & (column > own - local // slice_len))  # (Q, slices)
            candidate = ~kept & (column <= own)
            rank = slice_scores(method, q[0, :, rows], k[0], scores, slices, slice_len, group, basis, basis_mean)
            rank = rank.masked_fill(~candidate, float("-inf"))
            top = rank.topk(min(chosen_slices, slices), -1)
            chosen = torch.zeros_like(rank, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))
            keep = (chosen | kept).repeat_interleave(slice_len, -1).repeat_interleave(group, 0)
            keep = F.pad(keep, (0, S - slices * slice_len), value=True)  # the partial last slice is local
            out[0, :, rows] = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ values
        return out

    return backend


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--slice-len", type=int, default=32)
    parser.add_argument("--local", type=int, default=768, help="local window tokens (AMA's default: 3/4 budget)")
    parser.add_argument("--methods", default="full,bound,mean-mass,scan2,scan4,scan8,oracle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passkey-trials", type=int, default=0,
                        help="also passkey accuracy over this many trials (bench/ama.py's, exact prefill)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = LaFormerForCausalLM.from_pretrained("smollm2-135m-instruct").eval()
    tokenizer = LaFormerTokenizer.from_pretrained("smollm2-135m-instruct")
    methods = args.methods.split(",")
    print(f"context {args.context}, budget {args.budget} = 1 sink slice + local {args.local} + "
          f"{(args.budget - args.slice_len - args.local) // args.slice_len} chosen slices of {args.slice_len}")
    ppl = perplexities(model, tokenizer, methods, args)
    keys = passkeys(model, tokenizer, methods, args) if args.passkey_trials else {}
    print(f"{'scorer':<12}{'ppl':>9}{'vs full':>9}" + (f"{'passkey %':>11}" if keys else ""))
    for method in methods:
        change = f"{100 * (ppl[method] / ppl['full'] - 1):+.1f} %" if "full" in ppl else "-"
        print(f"{method:<12}{ppl[method]:>9.3f}{change:>9}" + (f"{keys[method]:>11.0f}" if keys else ""))


def backend_for(method: str, args):
    return ama.full_attention if method == "full" else selective_attention(
        method, args.budget, args.slice_len, args.local)


def perplexities(model, tokenizer, methods: list[str], args) -> dict[str, float]:
    """Perplexity of the last quarter of one window (bench/ama.py's first) per scorer, after an exact prefill."""
    ids = ama.text_windows(tokenizer, args.context, 1)[0]
    scored = len(ids) // 4
    split = len(ids) - scored - 1  # the last context token's logits predict the first scored token
    cache = SlicedKVCache(model.config.num_hidden_layers, args.slice_len, capacity=len(ids) + args.slice_len)
    model.decoder.set_attention(ama.full_attention)
    model(ids[None, :split], past_key_values=cache, use_cache=True, logits_to_keep=1)
    result = {}
    for method in methods:
        model.decoder.set_attention(backend_for(method, args))
        cache.crop(split)
        logits = model(ids[None, split:], past_key_values=cache, use_cache=True).logits[0, :-1].float()
        result[method] = math.exp(F.cross_entropy(logits, ids[-scored:]).item())
    model.decoder.set_attention(None)
    return result


def passkeys(model, tokenizer, methods: list[str], args) -> dict[str, float]:
    """bench/ama.py's passkey accuracy (%) per scorer: prompt body prefilled exactly, question and answer under
    the scorer's selection."""
    for method in methods:
        if method != "full":
            ama.METHODS[method] = backend_for(method, args)  # a backend stands for itself
    outcomes = ama.passkey(model, tokenizer, args.context, methods, args.passkey_trials, shared=True)
    return {method: ama.percent(results) for method, results in outcomes.items()}


if __name__ == "__main__":
    main()
