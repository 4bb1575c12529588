"""Generation for many prompts at once, optionally refilling finished rows from the queue (continuous batching).

Each row of the engine has its own cache columns and positions, so prompts need no padding, and a row that
finishes can take the next prompt at once while the others keep decoding (``continuous=True``); otherwise a new
group starts only when the whole batch is done. Greedy outputs equal one-prompt-at-a-time greedy decoding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from laformer.errors import GenerationError
from laformer.generation import logits_to_probs, sample
from laformer.inference.engine import DecodeEngine


@torch.inference_mode()
def generate_batch(
    engine: DecodeEngine,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    continuous: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[list[int]]:
    """The new token ids of every prompt (a list of id lists), in prompt order; each stops at eos (kept)."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise GenerationError("generate_batch needs a non-empty list of non-empty prompts (lists of token ids)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GenerationError(f"batch_size must be a positive integer, got {batch_size!r}")
    vocab = engine.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise GenerationError(f"a prompt holds ids outside the vocabulary [0, {vocab}); use this model's tokenizer")
    if do_sample and not temperature > 0:
        raise GenerationError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False")
    eos = set(engine.config.eos_token_ids if eos_token_id is None else
              [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    generator = None
    if do_sample:
        generator = torch.Generator(device=engine.device)
        generator.manual_seed(seed) if seed is not None else generator.seed()

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        return sample(logits_to_probs(logits, temperature, top_k, top_p), generator)

    rows = min(batch_size, len(prompts))
    engine.reset(rows, max(len(p) for p in prompts) + max_new_tokens)
    queue = deque(range(len(prompts)))
    outputs: list[list[int]] = [[] for _ in prompts]
    owner: list[int | None] = [None] * rows  # which prompt each row is generating
    tokens = torch.zeros(rows, dtype=torch.long, device=engine.device)

    def finished(index: int) -> bool:
        out = outputs[index]
        return len(out) >= max_new_tokens or out[-1] in eos

    def admit(row: int) -> None:
        """Start queued prompts in ``row`` until one survives its first token (or the queue is empty)."""
        while queue:
            index = queue.popleft()
            token = int(pick(engine.prefill_row(row, torch.tensor(prompts[index], device=engine.device)))[0])
            outputs[index].append(token)
            if not finished(index):
                owner[row], tokens[row] = index, token
                return
        owner[row] = None
        engine.release_row(row)

    for row in range(rows):
        admit(row)
    while any(o is not None for o in owner):
        new = pick(engine.decode(tokens)).tolist()
        for row, index in enumerate(owner):
            if index is None:
                continue
            outputs[index].append(new[row])
            tokens[row] = new[row]
            if finished(index):
                owner[row] = None
                engine.release_row(row)
                if continuous:
                    admit(row)
        if not continuous and all(o is None for o in owner):
            for row in range(rows):
                admit(row)
    return outputs
