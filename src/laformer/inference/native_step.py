"""The whole one-token decode step as one native call (``decode_step.c``), for plain LLaMA models on the CPU.

The engine's PyTorch step, even compiled, spends about as long around its ~120 matrix-vector products (dispatch,
the compiled graph's wrapper, 30 attention calls, a thread fork/join per product) as in them; the native step
runs them, and the small work between them, in one OpenMP region. It reads the model's own tensors in place
(no copy), so it serves float32, int8 and 4-bit weights alike, and it writes the engine's static cache, so the
engine can switch between it and the PyTorch step at any token. Quantized weights multiply int8-rounded
activations there by default, as in llama.cpp (``quantization/qgemm.c``; +0.0% decode perplexity with int8
weights, +1.1% with 4-bit on SmolLM2), where the PyTorch step keeps float activations;
``set_int8_activations(model, False)`` keeps them float here too (exact weight-only products, ~1.8x slower).

A sparse attention backend that offers a native hook (AMA: ``native_attention``, ``ama/step.py``) attends for its
layers inside the same call, over rows kept in lockstep. ``NativeStep.unsupported(model, cache)`` says why a model
cannot take this path (adapters, another attention backend, bfloat16, a config field the C code does not implement,
...); the engine then runs the PyTorch step. Any batch size runs here: the column kernels take the rows in blocks of
8, 4 and 1.

The ctypes structs below mirror ``decode_step.c``'s; the library is refused at load (``ABIMismatchError``) unless
its ABI version and every struct's size and field offsets match them (``laformer.native.check_abi``).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from laformer import native
from laformer.attention import sdpa_attention
from laformer.config import LaFormerConfig
from laformer.errors import GenerationError
from laformer.inference.static_cache import StaticKVCache
from laformer.model import RMSNorm
from laformer.quantization import QuantizedLinear
from laformer.quantization.kernels import CFLAGS, HEADER
from laformer.quantization.kernels import SOURCE as QGEMM_SOURCE

SOURCE = Path(__file__).with_name("decode_step.c")
ABI_VERSION = 5  # laformer_decode_abi_version() in decode_step.c
# Rotary types that change only the inverse frequencies, which the step reads from the model's rotary buffer.
ROPE_TYPES = ("default", "linear", "llama3")


class _Linear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("mins", ctypes.c_void_p)] + [
        (name, ctypes.c_int64) for name in ("bits", "n", "k", "g", "int8_activations")]


class _Layer(ctypes.Structure):
    _fields_ = [(name, _Linear) for name in ("q", "k", "v", "o", "gate", "up", "down")] + [
                ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p), ("sparse", ctypes.c_int64)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "batch", "cache_len")] + [
        ("eps", ctypes.c_float), ("embedding", ctypes.c_void_p), ("inv_freq", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p), ("head", _Linear), ("layer", ctypes.POINTER(_Layer)),
        ("sparse", ctypes.c_void_p), ("sparse_context", ctypes.c_void_p)]


class _Step(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("tokens", "slot", "position", "valid", "logits", "scratch")] + [
        ("threads", ctypes.c_int64)]


STRUCTS = (_Linear, _Layer, _Model, _Step)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not native.has_avx2():
        return None
    library = native.load(SOURCE, CFLAGS, "decoding", depends=(QGEMM_SOURCE, HEADER),
                          abi=("laformer_decode", ABI_VERSION, STRUCTS))
    if library is not None:
        library.laformer_decode_step.restype = ctypes.c_int
        library.laformer_decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Step)]
        library.laformer_decode_scratch_bytes.restype = ctypes.c_int64
        library.laformer_decode_scratch_bytes.argtypes = [ctypes.POINTER(_Model), ctypes.c_int]
    return library


def native_available() -> bool:
    """True when the native step can be built and run on this machine (builds it on first call)."""
    return _library() is not None


def _float32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def config_problem(config: LaFormerConfig) -> str | None:
    """Why the C step cannot implement ``config``, or None: every config field it assumes, checked.

    It implements pre-norm LLaMA layers (RMSNorm with one eps, SwiGLU, grouped-query attention scaled by
    1/sqrt(head_dim), half-split rotary embeddings of any inverse frequencies, a separate or tied output head).
    """
    D, H, Hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        return f"rope_scaling type {rope_type!r} (the native step implements {', '.join(ROPE_TYPES)})"
    if scaling.get("attention_factor", 1.0) != 1.0:
        return "rope_scaling with an attention_factor (the native step does not scale cos/sin)"
    if D % 8 or D > 256:
        return f"head_dim {D} (the native step needs a multiple of 8 up to 256)"
    if H % Hkv:
        return f"{H} attention heads over {Hkv} key/value heads (not a whole number of groups)"
    if not (isinstance(config.rms_norm_eps, (int, float)) and 0 < config.rms_norm_eps < 1):
        return f"rms_norm_eps {config.rms_norm_eps!r} (the native step needs a small positive float)"
    for name in ("hidden_size", "intermediate_size"):
        if getattr(config, name) % 32:
            return f"{name} {getattr(config, name)} (the native step's kernels need a multiple of 32)"
    if (H * D) % 32:
        return f"num_attention_heads * head_dim = {H * D} (the native step's kernels need a multiple of 32)"
    return None


def _norm_problem(norms: tuple[nn.Module, ...], config: LaFormerConfig, where: str) -> str | None:
    for norm in norms:
        if type(norm) is not RMSNorm or not _float32_cpu(norm.weight) or norm.weight.shape != (config.hidden_size,):
            return f"{where} has a norm that is not a float32 RMSNorm over hidden_size"
        if norm.eps != config.rms_norm_eps:
            return f"{where} has a norm with eps {norm.eps}, not the config's rms_norm_eps {config.rms_norm_eps}"
    return None


def _linear_problem(module: nn.Module, name: str, shape: tuple[int, int]) -> str | None:
    if not isinstance(module, QuantizedLinear) and type(module) is not nn.Linear:
        return f"{name} is a {type(module).__name__} (adapters and other wrappers run the PyTorch step)"
    if (module.out_features, module.in_features) != shape:
        return f"{name} maps {module.in_features} to {module.out_features} features, not {shape[1]} to {shape[0]}"
    if isinstance(module, QuantizedLinear):
        mins = module._mins()
        scales = (module.scales,) if mins is None else (module.scales, mins)
        if (module.bias is not None or not module.qweight.is_contiguous() or module.qweight.device.type != "cpu"
                or any(t.dtype != torch.float16 or not t.is_contiguous() for t in scales)):
            return f"{name} is a quantized linear with a bias, or off the CPU, or with scales cast from float16"
        return None
    if module.bias is not None or not _float32_cpu(module.weight):
        return f"{name} is not a bias-free float32 linear on the CPU"
    if module.in_features % 32:
        return f"{name} has {module.in_features} inputs (the kernel needs a multiple of 32)"
    return None


def _arithmetic(module: nn.Module) -> tuple:
    """What a projection's input rounding depends on: the linears of one phase must agree on it."""
    if isinstance(module, QuantizedLinear):
        return module.bits, module.group_size, bool(module.int8_activations), module._mins() is not None
    return (32,)


def _describe(module: nn.Module) -> _Linear:
    if isinstance(module, QuantizedLinear):
        mins = module._mins()
        return _Linear(module.qweight.data_ptr(), module.scales.data_ptr(), None if mins is None else mins.data_ptr(),
                       module.bits, module.out_features, module.in_features, module.group_size,
                       int(module.int8_activations))
    return _Linear(module.weight.data_ptr(), None, None, 32, module.out_features, module.in_features,
                   module.in_features, 0)


def _sparse_problem(backend, model: nn.Module, cache: StaticKVCache, layer: int) -> str | None:
    """Why ``backend`` (not exact attention) cannot attend inside the native step, or None when its hook can:
    one backend for every non-exact layer, rows in lockstep (the engine's mode for such backends)."""
    hook = getattr(backend, "native_attention", None)
    if hook is None:
        return f"layer {layer} uses another attention backend ({getattr(backend, '__name__', backend)})"
    if len({l.self_attn.backend for l in model.decoder.layers} - {sdpa_attention}) > 1:
        return "the layers use different sparse attention backends"
    found = hook(model.config, cache)
    if isinstance(found, str):
        return found
    if any(model.decoder.layers[i].self_attn.backend is not backend for i in found.layers):
        return "the sparse attention backend is set on only some of the layers it would serve"
    return None


class NativeStep:
    """Decodes one token per row of ``cache`` for ``model`` (a ``LaFormerForCausalLM``) in one native call.

    Build it with ``NativeStep.create(model, cache)``, which checks the model first; it holds raw pointers to the
    model's tensors and the cache's buffers, so build a new one when either is replaced.
    """

    @classmethod
    def create(cls, model: nn.Module, cache: StaticKVCache) -> "NativeStep | str":
        """The step for this model and cache, or why the native step cannot run them."""
        return cls.unsupported(model, cache) or cls(model, cache)

    @staticmethod
    def unsupported(model: nn.Module, cache: StaticKVCache) -> str | None:
        """Why this model and cache cannot use the native step, or None when they can."""
        if _library() is None:
            return "the native kernel is unavailable here (no AVX2, no C compiler, or LAFORMER_NO_KERNELS is set)"
        config, decoder = model.config, model.decoder
        if problem := config_problem(config):
            return problem
        if not _float32_cpu(decoder.embed_tokens.weight, decoder.norm.weight, decoder.rotary_emb.inv_freq,
                            *cache.keys, *cache.values):
            return "the embedding, norms or cache are not float32 on the CPU"
        if decoder.rotary_emb.inv_freq.shape != (config.head_dim // 2,):
            return f"the rotary buffer has shape {tuple(decoder.rotary_emb.inv_freq.shape)}, not (head_dim / 2,)"
        if decoder.embed_tokens.weight.shape[1] != config.hidden_size:
            return "the embedding's width is not hidden_size"
        if len(decoder.layers) != config.num_hidden_layers or len(cache.keys) != len(decoder.layers):
            return "the model, its config and the cache disagree on the number of layers"
        d, D, H, Hkv, F = (config.hidden_size, config.head_dim, config.num_attention_heads,
                           config.num_key_value_heads, config.intermediate_size)
        if (cache.keys[0].shape[1], cache.keys[0].shape[3]) != (Hkv, D):
            return "the cache's heads or head_dim differ from the config's"
        for i, layer in enumerate(decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if attn.backend is not sdpa_attention and (problem := _sparse_problem(attn.backend, model, cache, i)):
                return problem
            if problem := _norm_problem((layer.input_layernorm, layer.post_attention_layernorm), config,
                                        f"layer {i}"):
                return problem
            shapes = {"q_proj": (H * D, d), "k_proj": (Hkv * D, d), "v_proj": (Hkv * D, d), "o_proj": (d, H * D)}
            for name, shape in shapes.items():
                if problem := _linear_problem(getattr(attn, name, None), f"layer {i} {name}", shape):
                    return problem
            for name, shape in {"gate_proj": (F, d), "up_proj": (F, d), "down_proj": (d, F)}.items():
                if problem := _linear_problem(getattr(mlp, name, None), f"layer {i} {name}", shape):
                    return problem
            for names, where in ((("q_proj", "k_proj", "v_proj"), attn), (("gate_proj", "up_proj"), mlp)):
                if len({_arithmetic(getattr(where, n)) for n in names}) > 1:
                    return (f"layer {i}'s {'/'.join(names)} are quantized differently (the native step runs them "
                            "as one phase over one rounding of their input)")
        if problem := _norm_problem((decoder.norm,), config, "the final norm"):
            return problem
        return _linear_problem(model.lm_head, "lm_head", (model.lm_head.out_features, d))

    def __init__(self, model: nn.Module, cache: StaticKVCache) -> None:
        """For a model ``unsupported`` accepts (``create`` checks it)."""
        config, decoder = model.config, model.decoder
        # A sparse attention backend (AMA) attends for its layers through its hook (``native_attention``).
        backends = {layer.self_attn.backend for layer in decoder.layers} - {sdpa_attention}
        self._sparse = backends.pop().native_attention(config, cache) if backends else None
        sparse_layers = set(self._sparse.layers) if self._sparse is not None else set()
        if self._sparse is not None:
            self._sparse.start()
        # Hold every tensor behind the pointers, so replacing a model's weights (model.to(...), a new cache) can
        # never leave the C code reading freed memory; the engine rebuilds this step at each new batch anyway.
        self._held = [*model.parameters(), *model.buffers(), *cache.keys, *cache.values]
        layers = [
            _Layer(*(_describe(getattr(layer.self_attn, f"{n}_proj")) for n in "qkvo"),
                   *(_describe(getattr(layer.mlp, f"{n}_proj")) for n in ("gate", "up", "down")),
                   layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                   keys.data_ptr(), values.data_ptr(), int(i in sparse_layers))
            for i, (layer, keys, values) in enumerate(zip(decoder.layers, cache.keys, cache.values))
        ]
        self._layers = (_Layer * len(layers))(*layers)
        self._model = _Model(
            len(layers), config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.intermediate_size, decoder.embed_tokens.num_embeddings, cache.batch_size, cache.max_length,
            config.rms_norm_eps, decoder.embed_tokens.weight.data_ptr(), decoder.rotary_emb.inv_freq.data_ptr(),
            decoder.norm.weight.data_ptr(), _describe(model.lm_head), self._layers,
            *((self._sparse.function, self._sparse.context) if self._sparse is not None else (None, None)),
        )
        self.vocab_size = model.lm_head.out_features
        self._scratch, self._scratch_threads = torch.empty(0, dtype=torch.uint8), 0

    def __call__(self, tokens: torch.Tensor, slot: torch.Tensor, position: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) for ``tokens`` (B,); advances ``slot`` and ``position`` and marks ``valid`` in place."""
        tokens = tokens.to(torch.int64).contiguous()
        logits = torch.empty(tokens.shape[0], self.vocab_size)
        threads, library = torch.get_num_threads(), _library()
        if self._sparse is not None:
            self._sparse.prepare(threads)
        if threads != self._scratch_threads:  # once, or when the thread count changes
            self._scratch = torch.empty(library.laformer_decode_scratch_bytes(ctypes.byref(self._model), threads),
                                        dtype=torch.uint8)
            self._scratch_threads = threads
        step = _Step(tokens.data_ptr(), slot.data_ptr(), position.data_ptr(), valid.data_ptr(), logits.data_ptr(),
                     self._scratch.data_ptr(), threads)
        status = library.laformer_decode_step(ctypes.byref(self._model), ctypes.byref(step))
        if status:
            raise GenerationError(_FAILURES[status])
        return logits


_FAILURES = {
    2: "a token id is outside the model's vocabulary; pass ids produced by the model's tokenizer",
    3: "a row's cache is full; reset the engine with a larger max_length (prompt length + max_new_tokens)",
}
