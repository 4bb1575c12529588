"""Fused projections: one matmul for q/k/v and one for gate/up, swapped in for inference.

At batch 1 a decode step is a chain of small matrix-vector products whose fixed cost per call matters, so
five linears per layer become two. The swap keeps Hugging Face names on the outside: ``state_dict`` still
yields ``q_proj.weight`` ... and loading such a dict re-fuses it, so ``save_pretrained`` works unchanged.
Apply it after merging any adapters (PEFT targets ``q_proj`` by name).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from laformer.model import MLP, Attention
from laformer.quantization import QuantizedLinear
from laformer.rope import apply_rotary


def _fusable(linears: list[nn.Module]) -> bool:
    """Bias-free linears of one kind: plain float ones of one dtype, or quantized ones of one width and group size.

    Every tensor of both kinds is laid out one row per output feature, so fusing is a concatenation of rows.
    """
    first = linears[0]
    if any(type(m) is not type(first) or getattr(m, "bias", None) is not None for m in linears):
        return False
    if type(first) is nn.Linear:
        return len({m.weight.dtype for m in linears}) == 1
    return isinstance(first, QuantizedLinear) and len({m.group_size for m in linears}) == 1


def _concat(linears: list[nn.Module]) -> nn.Module:
    first, out_features = linears[0], sum(m.out_features for m in linears)
    if type(first) is nn.Linear:
        fused = nn.Linear(first.in_features, out_features, bias=False, device="meta")
    else:
        fused = type(first)(first.in_features, out_features, first.group_size, False, device="meta")
        fused.int8_activations = all(m.int8_activations for m in linears)
    for name, tensor in first.state_dict().items():
        joined = torch.cat([m.state_dict()[name] for m in linears], dim=0)
        if name in fused._parameters:
            fused._parameters[name] = nn.Parameter(joined, requires_grad=False)
        else:
            fused._buffers[name] = joined
    return fused


class _SplitStateDict:
    """State-dict hooks that show a fused module's tensors as its parts' under their original names."""

    fused_name: str
    part_names: tuple[str, ...]
    split_sizes: list[int]

    def _install_hooks(self) -> None:
        self.register_state_dict_post_hook(_split_hook)
        self.register_load_state_dict_pre_hook(_fuse_hook)


def _split_hook(module, state_dict, prefix, local_metadata) -> None:
    fused_prefix = f"{prefix}{module.fused_name}."
    for key in [k for k in state_dict if k.startswith(fused_prefix)]:
        tensor_name = key[len(fused_prefix):]
        for part, piece in zip(module.part_names, state_dict.pop(key).split(module.split_sizes, dim=0)):
            state_dict[f"{prefix}{part}.{tensor_name}"] = piece.clone()


def _fuse_hook(module, state_dict, prefix, *args) -> None:
    first = f"{prefix}{module.part_names[0]}."
    for key in [k for k in state_dict if k.startswith(first)]:
        tensor_name = key[len(first):]
        keys = [f"{prefix}{part}.{tensor_name}" for part in module.part_names]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{module.fused_name}.{tensor_name}"] = torch.cat([state_dict.pop(k) for k in keys])


class FusedAttention(_SplitStateDict, Attention):
    """``Attention`` with q/k/v computed by one ``qkv_proj``; same backend protocol, same outputs."""

    fused_name, part_names = "qkv_proj", ("q_proj", "k_proj", "v_proj")

    def __init__(self, attn: Attention) -> None:
        nn.Module.__init__(self)
        self.layer_idx, self.num_heads = attn.layer_idx, attn.num_heads
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.split_sizes = [m.out_features for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        self.qkv_proj = _concat([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.backend = attn.backend
        self._install_hooks()

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.head_dim).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
        cos, sin = rope
        q, k = apply_rotary(qkv[:, : H + Hkv], cos, sin).split([H, Hkv], dim=1)  # one rotation for q and k
        v = qkv[:, H + Hkv:]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = self.backend(q, k, v, mask, layer_idx=self.layer_idx, cache=cache)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class FusedMLP(_SplitStateDict, MLP):
    """SwiGLU with gate and up computed by one ``gate_up_proj``."""

    fused_name, part_names = "gate_up_proj", ("gate_proj", "up_proj")

    def __init__(self, mlp: MLP) -> None:
        nn.Module.__init__(self)
        self.split_sizes = [mlp.gate_proj.out_features, mlp.up_proj.out_features]
        self.gate_up_proj = _concat([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self._install_hooks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.split_sizes, dim=-1)
        return self.down_proj(F.silu(gate) * up)


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Swap every layer's attention and MLP for their fused versions, in place; returns how many were fused.

    Float and weight-only quantized projections both fuse (their rows are concatenated); layers whose projections
    are of mixed or unknown kinds (e.g. LoRA-wrapped) are left as they are. Outputs are unchanged up to the float
    rounding of a larger matmul.
    """
    fused = 0
    for layer in model.decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is Attention and _fusable([attn.q_proj, attn.k_proj, attn.v_proj]):
            layer.self_attn = FusedAttention(attn)
            fused += 1
        if type(mlp) is MLP and _fusable([mlp.gate_proj, mlp.up_proj]):
            layer.mlp = FusedMLP(mlp)
            fused += 1
    return fused
