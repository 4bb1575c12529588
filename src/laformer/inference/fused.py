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
from laformer.rope import apply_rotary


def _fusable(linears: list[nn.Module]) -> bool:
    """Only plain, bias-free float linears of one dtype can be concatenated (quantized swaps stay as they are)."""
    return all(type(m) is nn.Linear and m.bias is None for m in linears) and len(
        {m.weight.dtype for m in linears}
    ) == 1


def _concat(linears: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([m.weight.detach() for m in linears], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


class _SplitStateDict:
    """State-dict hooks that show a fused weight as its parts under their original names."""

    fused_name: str
    part_names: tuple[str, ...]
    split_sizes: list[int]

    def _install_hooks(self) -> None:
        self.register_state_dict_post_hook(_split_hook)
        self.register_load_state_dict_pre_hook(_fuse_hook)


def _split_hook(module, state_dict, prefix, local_metadata) -> None:
    fused = state_dict.pop(f"{prefix}{module.fused_name}.weight")
    for name, part in zip(module.part_names, fused.split(module.split_sizes, dim=0)):
        state_dict[f"{prefix}{name}.weight"] = part.clone()


def _fuse_hook(module, state_dict, prefix, *args) -> None:
    keys = [f"{prefix}{name}.weight" for name in module.part_names]
    if all(k in state_dict for k in keys):
        state_dict[f"{prefix}{module.fused_name}.weight"] = torch.cat([state_dict.pop(k) for k in keys], dim=0)


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
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
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

    Layers whose projections are not plain float ``nn.Linear`` (e.g. already quantized) are left as they are, so
    quantize after fusing to get both. Outputs are unchanged up to float rounding of the larger matmuls.
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
