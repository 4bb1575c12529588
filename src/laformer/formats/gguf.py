"""GGUF checkpoints (llama.cpp): config from the metadata, tensors renamed to Hugging Face's and dequantized.

The header is parsed here rather than with ``gguf.GGUFReader``, which builds one numpy array per vocabulary string
and takes ~3 s on the default model's header alone; this parser takes ~0.1 s. Tensor data is memory-mapped
(copy-on-write, so callers may modify the arrays without touching the file) and read one tensor at a time.

Two boundary conversions happen here and nowhere else:

* llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that rotary pairs are interleaved; we undo it
  to get Hugging Face's half-split layout. The permutation moves whole rows, and a quantized row is a whole number of
  blocks, so it is undone on the raw blocks, before any dequantization.
* llama.cpp stores Llama-3.1 rope scaling as a ``rope_freqs.weight`` tensor of per-frequency divisors. We rebuild
  the equivalent ``rope_scaling={"rope_type": "llama3", ...}`` config from it (and check the rebuilt config gives
  the same frequencies), so the model, ``config.json`` and Hugging Face stay in one vocabulary.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from laformer.config import LaFormerConfig
from laformer.errors import CheckpointError, ConfigError
from laformer.formats.checkpoint import Checkpoint
from laformer.formats.dequant import can_dequantize, dequantize
from laformer.rope import rope_inverse_frequencies

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
ROPE_FREQS = "rope_freqs.weight"


@dataclass
class GGUFTensorInfo:
    """One tensor as stored: raw ggml blocks under its Hugging Face name, q/k rows in Hugging Face's order."""

    name: str  # Hugging Face name, e.g. model.layers.0.self_attn.q_proj.weight
    gguf_name: str  # llama.cpp name, e.g. blk.0.attn_q.weight
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # logical torch shape, (out_features, in_features) for matrices
    stored: np.ndarray  # uint8 (rows, bytes_per_row) view of the file, rows in llama.cpp's order
    row_order: np.ndarray | None = None  # for q/k: the stored rows to take, in order, to undo llama.cpp's permute

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def data(self) -> np.ndarray:
        """Raw blocks, (rows, bytes_per_row) uint8, rows in Hugging Face's order (a copy for q/k, else a view)."""
        return self.stored if self.row_order is None else self.stored[self.row_order]

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.shape, dtype, out)


@dataclass
class _Header:
    metadata: dict[str, Any]
    tensors: list[tuple[str, tuple[int, ...], int, int]]  # (gguf name, ggml dims (ne0 first), type id, offset)
    data_start: int
    alignment: int


def is_gguf(path: str | Path) -> bool:
    """True when ``path`` is a file starting with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata (string arrays as lists of str, numeric arrays as numpy arrays)."""
    with _open(path) as buf:
        return _parse_header(buf, Path(path)).metadata


def read_gguf(path: str | Path) -> tuple[LaFormerConfig, dict[str, GGUFTensorInfo]]:
    """The config and the raw (still quantized) tensors under Hugging Face names, without any float copy.

    ``stored`` arrays are views of a copy-on-write memory map: nothing is read from disk until touched.
    """
    path = Path(path)
    buf = _open(path)
    header = _parse_header(buf, path, decode_strings=False)
    raw = _raw_tensors(buf, header, path)
    rope_freqs = raw.pop(ROPE_FREQS, None)
    config = config_from_metadata(header.metadata, raw, rope_freqs, path)
    tensors = {}
    for gguf_name, (qtype, shape, data) in raw.items():
        name = _hf_name(gguf_name, config, path)
        row_order = None
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if name.endswith("q_proj.weight") else config.num_key_value_heads
            row_order = _unpermute_rows(shape[0], heads, gguf_name, path)
        tensors[name] = GGUFTensorInfo(name, gguf_name, qtype, shape, data, row_order)
    return config, tensors


def read_gguf_tensors(path: str | Path) -> dict[str, GGUFTensorInfo]:
    """The raw tensors of ``read_gguf``, for code that works on quantized blocks (e.g. quantized linear layers)."""
    return read_gguf(path)[1]


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """A GGUF file as a ``Checkpoint``: config plus dequantized, Hugging Face-named tensors of ``dtype``."""
    path = Path(path)
    config, tensors = read_gguf(path)
    for info in tensors.values():
        if not can_dequantize(info.qtype):
            raise CheckpointError(
                f"tensor {info.gguf_name!r} in {path} is stored as {info.type_name}, which laformer cannot "
                "dequantize; re-quantize the model to Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K, F16, BF16 or F32"
            )
    # Allocate every result before any temporary, so the allocator cannot interleave the two and strand freed
    # temporaries between weights (that cost ~25 MB of peak memory on the default model).
    state_dict = {name: torch.empty(info.shape, dtype=dtype) for name, info in tensors.items()}
    tensor_types = {}
    threads = torch.get_num_threads()
    # One thread: dequantizing is a stream of short memory-bound ops, and with a busy CPU every parallel op waits
    # for a second thread to be scheduled (measured 1.3 s with one thread vs 9-19 s with two on a loaded machine).
    torch.set_num_threads(1)
    try:
        for name, info in tensors.items():
            info.dequantize(out=state_dict[name])
            tensor_types[name] = info.type_name
            _release(info.stored)  # drop the mapped pages we just read, so they do not add to the peak memory
    finally:
        torch.set_num_threads(threads)
    return Checkpoint(config, state_dict, path, "gguf", tensor_types)


# ----------------------------------------------------------------------------------------------------------------
# Header parsing


def _open(path: str | Path) -> mmap.mmap:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no GGUF file at {path}; check the path")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (it lacks the 'GGUF' magic bytes); pass a .gguf file")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _parse_header(buf: mmap.mmap, path: Path, decode_strings: bool = True) -> _Header:
    """Metadata and tensor directory. With ``decode_strings=False`` string arrays (the vocabulary) become lists of
    ``None`` of the right length: loading weights needs only the vocabulary size, and 100k decoded strings would
    stay in memory (fragmented) through the whole load."""
    try:
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            hint = "big-endian files are not supported" if version & 0xFFFF == 0 else "only v2 and v3 are supported"
            raise CheckpointError(f"{path} has GGUF version {version:#x} ({hint}); re-convert it with a recent "
                                  "llama.cpp")
        offset, metadata = 24, {}
        for _ in range(n_kv):
            key, offset = _read_string(buf, offset)
            if key in metadata:  # llama.cpp refuses these too: which value counts would be a guess
                raise CheckpointError(f"{path} holds the metadata key {key!r} twice; the file is corrupt")
            (kind,) = struct.unpack_from("<I", buf, offset)
            metadata[key], offset = _read_value(buf, offset + 4, kind, decode_strings)
        tensors = []
        for _ in range(n_tensors):
            name, offset = _read_string(buf, offset)
            (n_dims,) = struct.unpack_from("<I", buf, offset)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, offset + 4)
            type_id, data_offset = struct.unpack_from("<IQ", buf, offset + 4 + 8 * n_dims)
            offset += 4 + 8 * n_dims + 12
            tensors.append((name, dims, type_id, data_offset))
    except (struct.error, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise CheckpointError(
            f"the header of {path} is corrupt or truncated ({type(exc).__name__}: {exc}); re-download or re-convert it"
        ) from exc
    _check_metadata_types(metadata, path)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment <= 0:
        raise CheckpointError(f"{path} has general.alignment={alignment}; the file is corrupt")
    return _Header(metadata, tensors, -(-offset // alignment) * alignment, alignment)


_INT, _REAL = "an integer", "a number"
_METADATA_TYPES = {
    **{f"llama.{k}": _INT for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                    "attention.head_count", "attention.head_count_kv", "attention.key_length",
                                    "rope.dimension_count", "vocab_size", "expert_count")},
    **{f"llama.{k}": _REAL for k in ("rope.freq_base", "attention.layer_norm_rms_epsilon", "rope.scaling.factor")},
    **{k: "a string" for k in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                "tokenizer.chat_template", "llama.rope.scaling.type")},
    **{f"tokenizer.ggml.{k}": "a boolean" for k in ("add_bos_token", "add_eos_token", "add_space_prefix")},
    **{f"tokenizer.ggml.{k}": "a string array" for k in ("tokens", "merges")},
    **{f"tokenizer.ggml.{k}": "a numeric array" for k in ("scores", "token_type")},
    "general.alignment": _INT,
}


def _fits(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _REAL:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "a string":
        return isinstance(value, str)
    if kind == "a boolean":
        return isinstance(value, bool)
    if kind == "a string array":
        return isinstance(value, list) and all(v is None or isinstance(v, str) for v in value)
    return isinstance(value, np.ndarray) and value.dtype.kind in "iuf"


def _check_metadata_types(metadata: dict[str, Any], path: Path) -> None:
    """Known keys must hold the type llama.cpp writes: a flipped type byte must not reach ``int()`` or ``tokens[i]``."""
    for key, value in metadata.items():
        kind = _INT if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") else _METADATA_TYPES.get(key)
        if kind is not None and not _fits(value, kind):
            raise CheckpointError(f"{path}: metadata key {key!r} must be {kind}, got {type(value).__name__}; the file "
                                  "is corrupt or was written by a broken converter")


def _read_string(buf: mmap.mmap, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, offset)
    end = offset + 8 + length
    if end > len(buf):
        raise struct.error(f"string of {length} bytes at offset {offset} runs past the end of the file")
    return buf[offset + 8:end].decode("utf-8", errors="replace"), end


def _read_value(buf: mmap.mmap, offset: int, kind: int, decode_strings: bool = True) -> tuple[Any, int]:
    if kind == _STRING:
        return _read_string(buf, offset)
    if kind == _ARRAY:
        item_kind, count = struct.unpack_from("<IQ", buf, offset)
        offset += 12
        if item_kind == _STRING:  # vocabularies: ~100k strings, so no per-item recursion
            values, unpack = [], struct.Struct("<Q").unpack_from
            for _ in range(count):
                (length,) = unpack(buf, offset)
                offset += 8
                if decode_strings:
                    values.append(buf[offset:offset + length].decode("utf-8", errors="replace"))
                offset += length
            values = values if decode_strings else [None] * count
            if offset > len(buf):
                raise struct.error(f"string array of {count} items runs past the end of the file")
            return values, offset
        if item_kind in _SCALARS:
            dtype = np.dtype("<" + _SCALARS[item_kind].replace("?", "b1"))
            end = offset + count * dtype.itemsize
            if end > len(buf):
                raise struct.error(f"array of {count} items at offset {offset} runs past the end of the file")
            return np.frombuffer(buf, dtype, count, offset).copy(), end
        values = []
        for _ in range(count):
            value, offset = _read_value(buf, offset, item_kind, decode_strings)
            values.append(value)
        return values, offset
    fmt = _SCALARS[kind]
    (value,) = struct.unpack_from("<" + fmt, buf, offset)
    if kind == _FLOAT32:
        value = float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
    return value, offset + struct.calcsize(fmt)


def _raw_tensors(
    buf: mmap.mmap, header: _Header, path: Path
) -> dict[str, tuple[GGMLQuantizationType, tuple[int, ...], np.ndarray]]:
    raw, regions = {}, []
    for name, dims, type_id, offset in header.tensors:
        if name in raw:
            raise CheckpointError(f"{path} holds tensor {name!r} twice; the file is corrupt")
        if offset % header.alignment:
            raise CheckpointError(f"tensor {name!r} in {path} starts at offset {offset}, not a multiple of the file's "
                                  f"alignment {header.alignment}; the file is corrupt")
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise CheckpointError(
                f"tensor {name!r} in {path} has unknown ggml type id {type_id}; the file is corrupt or newer than "
                "the installed `gguf` package (try `pip install -U gguf`)"
            ) from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if not dims or 0 in dims:
            raise CheckpointError(f"tensor {name!r} in {path} has dimensions {list(dims)}; a weight needs at least one "
                                  "dimension and no empty ones, so the file is corrupt")
        if dims[0] % block_size:
            raise CheckpointError(
                f"tensor {name!r} in {path} has rows of {dims[0]} values, not a multiple of the {qtype.name} block "
                f"size {block_size}; the file is corrupt"
            )
        shape = tuple(int(d) for d in reversed(dims))  # ggml lists the fastest-varying dimension first
        row_bytes = dims[0] // block_size * type_size
        n_rows = math.prod(dims[1:])
        start = header.data_start + offset
        if start + n_rows * row_bytes > len(buf):
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} needs bytes up to {start + n_rows * row_bytes}, but the file "
                f"has {len(buf)}; re-download it"
            )
        raw[name] = (qtype, shape, np.frombuffer(buf, np.uint8, n_rows * row_bytes, start).reshape(n_rows, row_bytes))
        regions.append((start, start + n_rows * row_bytes, name))
    regions.sort()
    for (_, end, first), (start, _, second) in zip(regions, regions[1:]):
        if start < end:
            raise CheckpointError(f"tensors {first!r} and {second!r} in {path} share bytes (their data overlaps); the "
                                  "file is corrupt")
    return raw


def _release(data: np.ndarray) -> None:
    """Tell the kernel we are done with the mapped pages under ``data`` (they are re-read if touched again)."""
    base = data.base
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) or getattr(base, "obj", None)
    if not isinstance(base, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    address = data.__array_interface__["data"][0]
    start = address - np.frombuffer(base, np.uint8, 1).__array_interface__["data"][0]
    page_start = start - start % mmap.PAGESIZE
    base.madvise(mmap.MADV_DONTNEED, page_start, start - page_start + data.nbytes)


# ----------------------------------------------------------------------------------------------------------------
# Config and names


def config_from_metadata(
    metadata: dict[str, Any],
    tensors: dict[str, tuple[GGMLQuantizationType, tuple[int, ...], np.ndarray]],
    rope_freqs: tuple[GGMLQuantizationType, tuple[int, ...], np.ndarray] | None,
    path: Path,
) -> LaFormerConfig:
    """A ``LaFormerConfig`` from llama.cpp's ``llama.*`` and ``tokenizer.ggml.*`` keys."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{path} holds a {arch!r} model; laformer only loads the 'llama' architecture (LLaMA, Mistral-7B-v0.1, "
            "SmolLM, TinyLlama, ...)"
        )

    def need(key: str) -> Any:
        if f"llama.{key}" not in metadata:
            raise CheckpointError(f"{path} lacks the metadata key 'llama.{key}'; the file is incomplete or corrupt")
        return metadata[f"llama.{key}"]

    if metadata.get("llama.expert_count", 0):
        raise CheckpointError(f"{path} is a mixture-of-experts model (llama.expert_count > 0), which laformer "
                              "does not support; use a dense LLaMA model")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(metadata.get("llama.attention.key_length", hidden // heads))
    rotary_dim = int(metadata.get("llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise CheckpointError(f"{path} rotates {rotary_dim} of {head_dim} head channels (partial rotary), which "
                              "LLaMA models do not do and laformer does not support")
    if "tokenizer.ggml.tokens" in metadata:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    elif "llama.vocab_size" in metadata:
        vocab_size = int(metadata["llama.vocab_size"])
    elif "token_embd.weight" in tensors:
        vocab_size = tensors["token_embd.weight"][1][0]
    else:
        raise CheckpointError(f"{path} has no token list, llama.vocab_size or token_embd.weight; it is incomplete")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    if eos is not None and eot is not None and eot != eos:
        eos = [int(eos), int(eot)]  # chat models end a turn with <|eot_id|>/<|im_end|>: stop on either
    rope_theta = float(metadata.get("llama.rope.freq_base", 10000.0))
    try:
        config = LaFormerConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_hidden_layers=int(need("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(metadata.get("llama.attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(metadata.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=_rope_scaling(metadata, rope_freqs, rope_theta, head_dim, path),
            max_position_embeddings=int(need("context_length")),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=_optional_int(metadata.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=eos if isinstance(eos, list) else _optional_int(eos),
            pad_token_id=_optional_int(metadata.get("tokenizer.ggml.padding_token_id")),
        )
    except ConfigError as exc:
        raise CheckpointError(f"the metadata of {path} describes an invalid model: {exc}") from exc
    return config


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _rope_scaling(
    metadata: dict[str, Any],
    rope_freqs: tuple[GGMLQuantizationType, tuple[int, ...], np.ndarray] | None,
    theta: float,
    head_dim: int,
    path: Path,
) -> dict[str, Any] | None:
    kind = metadata.get("llama.rope.scaling.type", "none")
    factor = metadata.get("llama.rope.scaling.factor")
    if rope_freqs is not None:
        qtype, shape, data = rope_freqs
        divisors = dequantize(data, qtype, shape).double()
        return llama3_scaling_from_divisors(divisors, theta, head_dim, path)
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise CheckpointError(f"{path} uses rope scaling {kind!r}, which laformer does not support (it supports "
                          "linear and Llama-3.1 scaling)")


def llama3_scaling_from_divisors(
    divisors: torch.Tensor, theta: float, head_dim: int, path: Path | str = "<gguf>"
) -> dict[str, Any] | None:
    """Rebuild Llama-3.1's ``rope_scaling`` from llama.cpp's per-frequency divisors (``rope_freqs.weight``).

    Llama 3.1 divides the low frequencies by ``factor``, keeps the high ones, and in between divides by
    ``1 / ((1 - s) / factor + s)`` with ``s = (old_context / wavelength - low) / (high - low)``. Scaling
    ``old_context``, ``low`` and ``high`` together changes nothing, so ``old_context`` is fixed at 8192 (Llama 3's
    value) and the other two are solved from the in-between divisors (or placed between the kept and divided
    frequencies when fewer than two lie in between). The result is checked against the divisors.
    """
    divisors = divisors.double().flatten()
    if divisors.numel() != head_dim // 2:
        raise CheckpointError(f"{ROPE_FREQS} in {path} has {divisors.numel()} values, expected head_dim/2 = "
                              f"{head_dim // 2}; the file is corrupt")
    if torch.allclose(divisors, torch.ones_like(divisors)):
        return None
    factor = float(divisors.max())
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old_context = 8192.0
    kept, divided = divisors <= 1 + 1e-6, divisors >= factor * (1 - 1e-6)
    middle = ~(kept | divided)
    if int(middle.sum()) >= 2:
        # 1 / divisor = (1 - s) / factor + s, so s = (1 / divisor - 1 / factor) / (1 - 1 / factor): linear in 1/wavelen
        s = (1 / divisors[middle] - 1 / factor) / (1 - 1 / factor)
        x = old_context / wavelen[middle]
        slope, intercept = np.polyfit(x.numpy(), s.numpy(), 1)
        high_minus_low = 1 / slope
        low = -intercept * high_minus_low
        high = low + high_minus_low
    else:  # the boundaries only need to fall between the kept and the divided wavelengths
        high_wl = float(wavelen[kept].max()) * 1.0001 if kept.any() else float(wavelen.min()) / 2
        low_wl = float(wavelen[divided].min()) / 1.0001 if divided.any() else float(wavelen.max()) * 2
        if middle.any():  # one in-between frequency: keep high_wl, solve low_wl through it
            s = float((1 / divisors[middle][0] - 1 / factor) / (1 - 1 / factor))
            w = float(wavelen[middle][0])
            low_wl = 1 / ((1 / w - s / high_wl) / (1 - s))
        high, low = old_context / high_wl, old_context / low_wl
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
               "high_freq_factor": float(high), "original_max_position_embeddings": int(old_context)}
    try:
        rebuilt = rope_inverse_frequencies(LaFormerConfig(
            vocab_size=1, hidden_size=head_dim, num_attention_heads=1, rope_theta=theta, rope_scaling=scaling
        )).double()
    except ConfigError as exc:
        raise CheckpointError(f"cannot rebuild rope scaling from {ROPE_FREQS} in {path}: {exc}") from exc
    if not torch.allclose(rebuilt, inv_freq / divisors, rtol=1e-4, atol=0):
        raise CheckpointError(f"{ROPE_FREQS} in {path} is not Llama-3.1 rope scaling (no llama3 config reproduces "
                              "its frequencies); laformer cannot load this rope variant")
    return scaling


def _hf_name(gguf_name: str, config: LaFormerConfig, path: Path) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES and int(match.group(1)) < config.num_hidden_layers:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"
    raise CheckpointError(
        f"tensor {gguf_name!r} in {path} is not part of a LLaMA model (biases, fused or expert tensors, or layers "
        f"beyond llama.block_count={config.num_hidden_layers} are not supported); the file is of another variant"
    )


def _unpermute_rows(rows: int, heads: int, gguf_name: str, path: Path) -> np.ndarray:
    """Row order that undoes llama.cpp's ``permute``: per head, interleaved rotary pairs back to two halves.

    llama.cpp (convert_hf_to_gguf.py) stores ``w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2)``; taking
    rows in this order restores ``w``, the same as transformers' ``reverse_permute_weights``.
    """
    if rows % (2 * heads):
        raise CheckpointError(f"tensor {gguf_name!r} in {path} has {rows} rows, not a multiple of 2 x {heads} heads; "
                              "the head counts in the metadata do not match the weights")
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(0, 2, 1).reshape(-1)
