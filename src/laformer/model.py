"""The LLaMA decoder: RMSNorm, rotary attention with grouped-query heads, SwiGLU MLP, task heads.

Module and parameter names follow Hugging Face (``model.layers.0.self_attn.q_proj.weight``) so that
safetensors checkpoints and PEFT adapters load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from laformer.attention import AttentionBackend, attention_backend, build_attention_mask, sdpa_attention
from laformer.cache import Cache, KVCache
from laformer.config import LaFormerConfig
from laformer.errors import GenerationError
from laformer.pretrained import PreTrainedMixin
from laformer.rope import RotaryEmbedding, apply_rotary


@dataclass
class BaseModelOutput:
    last_hidden_state: torch.Tensor
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    pooled_hidden_state: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weights' dtype, as the reference does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LaFormerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, config: LaFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.backend: AttentionBackend = sdpa_attention

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = self.backend(q, k, v, mask, layer_idx=self.layer_idx, cache=cache)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: LaFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LaFormerModel(PreTrainedMixin, nn.Module):
    """The decoder stack: token ids in, final normalised hidden states out."""

    base_model_prefix = ""
    hf_architecture = "LlamaModel"

    def __init__(self, config: LaFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    @property
    def decoder(self) -> "LaFormerModel":
        return self

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise GenerationError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if use_cache and past_key_values is None:
            past_key_values = KVCache(len(self.layers))
        if attention_mask is not None and attention_mask.dim() == 4:
            # A ready (B, 1, T, S) boolean mask over the cache's columns, from a caller that places keys itself
            # (the decode engine's slots); it knows the positions too.
            if position_ids is None:
                raise GenerationError("a 4-D attention_mask needs position_ids")
            mask, rope = attention_mask, self.rotary_emb(position_ids, x.dtype)
        else:
            mask, rope = self._mask_and_rope(attention_mask, position_ids, past_key_values, x)
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, past_key_values, use_reentrant=False)
            else:
                x = layer(x, rope, mask, past_key_values)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states[-1] = x
        return BaseModelOutput(x, past_key_values, tuple(hidden_states) if hidden_states else None)

    def _mask_and_rope(self, attention_mask, position_ids, cache, x) -> tuple[torch.Tensor | None, tuple]:
        """The backend's mask and the rotary tables for new tokens ``x`` after what ``cache`` holds."""
        B, T, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise GenerationError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the inputs need "
                f"({B}, {past + T}) (past tokens + new tokens)"
            )
        if past + T > self.config.max_position_embeddings:
            raise GenerationError(
                f"sequence of {past + T} tokens exceeds the model's context of "
                f"{self.config.max_position_embeddings}; truncate the input (truncation=True, max_length=...)"
            )
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past, T, x.device, B)
        return build_attention_mask(attention_mask, T, past + T, x.device), self.rotary_emb(position_ids, x.dtype)

    def set_attention(self, backend: AttentionBackend | None) -> None:
        """Route every layer's attention through ``backend`` (None restores exact SDPA attention).

        A sparse-attention config such as ``laformer.ama.AMAConfig`` is accepted too: ``attention_backend`` builds
        its backend for this model, so the model never imports the sparse variants.
        """
        backend = attention_backend(backend, self)
        for layer in self.layers:
            layer.self_attn.backend = backend or sdpa_attention

    def reset_buffers(self) -> None:
        self.rotary_emb.reset_parameters()


def default_position_ids(
    attention_mask: torch.Tensor | None, past: int, length: int, device: torch.device, batch: int
) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row sees the same positions as unpadded."""
    if attention_mask is None:
        return torch.arange(past, past + length, device=device).expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)[:, past:]


class LaFormerForCausalLM(PreTrainedMixin, nn.Module):
    hf_architecture = "LlamaForCausalLM"
    output_head = "lm_head"

    def __init__(self, config: LaFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LaFormerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def decoder(self) -> LaFormerModel:
        return self.model

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and type(self.lm_head) is nn.Linear:  # a quantized head has its own copy
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """``logits_to_keep=N`` computes logits for the last N positions only (generation needs 1)."""
        out = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, output_hidden_states
        )
        hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
        logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss, out.past_key_values, out.hidden_states)

    def set_attention(self, backend) -> None:
        """Route attention through ``backend`` (e.g. ``laformer.ama.AMAConfig(budget=1024)``; None: exact SDPA)."""
        self.model.set_attention(backend)

    def generate(self, input_ids: torch.Tensor, **kwargs):
        """Continue ``input_ids``; see ``laformer.generation.generate`` for the options."""
        from laformer.generation import generate

        return generate(self, input_ids, **kwargs)

    def stream(self, input_ids: torch.Tensor, tokenizer, **kwargs):
        """Yield decoded text pieces as they are produced; see ``laformer.generation.stream``."""
        from laformer.generation import stream

        return stream(self, input_ids, tokenizer, **kwargs)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts label t+1; label -100 is ignored."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


class LaFormerForSequenceClassification(PreTrainedMixin, nn.Module):
    """Classifies a sequence from the hidden state of its last non-padding token."""

    hf_architecture = "LlamaForSequenceClassification"
    output_head = "score"
    new_head_allowed = True  # fine-tuning starts from a causal LM's checkpoint, which has no classifier

    def __init__(self, config: LaFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.model = LaFormerModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)

    @property
    def decoder(self) -> LaFormerModel:
        return self.model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> SequenceClassifierOutput:
        if attention_mask is not None and not output_hidden_states:
            # Columns after every row's last real token are pure padding that causal attention never lets an
            # earlier token see: drop them, so a batch padded to a fixed length costs what its longest text does.
            keep = int(attention_mask.any(0).nonzero().max()) + 1 if attention_mask.any() else 1
            attention_mask = attention_mask[:, :keep]
            input_ids = input_ids[:, :keep] if input_ids is not None else None
            inputs_embeds = inputs_embeds[:, :keep] if inputs_embeds is not None else None
            position_ids = position_ids[:, :keep] if position_ids is not None else None
        out = self.model(
            input_ids, attention_mask, position_ids, None, inputs_embeds, False, output_hidden_states
        )
        hidden = out.last_hidden_state
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask, hidden)]
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device))
        return SequenceClassifierOutput(logits, loss, out.hidden_states, pooled)


def last_token_index(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left- or right-padded batches alike."""
    B, T = hidden.shape[:2]
    if attention_mask is None:
        return torch.full((B,), T - 1, device=hidden.device)
    positions = torch.arange(T, device=hidden.device)
    return (attention_mask.to(hidden.device).long() * positions).argmax(-1)
