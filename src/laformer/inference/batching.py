"""Generation for many prompts at once, optionally refilling finished rows from the queue (continuous batching).

Each row of the engine has its own cache columns and positions, so prompts need no padding, and a row that
finishes can take the next prompt at once while the others keep decoding (``continuous=True``); otherwise a new
group starts only when the whole batch is done. Greedy outputs equal one-prompt-at-a-time greedy decoding.
Attention that reads each row's keys as one sequence (AMA) cannot refill rows: its groups run as left-padded
batches through ``generate``, on the same engine.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from torch import nn

from laformer.errors import GenerationError
from laformer.generation import GenerationConfig, StopStrings, TokenPicker, generate
from laformer.inference.engine import DecodeEngine, engine_for


@torch.inference_mode()
def generate_batch(
    model: nn.Module | DecodeEngine,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    batch_size: int = 8,
    continuous: bool = True,
    tokenizer=None,
    **options,
) -> list[list[int]]:
    """The new token ids of every prompt (a list of id lists), in prompt order; each stops at eos or a stop string
    (the token that ends it is kept).

    ``model`` is a causal LM (its engine runs) or a ``DecodeEngine``; ``config`` and/or the keyword options are
    those of ``laformer.generation.generate`` (``stop_strings`` need ``tokenizer``).
    """
    engine = model if isinstance(model, DecodeEngine) else engine_for(model)
    config = GenerationConfig.build(config, **options)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise GenerationError("generate_batch needs a non-empty list of non-empty prompts (lists of token ids)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GenerationError(f"batch_size must be a positive integer, got {batch_size!r}")
    vocab = engine.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise GenerationError(f"a prompt holds ids outside the vocabulary [0, {vocab}); use this model's tokenizer")
    if config.stop_strings and tokenizer is None:
        raise GenerationError("stop_strings need the tokenizer to read the text; pass tokenizer=...")
    if engine.contiguous_keys:
        return _padded_groups(engine, prompts, config, batch_size, tokenizer)

    eos = set(config.eos_ids(engine.config))
    rows = min(batch_size, len(prompts))
    picker = TokenPicker(config, rows, vocab, engine.device)
    stops = StopStrings(config.stop_strings, tokenizer, rows) if config.stop_strings else None
    engine.reset(rows, max(len(p) for p in prompts) + config.max_new_tokens)
    queue = deque(range(len(prompts)))
    outputs: list[list[int]] = [[] for _ in prompts]
    owner: list[int | None] = [None] * rows  # which prompt each row is generating
    tokens = torch.zeros(rows, dtype=torch.long, device=engine.device)

    def finished(row: int, index: int) -> bool:
        out = outputs[index]
        stopped = stops is not None and stops.hit(row, out[-1])
        return len(out) >= config.max_new_tokens or out[-1] in eos or stopped

    def admit(row: int) -> None:
        """Start queued prompts in ``row`` until one survives its first token (or the queue is empty)."""
        while queue:
            index = queue.popleft()
            prompt = torch.tensor(prompts[index], device=engine.device)
            picker.start_row(row, prompt)
            if stops is not None:
                stops.start_row(row)
            logits = engine.prefill_row(row, prompt)
            token = int(picker(logits, row)[0])
            outputs[index].append(token)
            if not finished(row, index):
                owner[row], tokens[row] = index, token
                return
        owner[row] = None
        engine.release_row(row)

    for row in range(rows):
        admit(row)
    while any(o is not None for o in owner):
        picker.observe(tokens)
        new = picker(engine.decode(tokens)).tolist()
        for row, index in enumerate(owner):
            if index is None:
                continue
            outputs[index].append(new[row])
            tokens[row] = new[row]
            if finished(row, index):
                owner[row] = None
                engine.release_row(row)
                if continuous:
                    admit(row)
        if not continuous and all(o is None for o in owner):
            for row in range(rows):
                admit(row)
    return outputs


def _padded_groups(engine: DecodeEngine, prompts: list[list[int]], config: GenerationConfig, batch_size: int,
                   tokenizer) -> list[list[int]]:
    """``generate_batch`` as left-padded groups of ``batch_size`` prompts through ``generate``."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start: start + batch_size]
        width = max(len(p) for p in group)
        ids = torch.zeros(len(group), width, dtype=torch.long, device=engine.device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(group):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        out = generate(engine.model, ids, mask, config, tokenizer=tokenizer, engine=engine, return_dict=True)
        outputs += [out.sequences[row, width: width + n].tolist() for row, n in enumerate(out.num_new_tokens)]
    return outputs
