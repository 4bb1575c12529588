"""Server counters in Prometheus' text format (``GET /metrics``): requests, tokens, queue depth, tokens/s."""

from __future__ import annotations

import time
from collections import Counter, deque

from laformer.serve.served import ServedModel

RATE_WINDOW_S = 10.0  # tokens/s is measured over the last few seconds, so it tracks the current load


class Metrics:
    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._samples: deque[tuple[float, int]] = deque()  # (time, tokens generated so far)

    def count_request(self, path: str, status: int) -> None:
        self.requests[(path, status)] += 1

    def count_usage(self, prompt_tokens: int, completion_tokens: int = 0) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def tokens_per_second(self, generated: int) -> float:
        now = time.monotonic()
        self._samples.append((now, generated))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def render(self) -> str:
        scheduler = self.served.scheduler
        lines = ["# HELP laformer_requests_total HTTP requests by path and status.",
                 "# TYPE laformer_requests_total counter"]
        lines += [f'laformer_requests_total{{path="{path}",status="{status}"}} {count}'
                  for (path, status), count in sorted(self.requests.items())]
        values = [("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens),
                  ("completion_tokens_total", "counter", "Tokens sent back to clients.", self.completion_tokens)]
        if scheduler is not None:
            values += [
                ("queue_depth", "gauge", "Requests waiting for a batch row.", scheduler.waiting),
                ("running_requests", "gauge", "Requests decoding in the batch now.", scheduler.running),
                ("batch_rows", "gauge", "Rows of the continuous batch now (it follows the load).", scheduler.batch),
                ("batch_resizes_total", "counter", "Times the batch grew or shrank.", scheduler.resizes),
                ("decode_steps_total", "counter", "Batched decode steps run.", scheduler.steps),
                ("generated_tokens_total", "counter", "Tokens generated, all rows.", scheduler.generated_tokens),
                ("prefix_cached_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
                 scheduler.cached_tokens),
                ("tokens_per_second", "gauge", f"Generated tokens per second over the last {RATE_WINDOW_S:.0f} s.",
                 round(self.tokens_per_second(scheduler.generated_tokens), 3)),
            ]
        for name, kind, help_text, value in values:
            lines += [f"# HELP laformer_{name} {help_text}", f"# TYPE laformer_{name} {kind}", f"laformer_{name} {value}"]
        return "\n".join(lines) + "\n"
