"""Continuous batching over the decode engine: requests join a running batch and leave it as they finish.

One thread owns a ``DecodeEngine`` with a cache of up to ``max_batch`` rows of ``max_length`` tokens and loops:
start waiting requests in free rows (``prefill_row``), then advance every row by one token in a single ``decode``
call. A new request so waits for one step, not for the batch to drain, and a finished or cancelled row is free at
the next step. A finished row keeps its keys (it idles on its last token) until its row is needed or full, so the
next turn of a chat, whose prompt starts with this turn's prompt and reply, prefills only the new message (the
engine copies the longest held prefix). Requests beyond ``max_batch + max_queue`` are refused at once
(``QueueFull``) instead of waiting without bound.

A step costs about as much for an empty row as for a busy one (a lone request at 8 rows ran at half its speed at
1 row), so the batch has as many rows as there are requests, in powers of two: it grows as soon as more arrive and
shrinks once they fall to a quarter of the rows (not at once, so it does not flap), re-prefilling the running rows'
tokens into the resized cache (``_resize``).

Attention that reads each row's keys as one sequence (AMA) cannot refill rows; such a model runs one request at
a time (``max_batch`` 1) through the engine's batch-1 ``prefill``, which keeps the prefix cache too.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from laformer.errors import LaFormerError
from laformer.generation import _held_back, _split_at_stop, logits_to_probs, sample
from laformer.inference.engine import DecodeEngine


class QueueFull(LaFormerError):
    """Every row is busy and the waiting queue is full; the client should retry later (HTTP 429)."""


class SchedulerClosed(LaFormerError):
    """The scheduler was stopped (the server is shutting down) or its engine failed (HTTP 503)."""


@dataclass(frozen=True)
class Sampling:
    """How one request continues its prompt; ``temperature`` 0 is greedy, ``top_logprobs`` None skips log-probs."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this step, best first


@dataclass
class Piece:
    """New text of a request (and the log-probs of the tokens that made it, when asked for)."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Finished:
    reason: str  # "stop" (eos or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose keys came from the prefix cache


@dataclass
class Failed:
    error: LaFormerError


Event = Piece | Finished | Failed


class Job:
    """One request in one row: picks its tokens, turns them into text, watches eos and stop strings.

    Events go to ``emit`` from the scheduler's thread; set ``cancelled`` (from any thread) to free the row.
    """

    def __init__(self, prompt: list[int], sampling: Sampling, emit: Callable[[Event], None], tokenizer,
                 eos_ids: set[int]) -> None:
        self.prompt, self.sampling, self.emit, self.eos_ids = prompt, sampling, emit, eos_ids
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(sampling.seed) if sampling.seed is not None else self.generator.seed()
        self.cancelled = False
        self.cached_tokens = 0
        self.completion_tokens = 0
        self._pending = ""  # decoded text not sent yet: it may still turn into a stop string
        self._pending_logprobs: list[TokenLogprob] = []

    def pick(self, logits: torch.Tensor, greedy: int) -> int:
        """The next token from this row's logits (V,); ``greedy`` is their argmax, computed for the whole batch."""
        s = self.sampling
        if self.generator is None:
            token = greedy
        else:
            token = int(sample(logits_to_probs(logits[None], s.temperature, 0, s.top_p), self.generator)[0])
        if s.top_logprobs is not None:
            logprobs = logits.log_softmax(-1)
            top = torch.topk(logprobs, s.top_logprobs) if s.top_logprobs else None
            self._pending_logprobs.append(TokenLogprob(
                token, float(logprobs[token]), [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))))
        return token

    def accept(self, token: int) -> bool:
        """Take the picked token; whether the request is now finished (its last events are sent)."""
        self.completion_tokens += 1
        if token in self.eos_ids:
            self._pending_logprobs.clear()  # the end-of-turn token is not part of the text
            self._pending += self.decoder.flush()
            return self._finish("stop")
        self._pending += self.decoder.step(token)
        stop = self.sampling.stop
        if stop:
            self._pending, stopped = _split_at_stop(self._pending, stop)
            if stopped:
                return self._finish("stop")
        keep = _held_back(self._pending, stop) if stop else 0
        self._send(len(self._pending) - keep)
        if self.completion_tokens >= self.sampling.max_tokens:
            self._pending += self.decoder.flush()
            return self._finish("length")
        return False

    def _send(self, upto: int, final: bool = False) -> None:
        """Emit the first ``upto`` pending characters with the log-probs of the tokens since the last piece."""
        text, self._pending = self._pending[:upto], self._pending[upto:]
        if text or (final and self._pending_logprobs):
            self.emit(Piece(text, self._pending_logprobs))
            self._pending_logprobs = []

    def _finish(self, reason: str) -> bool:
        if self.sampling.stop:
            self._pending = _split_at_stop(self._pending, self.sampling.stop)[0]
        self._send(len(self._pending), final=True)
        self.emit(Finished(reason, len(self.prompt), self.completion_tokens, self.cached_tokens))
        return True


class Scheduler:
    """Runs ``Job``s of one causal LM in a shared, continuously refilled batch on a background thread."""

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 8, max_length: int = 2048,
                 max_queue: int = 64) -> None:
        self.engine = DecodeEngine(model, max_length=min(max_length, model.config.max_position_embeddings))
        self.max_length = self.engine.max_length
        self.lockstep = self.engine.contiguous_keys  # AMA: one request at a time, through batch-1 prefill
        self.max_batch = 1 if self.lockstep else max_batch
        self.max_queue = max_queue
        self.tokenizer = tokenizer
        self.eos_ids = set(model.config.eos_token_ids)
        self._sizes = sorted({min(2 ** k, self.max_batch) for k in range(self.max_batch.bit_length() + 1)})
        self.batch = 0  # rows of the engine's cache now
        self.resizes = 0
        self._resize(1)
        self._warm_up()
        self._waiting: deque[Job] = deque()
        self._clock = itertools.count()
        self._wakeup = threading.Condition()
        self._closed = False
        self.steps = self.generated_tokens = self.cached_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="laformer-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- any thread

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(job is not None for job in self._rows)

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (all or none): ``QueueFull`` when they do not fit the rows and the queue."""
        with self._wakeup:
            if self._closed:
                raise SchedulerClosed("the server is shutting down; retry on another instance")
            if len(self._waiting) + len(jobs) > self.max_queue + self.max_batch - self.running:
                raise QueueFull(f"the server is at capacity ({self.max_batch} running, {len(self._waiting)} waiting, "
                                f"queue limit {self.max_queue}); retry shortly or start it with a larger --max-queue")
            self._waiting.extend(jobs)
            self._wakeup.notify()

    def close(self) -> None:
        """Stop the thread; waiting and running requests get a ``SchedulerClosed`` event."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------------- the thread

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._closed and not self._waiting and not self.running:
                    self._wakeup.wait()
                if self._closed:
                    break
                demand = self.running + len(self._waiting)
            try:
                self._fit(demand)
                with self._wakeup:
                    starting = [self._waiting.popleft() for _ in range(min(len(self._waiting), self._free_rows()))]
                for job in starting:
                    self._start(job)
                if self.running:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not kill the server: fail its rows, go on
                self._recover(exc)
        self._fail_all(SchedulerClosed("the server is shutting down; retry on another instance"))

    def _free_rows(self) -> int:
        return len(self._released) + len(self._idle)

    def _start(self, job: Job) -> None:
        if job.cancelled:
            return
        row = min(self._released) if self._released else min(self._idle, key=self._idle.get)
        self._released.discard(row)
        self._idle.pop(row, None)
        self._rows[row] = job  # before prefilling: a failure there reaches this job too
        prompt = torch.tensor(job.prompt)
        if self.lockstep:
            logits = self.engine.prefill(prompt[None], max_new_tokens=job.sampling.max_tokens)
        else:
            logits = self.engine.prefill_row(row, prompt)
        job.cached_tokens = self.engine.prefix_reused
        self.cached_tokens += job.cached_tokens
        self._fed[row] = list(job.prompt)
        self._advance(row, job, logits[0], int(logits[0].argmax()))

    def _step(self) -> None:
        for row, fed in enumerate(self._fed):  # an idle row about to run past the cache lets its keys go
            if row in self._idle and len(fed) >= self.max_length:
                del self._idle[row]
                self._release(row)
        tokens = self._tokens.tolist()
        logits = self.engine.decode(self._tokens)
        self.steps += 1
        for row in range(self.batch):
            if row not in self._released:
                self._fed[row].append(tokens[row])
        greedy = logits.argmax(-1).tolist()
        for row, job in enumerate(self._rows):
            if job is not None:
                self._advance(row, job, logits[row], greedy[row])

    def _advance(self, row: int, job: Job, logits: torch.Tensor, greedy: int) -> None:
        if job.cancelled:
            self._finish_row(row)
            return
        token = job.pick(logits, greedy)
        self.generated_tokens += 1
        self._tokens[row] = token  # fed at the next step, even once finished: the row then idles on it
        if job.accept(token):
            self._finish_row(row)

    def _finish_row(self, row: int) -> None:
        self._rows[row] = None
        self._idle[row] = next(self._clock)

    def _release(self, row: int) -> None:
        self.engine.release_row(row)
        self._released.add(row)
        self._tokens[row] = 0
        self._fed[row] = []

    def _warm_up(self) -> None:
        """One prefill and one step before the first request, which would otherwise pay for the first calls'
        set-up (seconds for quantized weights)."""
        token = torch.tensor([next(iter(self.eos_ids), 0)])
        if self.lockstep:
            self.engine.prefill(token[None])
        else:
            self.engine.prefill_row(0, token)
        self.engine.decode(self._tokens)
        self._resize(1)
        self.resizes = 0

    def _fit(self, demand: int) -> None:
        """Grow the batch to hold ``demand`` requests at once; shrink it once they fit a quarter of it."""
        target = next(size for size in self._sizes if size >= min(demand, self.max_batch))
        if target > self.batch or target * 4 <= self.batch:
            self._resize(target)

    def _resize(self, rows: int) -> None:
        """A cache of ``rows`` rows; running requests move to its first rows with their tokens re-prefilled (the
        finished rows' keys, the prefix cache, are dropped)."""
        survivors = [(job, self._fed[row], int(self._tokens[row])) for row, job in enumerate(self._rows[:self.batch])
                     if job is not None] if self.batch else []
        self.engine.reset(rows, self.max_length)
        self.batch, self.resizes = rows, self.resizes + 1
        self._rows: list[Job | None] = [None] * rows
        self._fed: list[list[int]] = [[] for _ in range(rows)]  # the tokens whose keys each row holds, so also
        # the column it writes next
        self._idle: dict[int, int] = {}  # finished rows still holding their keys -> when they finished
        self._released = set(range(rows))  # rows parked at column 0, holding nothing
        self._tokens = torch.zeros(rows, dtype=torch.long)  # what each row is fed at the next step
        for row, (job, fed, token) in enumerate(survivors):  # all placed first: a failure below reaches them all
            self._released.discard(row)
            self._rows[row], self._fed[row], self._tokens[row] = job, fed, token
        for row, (_, fed, _) in enumerate(survivors):
            self.engine.prefill_row(row, torch.tensor(fed))

    def _recover(self, exc: Exception) -> None:
        error = exc if isinstance(exc, LaFormerError) else SchedulerClosed(
            f"generation failed ({type(exc).__name__}: {exc}); the request was dropped, please retry")
        self._fail_all(error, waiting=False)
        self._resize(self.batch)

    def _fail_all(self, error: LaFormerError, waiting: bool = True) -> None:
        jobs = [job for job in self._rows if job is not None]
        if waiting:
            with self._wakeup:
                jobs += list(self._waiting)
                self._waiting.clear()
        self._rows = [None] * self.batch
        for job in jobs:
            job.emit(Failed(error))
