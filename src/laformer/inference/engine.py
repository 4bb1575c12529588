"""The decode engine: prefill and one-token steps over a preallocated cache, behind every generation API.

``model.generate``, ``model.stream``, ``generate_batch``, the CLI and the server all decode here. The engine is built
once per model (``engine_for``) and keeps its cache, its per-row state and its compiled pieces between calls. It runs
the model's own forward (``model.py``) for prefill and for its PyTorch step, over a ``StaticKVCache``:

- prefill writes the prompt in the cache's append mode, with the model building positions and masks from the
  padding mask as it does anywhere else;
- a PyTorch decode step places each row's new token at its own column (``slot``) with a ready (B, 1, 1, S) mask
  (``valid``) and rotary position (``position``), all preallocated tensors advanced in place, so it allocates
  nothing and has fixed shapes that ``torch.compile`` traces once. Rows are independent, which is what lets a
  finished row take a new prompt while the others keep decoding (``prefill_row``);
- attention backends that read the keys as one contiguous sequence (AMA's slices, ``contiguous_keys = True``)
  decode in lockstep instead: the cache stays in append mode, every row one column further per step;
- for a plain model on the CPU (float32, int8 or 4-bit weights, exact attention) a step is one native call
  (``laformer.inference.native_step``) that reads the model's own weights in place; the model is never changed.
  ``path`` says which step runs, ``native_problem`` why the native one does not.

A prompt that starts with tokens whose keys a row still holds (the previous turn of a chat, a shared system prompt)
reuses them: only the new suffix is prefilled (``prefill`` at batch 1, ``prefill_row``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from laformer.errors import GenerationError
from laformer.inference.native_step import NativeStep
from laformer.inference.static_cache import StaticKVCache
from laformer.quantization import kernels

CACHE_GRANULARITY = 64  # cache lengths are rounded up to this, so nearby request sizes reuse one compiled step


class DecodeEngine:
    """Runs ``model`` (a ``LaFormerForCausalLM``) one token at a time for ``batch_size`` rows.

    ``prefill`` starts a batch (left-padded prompts), ``prefill_row`` starts one row alone, ``decode`` advances
    every row by one token; each returns float logits (B, V) for the next token. ``native=True`` decodes with the
    native step wherever it supports the model and batch; ``compile=True`` compiles the PyTorch step with
    ``torch.compile`` and falls back to eager (with a warning) where compilation fails.
    The cache is sized per request (rounded up to 64 tokens); ``max_length`` fixes it instead, so that a compiled
    step, which is specialised to the cache's shape, is compiled once for every request that fits.
    """

    def __init__(
        self, model: nn.Module, *, compile: bool = False, max_length: int | None = None, native: bool = True,
    ) -> None:
        self.model = model
        self.config = model.config
        self.max_length = max_length
        self.cache: StaticKVCache | None = None
        self.valid = self.slot = self.position = None
        self.compiled = False
        self.native = native
        self.native_problem: str | None = None if native else "turned off (native=False)"
        self._native_step: NativeStep | None = None
        self._weights: tuple | None = None  # what the cached keys were computed from
        self._backends: tuple | None = None  # ... and with which attention
        self._lockstep = False  # every row at the same column, cache in append mode
        # Per row, the ids whose keys fill its first columns (the prefix cache); None where the columns hold
        # anything else (padding, a released row that idle steps overwrite).
        self._held: list[list[int] | None] = []
        self.prefix_reused = 0  # prompt tokens the last prefill took from the cache
        self._step: Callable[[torch.Tensor], torch.Tensor] = self._slot_step
        if compile:
            self._step = self._compile_with_fallback(self._slot_step)

    @property
    def path(self) -> str:
        """Which step decodes the current batch: "native", "compiled" or "eager"."""
        return "native" if self._native_step is not None else "compiled" if self.compiled else "eager"

    @property
    def dtype(self) -> torch.dtype:
        return self.model.decoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.decoder.embed_tokens.weight.device

    @property
    def contiguous_keys(self) -> bool:
        """Whether an attention backend reads the keys as one sequence (AMA): then rows decode in lockstep."""
        return any(getattr(layer.self_attn.backend, "contiguous_keys", False) for layer in self.model.decoder.layers)

    def reset(self, batch_size: int, max_length: int) -> None:
        """Make room for ``batch_size`` rows of up to ``max_length`` tokens, reusing the buffers when they fit."""
        if max_length > self.config.max_position_embeddings:
            raise GenerationError(
                f"{max_length} tokens exceed the model's context of {self.config.max_position_embeddings}; "
                "shorten the prompt or lower max_new_tokens"
            )
        if self.max_length is not None and max_length > self.max_length:
            raise GenerationError(
                f"{max_length} tokens (prompt + new) exceed the engine's fixed cache of {self.max_length}; "
                "build the DecodeEngine with a larger max_length"
            )
        length = self.max_length or -(-max_length // CACHE_GRANULARITY) * CACHE_GRANULARITY
        weights, backends = _weights_key(self.model), _backends_key(self.model)
        if weights != self._weights:  # new weights: the held keys are stale
            self._weights, self._held = weights, []
        if backends != self._backends:  # another attention computed the held keys
            self._backends, self._held = backends, []
        cache = self.cache
        if (cache is None or cache.batch_size != batch_size or not length <= cache.max_length <= 2 * length
                or cache.keys[0].dtype != self.dtype or cache.keys[0].device != self.device):
            self.cache = StaticKVCache(self.config, batch_size, length, self.dtype, self.device)
            self.valid = torch.zeros(batch_size, length, dtype=torch.bool, device=self.device)
            self.slot = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self.position = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self._held = []
        if len(self._held) != batch_size:
            self._held = [None] * batch_size
        self.cache.reset()
        for state in (self.valid, self.slot, self.position):
            state.zero_()  # in place: a compiled step keeps pointing at the same tensors
        self._lockstep = True
        self._native_step = None
        if self.native:  # checked per batch: the batch size, the cache or the model's attention may have changed
            step = NativeStep.create(self.model, self.cache)
            self._native_step, self.native_problem = (step, None) if isinstance(step, NativeStep) else (None, step)

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 1
    ) -> torch.Tensor:
        """Start a new batch from (left-padded) prompts; returns the logits of each row's next token.

        A single unpadded prompt reuses the keys of its longest prefix that row 0 still holds.
        """
        B, T = input_ids.shape
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        ids = input_ids[0].tolist() if B == 1 and attention_mask is None else None
        self.reset(B, T + max_new_tokens)  # keeps the held keys unless the buffers or the weights changed
        reused = _common_prefix(self._held[0], ids)
        self.cache.reset(reused)
        out = self.model(input_ids[:, reused:], attention_mask=attention_mask, past_key_values=self.cache,
                         logits_to_keep=1)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self.valid[:, :T] = real
        self.slot.fill_(T)
        self.position.copy_(real.sum(-1))
        self._held = [input_ids[b].tolist() if bool(real[b].all()) else None for b in range(B)]
        self.prefix_reused = reused
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def prefill_row(self, row: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Replace row ``row`` by a new prompt (1-D ids) while other rows keep their state; returns (1, V).

        The longest prefix of the prompt that any row still holds is copied instead of recomputed.
        """
        if self.cache is None:
            raise GenerationError("the engine has no cache yet; call reset(batch_size, max_length) or prefill first")
        if not 0 <= row < self.cache.batch_size:
            raise GenerationError(f"row {row} does not exist; the engine holds rows 0..{self.cache.batch_size - 1}")
        if input_ids.numel() + 1 > self.cache.max_length:
            raise GenerationError(
                f"a prompt of {input_ids.numel()} tokens does not fit the engine's cache of {self.cache.max_length} "
                "positions; reset it with a larger max_length"
            )
        if self.contiguous_keys:
            raise GenerationError(
                "this model's attention backend (AMA) reads each row's keys as one sequence, so rows cannot be "
                "refilled one by one; generate a left-padded batch instead (model.generate, generate_batch)"
            )
        ids = input_ids.reshape(-1).tolist()
        source, reused = max(((r, _common_prefix(held, ids)) for r, held in enumerate(self._held)),
                             key=lambda item: item[1])
        if source != row and reused:
            for buffers in (self.cache.keys, self.cache.values):
                for buf in buffers:
                    buf[row, :, :reused] = buf[source, :, :reused]
        out = self.model(input_ids.reshape(1, -1)[:, reused:], past_key_values=self.cache.rows(row, row + 1, reused),
                         logits_to_keep=1)
        T = len(ids)
        self.valid[row].zero_()
        self.valid[row, :T] = True
        self.slot[row] = self.position[row] = T
        self._held[row] = ids
        self._lockstep = False  # rows now sit at different columns
        self.prefix_reused = reused
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) and return the next-token logits (B, V).

        Each row has room for the ``max_new_tokens`` it was prefilled with (the cache is not checked per step).
        """
        for held, token in zip(self._held, tokens.tolist()):
            if held is not None:
                held.append(token)
        if self._native_step is not None:
            logits = self._native_step(tokens, self.slot, self.position, self.valid)
            if self._lockstep:
                self.cache.advance()
            return logits
        if self.contiguous_keys:
            return self._lockstep_step(tokens)
        return self._step(tokens)

    def release_row(self, row: int) -> None:
        """Park a finished row at column 0 so its idle steps never run past the cache."""
        self.slot[row] = 0
        self.position[row] = 0
        self._held[row] = None

    # ----------------------------------------------------------------------------------- the PyTorch steps

    def _slot_step(self, tokens: torch.Tensor) -> torch.Tensor:
        slots = self.slot[:, None]  # (B, 1)
        self.valid.scatter_(1, slots, True)
        self.cache.set_slots(slots)
        out = self.model(tokens[:, None], attention_mask=self.valid[:, None, None, :], position_ids=self.position[:, None],
                         past_key_values=self.cache, logits_to_keep=1)
        self.cache.set_slots(None)
        self.slot.add_(1)
        self.position.add_(1)
        return out.logits[:, -1].float()

    def _lockstep_step(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self._lockstep:
            raise GenerationError("rows were refilled one by one; an AMA model decodes only batches from prefill")
        self.valid.scatter_(1, self.slot[:, None], True)
        end = self.cache.get_seq_length() + 1
        mask = self.valid[:, :end]
        out = self.model(tokens[:, None], attention_mask=None if bool(mask.all()) else mask,
                         position_ids=self.position[:, None], past_key_values=self.cache, logits_to_keep=1)
        self.slot.add_(1)
        self.position.add_(1)
        return out.logits[:, -1].float()

    def _compile_with_fallback(self, step: Callable) -> Callable:
        kernels.mark_constant_for_compile()
        compiled = torch.compile(step, fullgraph=True, dynamic=False)

        def first_call(tokens: torch.Tensor) -> torch.Tensor:
            try:
                logits = compiled(tokens)  # fullgraph: a failure happens before anything runs
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
                warnings.warn(
                    f"torch.compile is unavailable here ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                    "decoding eagerly instead. Install a C++ compiler (gcc) for the compiled step.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._step = step
                return step(tokens)
            self._step, self.compiled = compiled, True
            return logits

        return first_call


class _EngineSlot:
    """Holds a model's engine; copies and pickles of the model start without one (it is rebuilt on first use)."""

    def __init__(self) -> None:
        self.engine: DecodeEngine | None = None

    def __deepcopy__(self, memo) -> "_EngineSlot":
        return _EngineSlot()

    def __reduce__(self):
        return _EngineSlot, ()


def engine_for(model: nn.Module) -> DecodeEngine:
    """The model's engine, built on first use and kept with the model, so every call reuses its buffers."""
    slot = model.__dict__.get("_decode_engine")
    if slot is None:
        slot = model.__dict__["_decode_engine"] = _EngineSlot()
    if slot.engine is None or slot.engine.model is not model:
        slot.engine = DecodeEngine(model)
    return slot.engine


def _weights_key(model: nn.Module) -> tuple:
    """Where and at which version every weight is: equal keys mean equal weights."""
    return tuple((t.data_ptr(), _version(t)) for t in (*model.parameters(), *model.buffers()))


def _backends_key(model: nn.Module) -> tuple:
    """The attention of every layer: a backend built from a config (AMA) compares by its config."""
    return tuple(getattr(layer.self_attn.backend, "config", layer.self_attn.backend) for layer in model.decoder.layers)


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor: nothing changes it in place outside inference mode
        return -1


def _common_prefix(held: list[int] | None, ids: list[int] | None) -> int:
    """How many leading ids ``held`` shares with ``ids``, leaving at least one id of ``ids`` to run."""
    if not held or not ids:
        return 0
    n, limit = 0, min(len(held), len(ids) - 1)
    while n < limit and held[n] == ids[n]:
        n += 1
    return n
