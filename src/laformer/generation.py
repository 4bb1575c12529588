"""Text generation: prefill the prompt, then decode one token at a time through the KV cache.

Small step functions in the gpt-fast manner (``prefill``, ``decode_one_token``, ``logits_to_probs``,
``sample``) so each can be tested, compiled or swapped alone; ``generate_steps`` is the loop that drives them and
``generate``/``stream``/``generate_text`` are its three faces (token ids, text pieces, finished strings). The
options are one ``GenerationConfig``. Prefill and decode run on the model's decode engine
(``laformer.inference.engine``); ``prefill``/``decode_one_token`` over a ``cache=`` are the plain reference loop.

Batches of prompts of different lengths are left-padded: the model derives positions from the attention mask,
so a padded row computes exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch

from laformer.attention import AttentionBackend
from laformer.cache import Cache, KVCache
from laformer.errors import GenerationError

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, prompt + new), finished rows padded with the pad id
    prompt_length: int  # padded prompt width: new tokens start at this column
    num_new_tokens: list[int]  # per row, up to and including its eos / stop-string token
    finish_reasons: list[str]  # per row: "eos", "stop" (a stop string) or "length"


# --------------------------------------------------------------------------- step functions


def prefill(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache
) -> torch.Tensor:
    """Run the whole prompt once, filling ``cache``; returns the next-token logits (B, V)."""
    out = model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


def decode_one_token(
    model: torch.nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache
) -> torch.Tensor:
    """Feed one new token per row (B,) through the cache; returns the next-token logits (B, V)."""
    out = model(tokens[:, None], attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1].float()


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the row (``seen``, a (B, V) bool mask): shrink their scores."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; returns probabilities (B, V)."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token once the more likely ones already cover top_p (the first one always stays).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token id per row (B,), drawn with ``generator`` so the global RNG is never touched."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class GenerationConfig:
    """How to continue a prompt, checked once when built (``generate(..., **fields)`` builds one for you).

    Greedy unless ``do_sample``; ``temperature``, ``top_k`` (0: off) and ``top_p`` (1: off) shape the sampled
    distribution and ``seed`` makes the draw reproducible. ``repetition_penalty`` > 1 shrinks the scores of tokens
    already in the row. A row ends at an ``eos_token_id`` (default: the model config's; ``[]`` for none) or once its
    text contains one of ``stop_strings`` (needs a tokenizer); finished rows are padded with ``pad_token_id``.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | Sequence[str] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        elif self.stop_strings is not None:
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise GenerationError(
                f"temperature must be > 0 when sampling, got {self.temperature}; use do_sample=False for greedy "
                "decoding"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        if self.stop_strings is not None and (
                not self.stop_strings or not all(isinstance(s, str) and s for s in self.stop_strings)):
            raise GenerationError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")

    @classmethod
    def build(cls, config: "GenerationConfig | None" = None, **options) -> "GenerationConfig":
        """``config`` (or the defaults) with ``options`` replacing its fields; an unknown option is an error."""
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise GenerationError(
                f"unknown generation option(s) {sorted(unknown)}; use the fields of GenerationConfig: "
                f"{[f.name for f in fields(cls)]}"
            )
        return replace(config or cls(), **options)

    def eos_ids(self, model_config) -> list[int]:
        return _as_list(self.eos_token_id) if self.eos_token_id is not None else list(model_config.eos_token_ids)

    def pad_id(self, model_config) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return model_config.pad_token_id if model_config.pad_token_id is not None else (self.eos_ids(model_config)
                                                                                          or [0])[0]


def _check_inputs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GenerationConfig,
    tokenizer,
) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise GenerationError(
            "input_ids must be a 2-D integer tensor (batch, length); wrap a single prompt as input_ids[None] "
            "or tokenize with return_tensors='pt'"
        )
    if input_ids.numel() == 0:
        raise GenerationError("input_ids is empty; pass at least one prompt token (e.g. the BOS token)")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise GenerationError(
            f"input_ids holds ids outside the vocabulary [0, {vocab}); encode the prompt with this model's tokenizer"
        )
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise GenerationError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with the ids"
            )
        if not bool(attention_mask[:, -1].all()):
            raise GenerationError(
                "attention_mask has padding at the end of a row; generation needs left padding "
                "(tokenize with padding_side='left')"
            )
        if not bool(attention_mask.any(-1).all()):
            raise GenerationError("a row of attention_mask has no tokens at all; drop empty prompts from the batch")
    if config.stop_strings is not None and tokenizer is None:
        raise GenerationError("stop_strings need the tokenizer to read the text; pass tokenizer=...")
    context, length = model.config.max_position_embeddings, input_ids.shape[1]
    if length + config.max_new_tokens > context:
        raise GenerationError(
            f"the prompt ({length} tokens) plus max_new_tokens ({config.max_new_tokens}) exceeds the model's "
            f"context of {context} tokens; truncate the prompt to at most {max(context - config.max_new_tokens, 0)} "
            "tokens (truncation=True, max_length=...) or lower max_new_tokens"
        )


def _as_list(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


class TokenPicker:
    """The next token of every row from its logits: repetition penalty, then greedy or seeded sampling.

    ``start_row`` tells it a row's prompt (the penalty counts prompt tokens), ``observe`` each new token.
    """

    def __init__(self, config: GenerationConfig, batch: int, vocab: int, device: torch.device) -> None:
        self.config = config
        self.generator = None
        if config.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(config.seed) if config.seed is not None else self.generator.seed()
        self.seen = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)

    def start_row(self, row: int, prompt: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen[row] = False
            self.seen[row, prompt] = True

    def observe(self, tokens: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)

    def __call__(self, logits: torch.Tensor, row: int | None = None) -> torch.Tensor:
        """Tokens (B,) for logits (B, V) of every row, or (1,) for the (1, V) logits of ``row``."""
        config = self.config
        if self.seen is not None:
            seen = self.seen if row is None else self.seen[row: row + 1]
            logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
        if not config.do_sample:
            return logits.argmax(-1)
        return sample(logits_to_probs(logits, config.temperature, config.top_k, config.top_p), self.generator)


class StopStrings:
    """Watches each row's newest tokens for a stop string, decoding only a short window (per-token cost stays flat)."""

    def __init__(self, stop_strings: Sequence[str], tokenizer, batch: int) -> None:
        self.stop_strings = list(stop_strings)
        self.tokenizer = tokenizer
        # A stop string of n bytes spans at most n tokens; a few more cover a split UTF-8 character.
        self.window = max(len(s.encode()) for s in self.stop_strings) + 4
        self.history: list[list[int]] = [[] for _ in range(batch)]

    def start_row(self, row: int) -> None:
        self.history[row] = []

    def hit(self, row: int, token: int) -> bool:
        """Append ``token`` to ``row``; whether the row's text now holds a stop string."""
        history = self.history[row]
        history.append(token)
        text = self.tokenizer.decode(history[-self.window:], skip_special_tokens=False)
        return any(s in text for s in self.stop_strings)

    def update(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (B,) to the active rows; returns a (B,) mask of rows that just completed a stop string."""
        hit = torch.zeros_like(active)
        for row, (token, is_active) in enumerate(zip(tokens.tolist(), active.tolist())):
            hit[row] = is_active and self.hit(row, token)
        return hit


# --------------------------------------------------------------------------- the decoding loop


def _uses_engine(model: torch.nn.Module) -> bool:
    """A causal LM the decode engine can run: a laformer decoder and an output head."""
    return hasattr(model, "lm_head") and hasattr(getattr(model, "decoder", None), "layers")


@torch.no_grad()
def generate_steps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    tokenizer=None,
    attention: AttentionBackend | None = None,
    cache: Cache | None = None,
    engine=None,
    **options,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(tokens, finished)`` per step: the new token of every row (B,) and which rows are now done.

    ``config`` (a ``GenerationConfig``) and/or its fields as keywords say how. Finished rows receive the pad id.
    Decoding runs on the model's decode engine (``laformer.inference.engine_for``, or ``engine``). ``cache`` (an
    empty ``Cache``, e.g. ``KVCache``) runs the plain reference loop over that cache instead: one ``model(...)``
    call per token. ``attention`` routes the model's attention through another backend for this call only.
    """
    config = GenerationConfig.build(config, **options)
    if engine is not None and (engine.model is not model or cache is not None):
        raise GenerationError("engine= must be a DecodeEngine built on this model, and it brings its own cache; "
                              "pass engine.model as the model and drop cache=")
    _check_inputs(model, input_ids, attention_mask, config, tokenizer)
    if engine is None and cache is None:
        if _uses_engine(model):
            from laformer.inference.engine import engine_for

            engine = engine_for(model)
        else:
            cache = KVCache(len(model.decoder.layers))
    eos_ids, pad_token_id = config.eos_ids(model.config), config.pad_id(model.config)
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: the model takes its fast causal path
    if attention_mask is not None and engine is None:
        # Preallocate the whole mask once; each step passes a view of the first past + 1 columns.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, config.max_new_tokens)], dim=1)

    picker = TokenPicker(config, B, model.config.vocab_size, device)
    for row in range(B):
        picker.start_row(row, input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row, :T] > 0])
    eos = torch.tensor(eos_ids, dtype=input_ids.dtype, device=device)
    stops = StopStrings(config.stop_strings, tokenizer, B) if config.stop_strings else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    layers = model.decoder.layers
    previous_backends = [layer.self_attn.backend for layer in layers]
    if attention is not None:
        model.decoder.set_attention(attention)
    try:
        mask = None if attention_mask is None else attention_mask[:, :T]
        if engine is not None:
            logits = engine.prefill(input_ids, mask, config.max_new_tokens)
        else:
            logits = prefill(model, input_ids, mask, cache)
        for step in range(config.max_new_tokens):
            tokens = picker(logits).masked_fill(finished, pad_token_id)
            done = finished | torch.isin(tokens, eos)
            if stops is not None:
                done |= stops.update(tokens, ~finished)
            finished = done
            yield tokens, finished
            if step == config.max_new_tokens - 1 or bool(finished.all()):
                return
            picker.observe(tokens)
            if engine is not None:
                logits = engine.decode(tokens)
            else:
                mask = None if attention_mask is None else attention_mask[:, : T + step + 1]
                logits = decode_one_token(model, tokens, mask, cache)
    finally:
        for layer, backend in zip(layers, previous_backends):
            layer.self_attn.backend = backend


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    tokenizer=None,
    attention: AttentionBackend | None = None,
    cache: Cache | None = None,
    engine=None,
    return_dict: bool = False,
    **options,
) -> torch.Tensor | GenerationOutput:
    """Continue each prompt; returns ``(B, prompt + new)`` ids like Hugging Face's ``generate``.

    Takes a ``GenerationConfig`` and/or its fields as keywords (``max_new_tokens``, ``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``, ``stop_strings`` (needs
    ``tokenizer``), ``seed``). The token that ends a row is kept, and finished rows are padded with the pad id until
    every row is done. ``return_dict=True`` gives a ``GenerationOutput`` with per-row counts and finish reasons.
    ``attention``, ``cache`` and ``engine``: see ``generate_steps``.
    """
    config = GenerationConfig.build(config, **options)
    steps = generate_steps(model, input_ids, attention_mask, config, tokenizer=tokenizer, attention=attention,
                           cache=cache, engine=engine)
    new_tokens, counts, finished = [], torch.zeros(input_ids.shape[0], dtype=torch.long), None
    for tokens, done in steps:
        counts += (~finished if finished is not None else torch.ones_like(done)).cpu()
        new_tokens.append(tokens)
        finished = done
    sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
    if not return_dict:
        return sequences
    eos_ids = set(config.eos_ids(model.config))
    prompt_length = input_ids.shape[1]
    reasons = []
    for row, (count, done) in enumerate(zip(counts.tolist(), finished.tolist())):
        if not done:
            reasons.append(FINISH_LENGTH)
        else:
            last = int(sequences[row, prompt_length + count - 1])
            reasons.append(FINISH_EOS if last in eos_ids else FINISH_STOP)
    return GenerationOutput(sequences, prompt_length, counts.tolist(), reasons)


# --------------------------------------------------------------------------- text faces


def _split_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string (not safe to emit yet)."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


def _split_options(config: GenerationConfig | None, options: dict) -> tuple[GenerationConfig, dict]:
    """The ``GenerationConfig`` that ``config`` and the option keywords describe, and the other keywords."""
    names = {f.name for f in fields(GenerationConfig)}
    config = GenerationConfig.build(config, **{k: v for k, v in options.items() if k in names})
    return config, {k: v for k, v in options.items() if k not in names}


def stream(model: torch.nn.Module, input_ids: torch.Tensor, tokenizer, config: GenerationConfig | None = None,
           **options) -> Iterator[str]:
    """Yield the text of one prompt (batch 1) piece by piece as tokens arrive; stop strings are not emitted.

    Takes the options of ``generate``. Multi-byte characters split over tokens come out whole.
    """
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] != 1:
        raise GenerationError(f"stream takes one prompt, got a batch of {input_ids.shape[0]}; use generate for batches")
    config, options = _split_options(config, options)
    stop_strings = list(config.stop_strings or [])
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    eos_ids = set(config.eos_ids(model.config))
    pending = ""
    for tokens, _ in generate_steps(model, input_ids, config=config, tokenizer=tokenizer, **options):
        token = int(tokens[0])
        if token in eos_ids:
            break
        pending += decoder.step(token)
        if stop_strings:
            pending, stopped = _split_at_stop(pending, stop_strings)
            if stopped:
                if pending:
                    yield pending
                return
            keep = _held_back(pending, stop_strings)
            piece, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
        else:
            piece, pending = pending, ""
        if piece:
            yield piece
    pending, _ = _split_at_stop(pending + decoder.flush(), stop_strings)
    if pending:
        yield pending


def generate_text(model: torch.nn.Module, tokenizer, prompt_or_prompts: str | Sequence[str], chat: bool = False,
                  config: GenerationConfig | None = None, **options) -> str | list[str]:
    """Prompt(s) in, completion(s) out: tokenizes (optionally through the chat template), generates, decodes.

    Takes the options of ``generate``; a stop string and what follows it are cut from the text.
    """
    single = isinstance(prompt_or_prompts, str)
    prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
    if not prompts:
        raise GenerationError("no prompts given; pass a string or a non-empty list of strings")
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False) for p in prompts]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    config, options = _split_options(config, options)
    out = generate(model, batch.input_ids, batch.attention_mask, config, tokenizer=tokenizer, return_dict=True,
                   **options)
    stop_strings = list(config.stop_strings or [])
    texts = []
    for row, count in enumerate(out.num_new_tokens):
        ids = out.sequences[row, out.prompt_length: out.prompt_length + count].tolist()
        texts.append(_split_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop_strings)[0])
    return texts[0] if single else texts
