"""``/v1/chat/completions`` and ``/v1/completions``: OpenAI requests in, scheduler jobs, OpenAI responses out.

Each prompt x ``n`` choices becomes one ``Job`` in the continuous batch; their events come back on an asyncio queue
and leave either as one JSON response or as server-sent events (``data: <json>`` lines ending in ``data: [DONE]``).
A client that goes away cancels its jobs, so their rows are free at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from laformer.errors import LaFormerError
from laformer.serve.errors import APIError, bad_request, unsupported
from laformer.serve.metrics import Metrics
from laformer.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from laformer.serve.scheduler import Failed, Finished, Job, Piece, QueueFull, Sampling, SchedulerClosed
from laformer.serve.served import CAUSAL_LM, ServedModel

DISCONNECT_POLL_S = 1.0  # how often a non-streamed request checks that its client is still there


# ----------------------------------------------------------------------------------------------- requests -> jobs


def chat_prompt(served: ServedModel, request: ChatCompletionRequest) -> list[int]:
    """The messages rendered with the model's chat template, as token ids."""
    if request.tools or request.tool_choice not in (None, "none"):
        raise unsupported("tools", "tool calling is not implemented; send plain messages")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise unsupported("response_format", "constrained (JSON) output is not implemented; ask for JSON in the "
                                             "prompt and parse the text instead")
    if request.top_logprobs and not request.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    messages = []
    for i, message in enumerate(request.messages):
        if message.role == "tool" or message.tool_calls:
            raise unsupported(f"messages[{i}]", "tool messages and tool calls need tool calling, not implemented")
        messages.append({"role": "system" if message.role == "developer" else message.role,
                         "content": _text_content(message.content, i)})
    return served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _text_content(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise unsupported(f"messages[{index}].content", f"only text parts are understood, got {part.get('type')!r}")
        parts.append(part["text"])
    return "".join(parts)


def completion_prompts(served: ServedModel, request: CompletionRequest) -> list[list[int]]:
    """The prompt(s) as token ids: a string, a list of strings, a list of ids or a list of id lists."""
    if request.suffix:
        raise unsupported("suffix", "fill-in-the-middle is not implemented")
    if request.echo:
        raise unsupported("echo", "echoing the prompt is not implemented; prepend it yourself")
    if request.best_of not in (None, 1, request.n):
        raise unsupported("best_of", "ranking candidates by likelihood is not implemented; use n")
    prompt = request.prompt
    if isinstance(prompt, str) or prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise bad_request("prompt is empty; send a string or a list of strings or token ids", "prompt")
    ids = [served.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    return [check_token_ids(served, row, "prompt") for row in ids]


def check_token_ids(served: ServedModel, ids: list[int], param: str) -> list[int]:
    vocab = served.model.config.vocab_size
    if not ids:
        raise bad_request(f"{param} is empty; send at least one token", param)
    if not all(0 <= t < vocab for t in ids):
        raise bad_request(f"{param} holds token ids outside the vocabulary [0, {vocab})", param)
    return ids


def sampling(served: ServedModel, request: SamplingFields, prompt: list[int], max_tokens: int | None,
             top_logprobs: int | None, choice: int) -> Sampling:
    """The ``Sampling`` of one choice; refuses what laformer cannot honour and what does not fit the context."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise unsupported(name, "penalties are not implemented; leave it at 0")
    if request.logit_bias:
        raise unsupported("logit_bias", "biasing tokens is not implemented")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if not all(stop):
        raise bad_request("stop strings must not be empty", "stop")
    room = served.max_length - len(prompt)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise APIError(400, f"This model's maximum context length is {served.max_length} tokens. However, you "
                            f"requested {len(prompt) + (max_tokens or 0)} tokens ({len(prompt)} in the prompt, "
                            f"{max_tokens or 0} for the completion). Please shorten the prompt or lower max_tokens.",
                       "context_length_exceeded", "messages" if isinstance(request, ChatCompletionRequest) else "prompt")
    seed = None if request.seed is None else request.seed + choice  # n choices of one seed still differ
    return Sampling(max_tokens or room, request.temperature, request.top_p, seed, stop, top_logprobs)


# ----------------------------------------------------------------------------------------------- running them


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finished: Finished | None = None


class Run:
    """The jobs of one HTTP request, submitted together; iterate ``events()`` for ``(choice index, event)``."""

    def __init__(self, served: ServedModel, prompts: list[list[int]], samplings: list[Sampling]) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.jobs: list[Job] = []

        def emitter(index: int):
            def emit(event) -> None:
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
                    self.jobs[index].cancelled = True
            return emit

        scheduler = served.scheduler
        self.jobs = [Job(p, s, emitter(i), served.tokenizer, scheduler.eos_ids)
                     for i, (p, s) in enumerate(zip(prompts, samplings))]
        try:
            scheduler.submit(self.jobs)
        except QueueFull as exc:
            raise APIError(429, str(exc), "queue_full") from exc
        except SchedulerClosed as exc:
            raise APIError(503, str(exc), "shutting_down") from exc
        self.choices = [Choice() for _ in self.jobs]

    async def events(self, is_disconnected=None) -> AsyncIterator[tuple[int, Piece | Finished]]:
        """Events until every choice has finished; a failed job raises its ``APIError``."""
        remaining = len(self.jobs)
        while remaining:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if is_disconnected is not None and await is_disconnected():
                    self.cancel()
                    return
                continue
            if isinstance(event, Failed):
                self.cancel()
                status = 503 if isinstance(event.error, SchedulerClosed) else 400
                raise APIError(status, str(event.error), "generation_failed")
            choice = self.choices[index]
            if isinstance(event, Piece):
                choice.text.append(event.text)
                choice.logprobs += event.logprobs
            else:
                choice.finished = event
                remaining -= 1
            yield index, event

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True

    def usage(self, prompts: list[list[int]], n: int, metrics: Metrics) -> dict[str, Any]:
        ends = [c.finished for c in self.choices if c.finished is not None]
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(e.completion_tokens for e in ends)
        cached = sum(e.cached_tokens for e in ends[::n])  # each prompt once, as prompt_tokens counts it
        metrics.count_usage(prompt_tokens, completion)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


# ----------------------------------------------------------------------------------------------- responses


class Formatter:
    """The OpenAI JSON of one endpoint: full responses and stream chunks, chat or plain text."""

    def __init__(self, served: ServedModel, chat: bool, prefix: str) -> None:
        self.served, self.chat = served, chat
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def envelope(self, chunk: bool = False, **fields) -> dict[str, Any]:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.served.name,
                "system_fingerprint": None, **fields}

    def choice(self, index: int, text: str, logprobs: list, finish: str | None, want_logprobs: bool,
               chunk: bool = False, first: bool = False) -> dict[str, Any]:
        lp = self.logprobs(logprobs) if want_logprobs else None
        if not self.chat:
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        if chunk:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": lp, "finish_reason": finish}

    def logprobs(self, entries: list) -> dict[str, Any]:
        decode = self.served.tokenizer.decode
        if self.chat:
            def item(token: int, logprob: float) -> dict[str, Any]:
                text = decode([token])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                                for e in entries]}
        tokens = [decode([e.token]) for e in entries]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{decode([t]): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


async def respond(served: ServedModel, metrics: Metrics, run: Run, prompts: list[list[int]], n: int,
                  formatter: Formatter, want_logprobs: bool, is_disconnected) -> dict[str, Any] | None:
    """The whole (non-streamed) response, or None when the client left before it was ready."""
    async for _ in run.events(is_disconnected):
        pass
    if any(c.finished is None for c in run.choices):
        return None
    choices = [formatter.choice(i, "".join(c.text), c.logprobs, c.finished.reason, want_logprobs)
               for i, c in enumerate(run.choices)]
    return formatter.envelope(choices=choices, usage=run.usage(prompts, n, metrics))


async def stream(served: ServedModel, metrics: Metrics, run: Run, prompts: list[list[int]], n: int,
                 formatter: Formatter, want_logprobs: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; errors after the first byte arrive as an ``error`` event, as OpenAI sends them."""
    started = set()
    try:
        if formatter.chat:  # OpenAI's first chunk of a choice carries the role
            for i in range(len(run.jobs)):
                started.add(i)
                yield _sse(formatter.envelope(True, choices=[formatter.choice(i, "", [], None, False, True, True)],
                                              **_no_usage(include_usage)))
        async for index, event in run.events():
            if isinstance(event, Piece):
                choice = formatter.choice(index, event.text, event.logprobs, None, want_logprobs, chunk=True)
            else:
                choice = formatter.choice(index, "", [], event.reason, False, chunk=True)
            yield _sse(formatter.envelope(True, choices=[choice], **_no_usage(include_usage)))
        if include_usage:
            yield _sse(formatter.envelope(True, choices=[], usage=run.usage(prompts, n, metrics)))
        else:
            run.usage(prompts, n, metrics)
    except APIError as exc:
        yield _sse(exc.body())
    finally:
        run.cancel()  # a client that disconnected lands here too: its rows are freed at the next step
    yield "data: [DONE]\n\n"


def _no_usage(include_usage: bool) -> dict[str, Any]:
    return {"usage": None} if include_usage else {}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------------------------- the endpoints


async def chat_completions(served: ServedModel, metrics: Metrics, request: ChatCompletionRequest, http):
    served.check_model(request.model)
    served.require_task(CAUSAL_LM, "/v1/chat/completions")
    prompt = _as_api_error(chat_prompt, served, request)
    max_tokens = request.max_completion_tokens or request.max_tokens
    top = (request.top_logprobs or 0) if request.logprobs else None
    samplings = [sampling(served, request, prompt, max_tokens, top, j) for j in range(request.n)]
    return await _run(served, metrics, [prompt] * request.n, [prompt], samplings, request, http,
                      Formatter(served, True, "chatcmpl"), request.logprobs)


async def completions(served: ServedModel, metrics: Metrics, request: CompletionRequest, http):
    served.check_model(request.model)
    served.require_task(CAUSAL_LM, "/v1/completions")
    prompts = completion_prompts(served, request)
    top = request.logprobs
    samplings = [sampling(served, request, p, request.max_tokens, top, j) for p in prompts for j in range(request.n)]
    return await _run(served, metrics, [p for p in prompts for _ in range(request.n)], prompts, samplings, request,
                      http, Formatter(served, False, "cmpl"), top is not None)


async def _run(served, metrics, job_prompts, prompts, samplings, request, http, formatter, want_logprobs):
    from starlette.responses import StreamingResponse

    run = Run(served, job_prompts, samplings)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = stream(served, metrics, run, prompts, request.n, formatter, want_logprobs, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await respond(served, metrics, run, prompts, request.n, formatter, want_logprobs, http.is_disconnected)


def _as_api_error(function, *args):
    """Run ``function``; a laformer error from the tokenizer or template is the client's 400."""
    try:
        return function(*args)
    except APIError:
        raise
    except LaFormerError as exc:
        raise bad_request(str(exc), "messages") from exc
