"""Text generation: prefill the prompt, then decode one token at a time through the KV cache.

Small step functions in the gpt-fast manner (``prefill``, ``decode_one_token``, ``logits_to_probs``,
``sample``) so each can be tested, compiled or swapped alone; ``generate_steps`` is the loop that drives them and
``generate``/``stream``/``generate_text`` are its three faces (token ids, text pieces, finished strings).

Batches of prompts of different lengths are left-padded: the model derives positions from the attention mask,
so a padded row computes exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from laformer.attention import AttentionBackend
from laformer.cache import KVCache
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


# --------------------------------------------------------------------------- validation


def _check_options(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    stop_strings: Sequence[str] | None,
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
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise GenerationError(
            f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy decoding"
        )
    if not isinstance(top_k, int) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if not repetition_penalty > 0:
        raise GenerationError(f"repetition_penalty must be > 0 (1 disables it), got {repetition_penalty}")
    if stop_strings is not None:
        if tokenizer is None:
            raise GenerationError("stop_strings need the tokenizer to read the text; pass tokenizer=...")
        if not stop_strings or not all(isinstance(s, str) and s for s in stop_strings):
            raise GenerationError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
    context, length = model.config.max_position_embeddings, input_ids.shape[1]
    if length + max_new_tokens > context:
        raise GenerationError(
            f"the prompt ({length} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{context} tokens; truncate the prompt to at most {max(context - max_new_tokens, 0)} tokens "
            "(truncation=True, max_length=...) or lower max_new_tokens"
        )


def _as_list(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


class _StopStrings:
    """Watches each row's newest tokens for a stop string, decoding only a short window (per-token cost stays flat)."""

    def __init__(self, stop_strings: Sequence[str], tokenizer, batch: int) -> None:
        self.stop_strings = list(stop_strings)
        self.tokenizer = tokenizer
        # A stop string of n bytes spans at most n tokens; a few more cover a split UTF-8 character.
        self.window = max(len(s.encode()) for s in self.stop_strings) + 4
        self.history: list[list[int]] = [[] for _ in range(batch)]

    def update(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (B,) to the active rows; returns a (B,) mask of rows that just completed a stop string."""
        hit = torch.zeros_like(active)
        for row, (token, is_active) in enumerate(zip(tokens.tolist(), active.tolist())):
            if not is_active:
                continue
            history = self.history[row]
            history.append(token)
            text = self.tokenizer.decode(history[-self.window:], skip_special_tokens=False)
            hit[row] = any(s in text for s in self.stop_strings)
        return hit


# --------------------------------------------------------------------------- the decoding loop


@torch.no_grad()
def generate_steps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    seed: int | None = None,
    attention: AttentionBackend | None = None,
    cache: KVCache | None = None,
    engine=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(tokens, finished)`` per step: the new token of every row (B,) and which rows are now done.

    Finished rows receive the pad id. ``cache`` is the empty cache to fill (default: a new growable ``KVCache``),
    which is where a preallocated static cache slots in. ``attention`` routes the model's attention through another
    backend for this call only. ``engine`` (a ``laformer.inference.DecodeEngine`` built on ``model``) runs the
    prefill and decode steps on the lean path instead: static cache, fused projections, optionally compiled.
    """
    if engine is not None and (engine.model is not model or cache is not None):
        raise GenerationError("engine= must be a DecodeEngine built on this model, and it brings its own cache; "
                              "pass engine.model as the model and drop cache=")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    _check_options(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                   repetition_penalty, stop_strings, tokenizer)
    config = model.config
    eos_ids = _as_list(eos_token_id) if eos_token_id is not None else config.eos_token_ids
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids or [0])[0]
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if not bool(attention_mask.any(-1).all()):
            raise GenerationError("a row of attention_mask has no tokens at all; drop empty prompts from the batch")
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: the model takes its fast causal path
    if attention_mask is not None:
        # Preallocate the whole mask once; each step passes a view of the first past + 1 columns.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], dim=1)

    generator = None
    if do_sample:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, config.vocab_size + 1, dtype=torch.bool, device=device)
        prompt = input_ids
        if attention_mask is not None:  # padding goes to an extra last column, dropped below
            prompt = input_ids.masked_fill(attention_mask[:, :T] == 0, config.vocab_size)
        seen = seen.scatter_(1, prompt, True)[:, : config.vocab_size]
    eos = torch.tensor(eos_ids, dtype=input_ids.dtype, device=device)
    stops = _StopStrings(stop_strings, tokenizer, B) if stop_strings else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(len(model.decoder.layers)) if cache is None else cache

    layers = model.decoder.layers
    previous_backends = [layer.self_attn.backend for layer in layers]
    if attention is not None:
        model.decoder.set_attention(attention)
    try:
        mask = None if attention_mask is None else attention_mask[:, :T]
        if engine is not None:
            logits = engine.prefill(input_ids, mask, max_new_tokens)
        else:
            logits = prefill(model, input_ids, mask, cache)
        for step in range(max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            if do_sample:
                tokens = sample(logits_to_probs(logits, temperature, top_k, top_p), generator)
            else:
                tokens = logits.argmax(-1)
            tokens = tokens.masked_fill(finished, pad_token_id)
            done = finished | torch.isin(tokens, eos)
            if stops is not None:
                done |= stops.update(tokens, ~finished)
            finished = done
            yield tokens, finished
            if step == max_new_tokens - 1 or bool(finished.all()):
                return
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            mask = None if attention_mask is None else attention_mask[:, : T + step + 1]
            if engine is not None:
                logits = engine.decode(tokens)
            else:
                logits = decode_one_token(model, tokens, mask, cache)
    finally:
        for layer, backend in zip(layers, previous_backends):
            layer.self_attn.backend = backend


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    seed: int | None = None,
    attention: AttentionBackend | None = None,
    cache: KVCache | None = None,
    engine=None,
    return_dict: bool = False,
) -> torch.Tensor | GenerationOutput:
    """Continue each prompt; returns ``(B, prompt + new)`` ids like Hugging Face's ``generate``.

    Greedy unless ``do_sample``. Generation stops per row at an eos id (default: the config's) or once the row's text
    contains one of ``stop_strings`` (needs ``tokenizer``); the token that ends a row is kept, and finished rows are
    padded with ``pad_token_id`` until every row is done. ``seed`` makes sampling reproducible.
    ``return_dict=True`` gives a ``GenerationOutput`` with per-row counts and finish reasons.
    """
    steps = generate_steps(
        model, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop_strings=stop_strings, tokenizer=tokenizer,
        seed=seed, attention=attention, cache=cache, engine=engine,
    )
    new_tokens, counts, finished = [], torch.zeros(input_ids.shape[0], dtype=torch.long), None
    for tokens, done in steps:
        counts += (~finished if finished is not None else torch.ones_like(done)).cpu()
        new_tokens.append(tokens)
        finished = done
    sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
    if not return_dict:
        return sequences
    eos_ids = set(_as_list(eos_token_id) if eos_token_id is not None else model.config.eos_token_ids)
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


def stream(model: torch.nn.Module, input_ids: torch.Tensor, tokenizer, **options) -> Iterator[str]:
    """Yield the text of one prompt (batch 1) piece by piece as tokens arrive; stop strings are not emitted.

    Takes the options of ``generate``. Multi-byte characters split over tokens come out whole.
    """
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] != 1:
        raise GenerationError(f"stream takes one prompt, got a batch of {input_ids.shape[0]}; use generate for batches")
    stop_strings = options.get("stop_strings")
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    eos_ids = set(_as_list(options.get("eos_token_id")) if options.get("eos_token_id") is not None
                  else model.config.eos_token_ids)
    pending = ""
    for tokens, _ in generate_steps(model, input_ids, tokenizer=tokenizer, **options):
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
                  **options) -> str | list[str]:
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
    out = generate(model, batch.input_ids, batch.attention_mask, tokenizer=tokenizer, return_dict=True, **options)
    stop_strings = options.get("stop_strings")
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    texts = []
    for row, count in enumerate(out.num_new_tokens):
        ids = out.sequences[row, out.prompt_length: out.prompt_length + count].tolist()
        texts.append(_split_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop_strings)[0])
    return texts[0] if single else texts
