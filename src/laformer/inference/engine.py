"""The lean decode path: prefill and one-token steps over a static cache, optionally compiled.

Compared with ``model(...)`` per token, a step here builds no cache, mask or position tensors: the engine keeps
each row's next cache column (``slot``), rotary position and valid-column mask as preallocated tensors and advances
them in place, computes logits for the last position only, and so has fixed shapes that ``torch.compile`` traces
once. Rows are independent (each has its own slot and position), which is what lets ``laformer.inference.batching``
refill a finished row with a new prompt while the others keep decoding.

The engine runs the model's own layers, so attention backends (``model.decoder.set_attention``) and quantized
linears compose with it; ``fuse=True`` first swaps in fused q/k/v and gate/up projections. For a plain model on the
CPU (float32, int8 or 4-bit weights, exact attention, up to 8 rows) a step is one native call instead
(``laformer.inference.native_step``); ``native=False`` keeps the PyTorch step, and ``path`` says which one runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from laformer.errors import GenerationError
from laformer.inference.fused import fuse_projections
from laformer.inference.native_step import NativeStep
from laformer.inference.static_cache import StaticKVCache

CACHE_GRANULARITY = 64  # cache lengths are rounded up to this, so nearby request sizes reuse one compiled step


class DecodeEngine:
    """Runs ``model`` (a ``LaFormerForCausalLM``) one token at a time for up to ``batch_size`` rows.

    ``prefill`` starts a batch (left-padded prompts), ``prefill_row`` starts one row alone, ``decode`` advances
    every row by one token; each returns float logits (B, V) for the next token. ``native=True`` decodes with the
    native step wherever it supports the model and batch (``native_problem`` says why not, otherwise);
    ``compile=True`` compiles the PyTorch step with ``torch.compile`` and falls back to eager (with a warning)
    where compilation fails.
    The cache is sized per request (rounded up to 64 tokens); ``max_length`` fixes it instead, so that a compiled
    step, which is specialised to the cache's shape, is compiled once for every request that fits.
    """

    def __init__(
        self, model: nn.Module, *, compile: bool = False, fuse: bool = True, max_length: int | None = None,
        native: bool = True,
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        self.max_length = max_length
        if fuse:
            fuse_projections(model)
        self.cache: StaticKVCache | None = None
        self.valid = self.slot = self.position = self.columns = None
        self.compiled = False
        self.native = native
        self.native_problem: str | None = None if native else "turned off (native=False)"
        self._native_step: NativeStep | None = None
        self._step: Callable[[torch.Tensor], torch.Tensor] = self._decode_step
        if compile:
            self._step = self._compile_with_fallback(self._decode_step)

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
        cache = self.cache
        if cache is None or cache.batch_size != batch_size or not length <= cache.max_length <= 2 * length:
            self.cache = StaticKVCache(self.config, batch_size, length, self.dtype, self.device)
            self.valid = torch.zeros(batch_size, length, dtype=torch.bool, device=self.device)
            self.columns = torch.arange(length, device=self.device)
            self.slot = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self.position = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.cache.reset()
        for state in (self.valid, self.slot, self.position):
            state.zero_()  # in place: a compiled step keeps pointing at the same tensors
        if self.native:  # checked per batch: the batch size, the cache or the model's attention may have changed
            step = NativeStep.create(self.model, self.cache)
            self._native_step, self.native_problem = (step, None) if isinstance(step, NativeStep) else (None, step)

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 1
    ) -> torch.Tensor:
        """Start a new batch from (left-padded) prompts; returns the logits of each row's next token."""
        B, T = input_ids.shape
        self.reset(B, T + max_new_tokens)
        return self._prefill(input_ids, attention_mask, 0)

    @torch.inference_mode()
    def prefill_row(self, row: int, input_ids: torch.Tensor) -> torch.Tensor:
        """Replace row ``row`` by a new prompt (1-D ids) while other rows keep their state; returns (1, V)."""
        if self.cache is None:
            raise GenerationError("the engine has no cache yet; call reset(batch_size, max_length) or prefill first")
        if not 0 <= row < self.cache.batch_size:
            raise GenerationError(f"row {row} does not exist; the engine holds rows 0..{self.cache.batch_size - 1}")
        if input_ids.numel() + 1 > self.cache.max_length:
            raise GenerationError(
                f"a prompt of {input_ids.numel()} tokens does not fit the engine's cache of {self.cache.max_length} "
                "positions; reset it with a larger max_length"
            )
        return self._prefill(input_ids.reshape(1, -1), None, row)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) and return the next-token logits (B, V).

        Each row has room for the ``max_new_tokens`` it was prefilled with (the cache is not checked per step).
        """
        if self._native_step is not None:
            return self._native_step(tokens, self.slot, self.position, self.valid)
        return self._step(tokens)

    def release_row(self, row: int) -> None:
        """Park a finished row at column 0 so its idle steps never run past the cache."""
        self.slot[row] = 0
        self.position[row] = 0

    # ----------------------------------------------------------------------------------- the steps

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, start: int) -> torch.Tensor:
        B, T = input_ids.shape
        rows = slice(start, start + B)
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = (real.long().cumsum(-1) - 1).clamp_min(0)  # a left-padded row sees the positions it would alone
        valid = self.valid[rows]
        valid.zero_()
        valid[:, :T] = real
        if attention_mask is None and B == self.cache.batch_size:
            # Whole unpadded prompts from column 0: the cache's append mode hands attention just the T columns
            # written, with no mask, so SDPA takes its causal path and skips the masked half of the scores.
            self.cache.reset()
            logits = self._forward(input_ids, positions, None, None, self.cache)
        else:
            queries = torch.arange(T, device=self.device)
            mask = (self.columns[None, :] <= queries[:, None]) & valid[:, None, :]  # (B, T, S): causal, no padding
            mask[:, queries, queries] = True  # a padding query attends to itself, so no row is empty (NaN)
            slots = queries.expand(B, T)
            logits = self._forward(input_ids, positions, slots, mask[:, None], self.cache.rows(start, start + B))
        self.slot[rows] = T
        self.position[rows] = positions[:, -1] + 1
        return logits

    def _decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        slots = self.slot[:, None]  # (B, 1)
        self.valid.scatter_(1, slots, True)
        mask = self.valid[:, None, None, :]  # (B, 1, 1, S): exactly the filled columns
        logits = self._forward(tokens[:, None], self.position[:, None], slots, mask, self.cache)
        self.slot.add_(1)
        self.position.add_(1)
        return logits

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None, mask: torch.Tensor | None,
        cache: StaticKVCache,
    ) -> torch.Tensor:
        decoder = self.model.decoder
        x = decoder.embed_tokens(tokens)
        rope = decoder.rotary_emb(positions, x.dtype)
        cache.set_slots(slots)
        for layer in decoder.layers:
            x = layer(x, rope, mask, cache)
        cache.set_slots(None)
        return self.model.lm_head(decoder.norm(x[:, -1])).float()  # the last position only

    def _compile_with_fallback(self, step: Callable) -> Callable:
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
