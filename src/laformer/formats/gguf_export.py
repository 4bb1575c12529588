"""Write a causal LM as a GGUF file that llama.cpp, Ollama and LM Studio load (the inverse of ``formats.gguf``).

Tensors are named, shaped and laid out as llama.cpp's ``convert_hf_to_gguf.py`` writes them: q/k rows permuted so
rotary pairs are interleaved (undone in ``formats.gguf`` on load), norms in F32, a tied output head stored once as
``token_embd``, Llama-3.1 rope scaling as a ``rope_freqs`` tensor of per-frequency divisors.

No block is re-quantized when it need not be: a quantized linear whose format is the target's (int8 -> Q8_0,
int4 -> Q4_1, or Q4_0 when its minimums are -8 scales, all at group size 32) is written from its own bytes, and a
float weight still equal to the GGUF block it was loaded from is written as that block. So the default Q4_1 model
exported as ``q4_1`` keeps every tensor byte for byte; everything else is quantized with ``gguf.quants``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

from laformer.errors import CheckpointError, ConfigError
from laformer.formats.gguf import read_gguf_tensors
from laformer.formats.gguf_vocab import tokenizer_metadata
from laformer.model import LaFormerForSequenceClassification
from laformer.rope import rope_inverse_frequencies
from laformer.tokenizer import LaFormerTokenizer

T = GGMLQuantizationType
EXPORT_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
_FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
               T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q4_0: LlamaFileType.MOSTLY_Q4_0,
               T.Q4_1: LlamaFileType.MOSTLY_Q4_1}
# The embedding (and an untied output head) stays Q8_0 under 4-bit types: a 4-bit tied head cost SmolLM2 +6.7%
# perplexity (laformer.quantization), and llama.cpp's quantizer keeps it wider too.
_EMBEDDING_FLOOR = T.Q8_0
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def export_type(name: str) -> GGMLQuantizationType:
    """The ggml type of an export type name (``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``)."""
    qtype = EXPORT_TYPES.get(str(name).lower())
    if qtype is None:
        raise ConfigError(f"GGUF export type {name!r} is not supported; use one of {', '.join(EXPORT_TYPES)}")
    return qtype


def save_gguf(model: torch.nn.Module, path: str | Path, type: str = "f16", tokenizer: Any = None,
              name: str | None = None) -> Path:
    """Write ``model`` (a ``LaFormerForCausalLM``) and its tokenizer to the GGUF file ``path``; returns the path.

    ``tokenizer`` defaults to the one of the checkpoint the model was loaded from. The file appears only once it
    is complete (written under a temporary name, then renamed), so a failure leaves no partial file behind.
    """
    qtype = export_type(type)
    path = _check_output(Path(path))
    _check_exportable(model)
    config = model.config
    tokenizer = tokenizer if tokenizer is not None else _checkpoint_tokenizer(model)
    vocab = tokenizer_metadata(tokenizer, config.vocab_size, config.eos_token_ids)
    sizes = _sizes(model)
    sources = _source_blocks(model)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        writer = GGUFWriter(temporary, "llama")
        _write_hyperparameters(writer, model, qtype, name or _model_name(model), sizes)
        for key, value in vocab.items():
            _add_metadata(writer, key, value)
        for gguf_name, data, raw_type in _tensors(model, qtype, sources, sizes):
            writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------------------
# What can be exported


def _check_output(path: Path) -> Path:
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a file name for the GGUF, e.g. {path / 'model.gguf'}")
    if not path.parent.is_dir():
        raise CheckpointError(f"the folder {path.parent} does not exist; create it or choose another output path")
    return path


def _check_exportable(model: torch.nn.Module) -> None:
    if isinstance(model, LaFormerForSequenceClassification):
        raise ConfigError("a sequence classifier is not a causal LM: llama.cpp would need its score head, which "
                          "GGUF's llama architecture has no place for; serve it with laformer (`laformer classify`) "
                          "or export the language model it was fine-tuned from")
    if not hasattr(model, "lm_head") or not hasattr(model, "decoder"):
        raise ConfigError(f"{type(model).__name__} has no language-model head; export a LaFormerForCausalLM")
    peft = getattr(model, "peft_config", None)
    if peft is not None:
        hint = ("merge it first: model = laformer.peft.merge_and_unload(model)"
                if peft.peft_type in ("LORA", "ADALORA") else
                f"{type(peft).__name__} adapters cannot be folded into the weights, so llama.cpp cannot run them; "
                "fine-tune with LoRA to export")
        raise ConfigError(f"the model carries an unmerged adapter; {hint}")
    rope_type = (model.config.rope_scaling or {}).get("rope_type", (model.config.rope_scaling or {}).get("type"))
    if rope_type not in (None, "default", "linear", "llama3"):
        raise ConfigError(f"rope scaling {rope_type!r} has no GGUF form laformer writes; use linear or llama3")


def _checkpoint_tokenizer(model: torch.nn.Module) -> Any:
    source = getattr(model, "tokenizer", None)
    if source is not None:
        return source
    path = getattr(model, "checkpoint_info", {}).get("path")
    if path is None:
        raise ConfigError("the model was not loaded from a checkpoint, so its tokenizer is unknown; pass "
                          "tokenizer=LaFormerTokenizer.from_pretrained(...)")
    return LaFormerTokenizer.from_pretrained(path)


def _model_name(model: torch.nn.Module) -> str:
    path = getattr(model, "checkpoint_info", {}).get("path")
    return Path(path).stem if path else "laformer"


# ----------------------------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True)
class _Sizes:
    """The layer sizes written to the file: the largest of any layer (llama.cpp sizes every layer alike)."""

    ffn: int
    kv_heads: int
    group: int  # query heads per key/value head

    @property
    def heads(self) -> int:
        return self.kv_heads * self.group


def _sizes(model: torch.nn.Module) -> _Sizes:
    attention = [layer.self_attn for layer in model.decoder.layers]
    groups = {a.num_heads // a.num_kv_heads for a in attention}
    if len(groups) > 1:
        raise ConfigError(f"the layers share their key/value heads among {sorted(groups)} query heads; GGUF's "
                          "llama architecture needs one grouping for all layers (prune whole groups: prune_heads)")
    return _Sizes(ffn=max(layer.mlp.gate_proj.out_features for layer in model.decoder.layers),
                  kv_heads=max(a.num_kv_heads for a in attention), group=groups.pop())


def _write_hyperparameters(writer: GGUFWriter, model: torch.nn.Module, qtype: GGMLQuantizationType,
                           name: str, sizes: _Sizes) -> None:
    config = model.config
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[qtype])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(sizes.ffn)
    writer.add_head_count(sizes.heads)
    writer.add_head_count_kv(sizes.kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type("linear")
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _add_metadata(writer: GGUFWriter, key: str, value: Any) -> None:
    if key == "tokenizer.ggml.token_type":
        writer.add_token_types(value)
    elif key == "tokenizer.ggml.scores":
        writer.add_token_scores(value)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif key == "tokenizer.ggml.merges" and not value:
        return  # SentencePiece vocabularies may have none: llama.cpp then merges by score
    else:
        writer.add_array(key, value)


# ----------------------------------------------------------------------------------------------------------------
# Tensors


def _tensors(model: torch.nn.Module, qtype: GGMLQuantizationType, sources: dict[str, Any],
             sizes: _Sizes) -> Iterator[tuple[str, np.ndarray, GGMLQuantizationType | None]]:
    """(llama.cpp name, data, raw type) for every tensor, in llama.cpp's order."""
    config, decoder = model.config, model.decoder
    wide = qtype if qtype in (T.F32, T.F16, T.BF16, T.Q8_0) else _EMBEDDING_FLOOR
    yield ("token_embd.weight", *_encode(decoder.embed_tokens, wide, sources.get("model.embed_tokens.weight")))
    if config.rope_scaling and config.rope_scaling.get("rope_type", config.rope_scaling.get("type")) == "llama3":
        yield "rope_freqs.weight", _rope_divisors(config), None
    q_rows, kv_rows = sizes.heads * config.head_dim, sizes.kv_heads * config.head_dim
    padded = {"attn_q": (q_rows, None), "attn_k": (kv_rows, None), "attn_v": (kv_rows, None),
              "attn_output": (None, q_rows), "ffn_gate": (sizes.ffn, None), "ffn_up": (sizes.ffn, None),
              "ffn_down": (None, sizes.ffn)}
    for i, layer in enumerate(decoder.layers):
        yield f"blk.{i}.attn_norm.weight", _float32(layer.input_layernorm.weight), None
        for hf_name, gguf_name in _LAYER_NAMES.items():
            data, raw_type = _encode(layer.get_submodule(hf_name), qtype,
                                     sources.get(f"model.layers.{i}.{hf_name}.weight"))
            data = _pad(data, raw_type, *padded[gguf_name], f"blk.{i}.{gguf_name}")
            if gguf_name in ("attn_q", "attn_k"):
                data = _permute_rows(data, sizes.heads if gguf_name == "attn_q" else sizes.kv_heads)
            yield f"blk.{i}.{gguf_name}.weight", data, raw_type
        yield f"blk.{i}.ffn_norm.weight", _float32(layer.post_attention_layernorm.weight), None
    yield "output_norm.weight", _float32(decoder.norm.weight), None
    if not config.tie_word_embeddings:
        yield ("output.weight", *_encode(model.lm_head, wide, sources.get("lm_head.weight")))


def _pad(data: np.ndarray, raw_type: GGMLQuantizationType | None, rows: int | None, cols: int | None,
         name: str) -> np.ndarray:
    """Zero rows (FFN channels, heads) or columns appended up to the file's layer size.

    A pruned layer padded with zero channels computes exactly what it did: silu(0) * 0 = 0 for an FFN channel,
    and a head whose value rows and output columns are zero adds nothing. Zero bytes are zero values in every ggml
    type, so raw blocks are padded without decoding them.
    """
    if rows is not None and rows > data.shape[0]:
        data = np.concatenate([data, np.zeros((rows - data.shape[0], data.shape[1]), data.dtype)])
    if cols is None:
        return data
    block_size, type_size = GGML_QUANT_SIZES[raw_type] if raw_type is not None else (1, 1)
    have = data.shape[1] // type_size * block_size
    if cols > have:
        if (cols - have) % block_size:
            raise ConfigError(f"{name} must be padded from {have} to {cols} inputs for llama.cpp (which sizes every "
                              f"layer alike), not a whole number of {raw_type.name} blocks of {block_size}; prune "
                              "with multiple_of=32, or export as f16/f32")
        extra = (cols - have) // block_size * type_size
        data = np.concatenate([data, np.zeros((data.shape[0], extra), data.dtype)], axis=1)
    return data


def _float32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


def _rope_divisors(config) -> np.ndarray:
    """llama.cpp's ``rope_freqs``: per frequency, the unscaled rotation speed over the scaled one."""
    plain = rope_inverse_frequencies(dataclasses.replace(config, rope_scaling=None)).double()
    return (plain / rope_inverse_frequencies(config).double()).float().numpy()


def _permute_rows(data: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``permute`` on whole rows (so on raw blocks too): per head, two halves -> interleaved pairs."""
    rows = data.shape[0]
    return np.ascontiguousarray(
        data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape))


def _encode(module: torch.nn.Module, qtype: GGMLQuantizationType,
            source: Any) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """One matrix as ``qtype``: from the module's own blocks or its source GGUF's when exact, else quantized.

    Returns rows in Hugging Face's order (permute after) and the raw ggml type (None for plain float arrays).
    """
    block_size = GGML_QUANT_SIZES[qtype][0]
    own = _own_blocks(module, qtype)
    if own is not None:
        return own, qtype
    weight = module.dequantize(torch.float32) if hasattr(module, "dequantize") else module.weight.detach()
    if source is not None and source.qtype == qtype and _equal(source, weight):
        return np.ascontiguousarray(source.data), qtype
    if weight.shape[-1] % block_size:  # rows that do not fill whole blocks: keep them float, as llama.cpp does
        qtype = T.F16
    values = _float32(weight)
    if qtype == T.F32:
        return values, None
    data = quantize(values, qtype)
    return (data, None) if qtype == T.F16 else (data, qtype)


def _equal(source: Any, weight: torch.Tensor) -> bool:
    if tuple(source.shape) != tuple(weight.shape):
        return False
    return torch.equal(source.dequantize(weight.dtype), weight.detach().cpu())


def _own_blocks(module: torch.nn.Module, qtype: GGMLQuantizationType) -> np.ndarray | None:
    """A quantized linear's ggml blocks when its format is ``qtype``'s (no second rounding), else None."""
    if getattr(module, "group_size", None) != 32 or not hasattr(module, "qweight"):
        return None
    rows, cols = module.out_features, module.in_features
    scales = module.scales.detach().to(torch.float16).reshape(rows, cols // 32, 1).view(torch.uint8)
    qweight = module.qweight.detach().contiguous()
    if module.bits == 8 and qtype == T.Q8_0:
        parts = [scales, qweight.view(torch.uint8).reshape(rows, cols // 32, 32)]
    elif module.bits == 4 and qtype == T.Q4_1:
        mins = module.mins.detach().to(torch.float16).reshape(rows, cols // 32, 1).view(torch.uint8)
        parts = [scales, mins, qweight.reshape(rows, cols // 32, 16)]
    elif module.bits == 4 and qtype == T.Q4_0 and torch.equal(module.mins.float(), -8 * module.scales.float()):
        parts = [scales, qweight.reshape(rows, cols // 32, 16)]
    else:
        return None
    return torch.cat(parts, dim=-1).reshape(rows, -1).numpy()


def _source_blocks(model: torch.nn.Module) -> dict[str, Any]:
    """The raw tensors of the GGUF the model was loaded from (Hugging Face names), or nothing."""
    info = getattr(model, "checkpoint_info", None) or {}
    if info.get("format") != "gguf" or not Path(info.get("path", "")).is_file():
        return {}
    return read_gguf_tensors(info["path"])
