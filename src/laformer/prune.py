"""Pruning: unstructured magnitude pruning, and structured pruning that really shrinks the matrices.

* ``magnitude_prune``: zero the smallest weights of the decoder's linears, per matrix or with one global
  threshold. Shapes stay; the zeros only pay off with sparse kernels or compression, so it is a quality study.
* ``prune_ffn``: remove the least important SwiGLU channels of each layer (rows of gate/up, columns of down).
* ``prune_heads``: remove the least important key/value groups of each layer: a KV head together with the query
  heads that share it, so grouped-query attention stays consistent (one group per KV head; with plain multi-head
  attention a group is one head).

Structured pruning records each layer's new sizes in ``config.extra["pruning"]`` (``intermediate_sizes``,
``attention_heads`` as ``[num_heads, num_kv_heads]`` per layer), which ``save_pretrained`` writes to config.json
and ``from_pretrained`` reads back to build the smaller layers. Importance is weight magnitude, or, given
calibration ``input_ids``, the mean activation magnitude (which costs far less perplexity).
``perplexity`` measures the cost, for pruning and quantization alike.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from laformer.errors import ConfigError, GenerationError

SCOPES = ("layer", "global")
PRUNABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_fraction(value: float, what: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{what} must be a fraction in [0, 1), got {value!r}; e.g. 0.3 removes 30%")


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PRUNABLE
    }


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "layer") -> dict[str, float]:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights in every decoder linear; returns each one's
    achieved sparsity. ``scope="layer"`` prunes each matrix to the same sparsity, ``"global"`` uses one
    threshold for all (matrices with smaller weights lose more)."""
    _check_fraction(sparsity, "sparsity")
    if scope not in SCOPES:
        raise ConfigError(f"pruning scope {scope!r} is not supported; use one of {SCOPES}")
    linears = _decoder_linears(model)
    if not linears:
        raise ConfigError("the model has no float decoder linears to prune (quantize after pruning, not before)")
    if sparsity > 0:
        if scope == "global":
            magnitudes = torch.cat([m.weight.detach().abs().flatten().float() for m in linears.values()])
            thresholds = dict.fromkeys(linears, _kth_smallest(magnitudes, sparsity))
            del magnitudes
        else:
            thresholds = {n: _kth_smallest(m.weight.detach().abs().flatten().float(), sparsity)
                          for n, m in linears.items()}
        for name, module in linears.items():
            if thresholds[name] is not None:
                module.weight.masked_fill_(module.weight.abs().float() <= thresholds[name], 0.0)
    model_config = getattr(model, "config", None)
    if model_config is not None:
        model_config.extra.setdefault("pruning", {})["magnitude"] = {"sparsity": sparsity, "scope": scope}
    return {name: (m.weight == 0).float().mean().item() for name, m in linears.items()}


def _kth_smallest(values: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """The value below or at which ``fraction`` of ``values`` lie (None when that is no element at all)."""
    k = int(fraction * values.numel())
    return values.kthvalue(k).values if k else None


@contextmanager
def _record_inputs(modules: dict[str, nn.Module]):
    """Accumulate the mean absolute value of each input feature of ``modules`` over the forward passes."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    stats: dict[str, torch.Tensor] = {}
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        stats.update({n: sums[n] / counts[n] for n in sums})


def _input_activity(model: nn.Module, modules: dict[str, nn.Module], input_ids: torch.Tensor | None):
    if input_ids is None:
        return None
    with _record_inputs(modules) as stats, torch.no_grad():
        model(input_ids)
    return stats


def _layers(model: nn.Module) -> nn.ModuleList:
    decoder = getattr(model, "decoder", model)
    return decoder.layers


def _shrink(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, keep).clone()
    shrunk = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    shrunk.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    return shrunk


def _pruning_record(model: nn.Module) -> dict:
    config = model.config
    layers = _layers(model)
    record = config.extra.setdefault("pruning", {})
    record["intermediate_sizes"] = [layer.mlp.gate_proj.out_features for layer in layers]
    record["attention_heads"] = [[layer.self_attn.num_heads, layer.self_attn.num_kv_heads] for layer in layers]
    return record


def _check_float_layers(model: nn.Module) -> None:
    for layer in _layers(model):
        for module in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj, layer.self_attn.q_proj,
                       layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
            if type(module) is not nn.Linear:
                raise ConfigError(
                    f"structured pruning needs plain float linears, found {type(module).__name__}; prune before "
                    "quantizing, fusing or adding adapters"
                )


@torch.no_grad()
def prune_ffn(
    model: nn.Module, fraction: float, input_ids: torch.Tensor | None = None, multiple_of: int = 32
) -> list[int]:
    """Remove ``fraction`` of each layer's SwiGLU channels, the least important first; returns the new sizes.

    A channel's importance is ``|down[:, i]|`` times its activation: the mean ``|silu(gate) * up|`` over
    ``input_ids`` when given, else the weight norms ``|gate[i]| * |up[i]|``. The kept count is rounded to a
    multiple of ``multiple_of`` so that the pruned model can still be quantized (int4 groups are 32 wide).
    """
    _check_fraction(fraction, "FFN pruning fraction")
    _check_float_layers(model)
    layers = _layers(model)
    downs = {str(i): layer.mlp.down_proj for i, layer in enumerate(layers)}
    activity = _input_activity(model, downs, input_ids)
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        size = mlp.gate_proj.out_features
        keep_count = max(1, size - int(round(fraction * size)))
        if multiple_of > 1 and size >= multiple_of:
            keep_count = min(size, max(multiple_of, round(keep_count / multiple_of) * multiple_of))
        if activity is not None:
            act = activity[str(i)]
        else:
            act = mlp.gate_proj.weight.float().norm(dim=1) * mlp.up_proj.weight.float().norm(dim=1)
        importance = mlp.down_proj.weight.float().norm(dim=0) * act
        keep = importance.topk(keep_count).indices.sort().values
        mlp.gate_proj = _shrink(mlp.gate_proj, keep, 0)
        mlp.up_proj = _shrink(mlp.up_proj, keep, 0)
        mlp.down_proj = _shrink(mlp.down_proj, keep, 1)
    return _pruning_record(model)["intermediate_sizes"]


@torch.no_grad()
def prune_heads(model: nn.Module, fraction: float, input_ids: torch.Tensor | None = None) -> list[list[int]]:
    """Remove ``fraction`` of each layer's key/value groups (rounded, at least one kept), least important first;
    returns ``[num_heads, num_kv_heads]`` per layer.

    A group's importance is the norm of its slice of ``o_proj`` times its output: the mean ``|attention
    output|`` of its query heads over ``input_ids`` when given, else the norm of its ``v_proj`` rows.
    """
    _check_fraction(fraction, "head pruning fraction")
    _check_float_layers(model)
    layers = _layers(model)
    outs = {str(i): layer.self_attn.o_proj for i, layer in enumerate(layers)}
    activity = _input_activity(model, outs, input_ids)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        groups, per_group, D = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, attn.head_dim
        keep_groups = max(1, groups - int(round(fraction * groups)))
        if keep_groups == groups:
            continue
        o_norm = attn.o_proj.weight.float().view(-1, groups, per_group * D).norm(dim=(0, 2))  # (groups,)
        if activity is not None:
            act = activity[str(i)].view(groups, per_group * D).mean(-1)
        else:
            act = attn.v_proj.weight.float().view(groups, D, -1).norm(dim=(1, 2))
        kept = (o_norm * act).topk(keep_groups).indices.sort().values
        kv_rows = (kept[:, None] * D + torch.arange(D)).flatten()
        q_rows = (kept[:, None] * per_group * D + torch.arange(per_group * D)).flatten()
        attn.q_proj = _shrink(attn.q_proj, q_rows, 0)
        attn.k_proj = _shrink(attn.k_proj, kv_rows, 0)
        attn.v_proj = _shrink(attn.v_proj, kv_rows, 0)
        attn.o_proj = _shrink(attn.o_proj, q_rows, 1)
        attn.num_heads, attn.num_kv_heads = keep_groups * per_group, keep_groups
    return _pruning_record(model)["attention_heads"]


def apply_pruned_shapes(model: nn.Module) -> None:
    """Resize a freshly built model's layers to the sizes in ``config.extra["pruning"]`` (used when loading)."""
    record = model.config.extra.get("pruning", {})
    layers = _layers(model)
    device = next(model.parameters()).device
    hidden = model.config.hidden_size
    sizes = record.get("intermediate_sizes")
    heads = record.get("attention_heads")
    for name, values in (("intermediate_sizes", sizes), ("attention_heads", heads)):
        if values is not None and len(values) != len(layers):
            raise ConfigError(
                f"config.json's laformer.pruning.{name} lists {len(values)} layers but the model has {len(layers)}; "
                "the config was edited by hand or belongs to another model"
            )
    for i, layer in enumerate(layers):
        if sizes is not None:
            size = sizes[i]
            layer.mlp.gate_proj = nn.Linear(hidden, size, bias=False, device=device)
            layer.mlp.up_proj = nn.Linear(hidden, size, bias=False, device=device)
            layer.mlp.down_proj = nn.Linear(size, hidden, bias=False, device=device)
        if heads is not None:
            attn = layer.self_attn
            attn.num_heads, attn.num_kv_heads = heads[i]
            q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
            attn.q_proj = nn.Linear(hidden, q, bias=False, device=device)
            attn.k_proj = nn.Linear(hidden, kv, bias=False, device=device)
            attn.v_proj = nn.Linear(hidden, kv, bias=False, device=device)
            attn.o_proj = nn.Linear(q, hidden, bias=False, device=device)


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, window: int = 512) -> float:
    """exp(mean next-token loss) of a causal LM over ``input_ids`` (1-D or (1, T)), in non-overlapping windows."""
    ids = input_ids.reshape(-1)
    if ids.numel() < 2:
        raise GenerationError("perplexity needs at least 2 tokens of evaluation text; pass a longer text")
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window + 1][None]
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1]).logits.float()
        loss = nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total, count = total + loss.item(), count + chunk.shape[1] - 1
    return math.exp(total / count)
