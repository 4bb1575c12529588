"""The engine's fused copy of a model's projections: one q/k/v and one gate/up matrix per layer.

At batch 1 a decode step is a chain of small matrix-vector products whose fixed cost per call matters, so the
native step multiplies by two matrices per layer where the model holds five. The model itself keeps the separate
``q_proj``/``k_proj``/``v_proj``/``gate_proj``/``up_proj`` modules: that is the layout Hugging Face checkpoints
and PEFT adapters name, and what LoRA wraps by name. The fused rows live here, in an object the engine owns,
which shares everything else (norms, ``o_proj``, ``down_proj``, embedding, head) with the model and never
changes it. ``FusedView.key(model)`` identifies the weights it was built from, so the engine rebuilds it when
they change (training, ``load_state_dict``, adapters merged).
"""

from __future__ import annotations

import torch
from torch import nn

from laformer.quantization import QuantizedLinear


def fusable(linears: list[nn.Module]) -> bool:
    """Bias-free linears of one kind: plain float ones of one dtype, or quantized ones of one width and group size.

    Every tensor of both kinds is laid out one row per output feature, so fusing is a concatenation of rows.
    """
    first = linears[0]
    if any(type(m) is not type(first) or getattr(m, "bias", None) is not None for m in linears):
        return False
    if type(first) is nn.Linear:
        return len({m.weight.dtype for m in linears}) == 1
    return isinstance(first, QuantizedLinear) and len({m.group_size for m in linears}) == 1


@torch.no_grad()
def concat_rows(linears: list[nn.Module]) -> nn.Module:
    """One linear whose output is the parts' outputs side by side (a copy: the parts stay as they are)."""
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
    return fused.eval()


class FusedAttention(nn.Module):
    """A layer's attention weights as the native step reads them: ``qkv_proj`` (rows q|k|v) and ``o_proj``."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.qkv_proj = concat_rows([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self._attn = [attn]  # a list: not a submodule, so parameters() lists the fused rows once

    @property
    def backend(self):
        """The model layer's attention backend now (``set_attention`` may change it after the view is built)."""
        return self._attn[0].backend


class FusedMLP(nn.Module):
    """A layer's MLP weights as the native step reads them: ``gate_up_proj`` (rows gate|up) and ``down_proj``."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = concat_rows([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj


class FusedLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.self_attn, self.mlp = FusedAttention(layer.self_attn), FusedMLP(layer.mlp)


class FusedDecoder(nn.Module):
    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.embed_tokens, self.norm, self.rotary_emb = decoder.embed_tokens, decoder.norm, decoder.rotary_emb
        self.layers = nn.ModuleList(FusedLayer(layer) for layer in decoder.layers)


class FusedView(nn.Module):
    """``model`` with fused projections, for the native step; build it with ``FusedView.create``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.config = model.config
        self.decoder = FusedDecoder(model.decoder)
        self.lm_head = model.lm_head
        self.source_key = self.key(model)

    @classmethod
    def create(cls, model: nn.Module) -> "FusedView | str":
        """The view of ``model``, or why its projections cannot be fused (e.g. LoRA-wrapped ones)."""
        for i, layer in enumerate(model.decoder.layers):
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
            if None in parts or not fusable(parts):
                return f"layer {i}'s q/k/v projections are not plain or quantized linears of one kind (adapters?)"
            parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")]
            if None in parts or not fusable(parts):
                return f"layer {i}'s gate/up projections are not plain or quantized linears of one kind (adapters?)"
        return cls(model)

    @staticmethod
    def key(model: nn.Module) -> tuple:
        """Where and at which version the model's fused-over tensors are: equal keys mean equal weights."""
        parts = []
        for layer in model.decoder.layers:
            for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.mlp.gate_proj, layer.mlp.up_proj):
                for tensor in (*module._parameters.values(), *module._buffers.values()):
                    if tensor is not None:
                        parts.append((tensor.data_ptr(), _version(tensor)))
        return tuple(parts)


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor: it cannot be changed in place outside inference mode
        return -1
