"""The knobs of Actively Mediated Attention, checked once so the hot path never has to.

Pure data: the backend a config stands for is built in ``attention.py`` (``AMAAttention``, registered with
``laformer.attention.attention_backend``), which imports this module and not the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from laformer.ama.recorder import SelectionRecorder
from laformer.errors import ConfigError

SCORES = ("scan", "bound", "mean")
MEDIATIONS = ("off", "estimate", "learned")
SAMPLINGS = ("topk", "gumbel")
LOCAL_SHARE = 0.5  # of the budget, for the local window when none is given


@dataclass
class AMAConfig:
    """Which tokens each query attends to exactly, and how the rest are summarised.

    The exact budget is counted in tokens and spent in whole slices: ``sink_slices`` first slices (attention
    sinks), a local window of ``local_window`` tokens (the query's own slice and the ones before it), and as
    many of the most probable remaining slices as fit. ``local_window = budget - sink_slices * slice_len`` gives
    the StreamingLLM-style sinks + window baseline (no slice is selected).

    The defaults come from perplexity at 8k tokens on SmolLM2-135M (docs/ama.md): the ``scan`` score ranks slices
    about as well as their true attention mass, and with it half the budget in the local window and half in
    chosen slices beats ¾ local; a selection per 8 prefill queries (summing their masses) chooses about as well
    as one per query.
    """

    slice_len: int = 32
    budget: int = 1024
    sink_slices: int = 1
    local_window: int | None = None  # None: LOCAL_SHARE of the budget, in whole slices (see ``local_tokens``)
    score: str = "scan"  # "scan": mass from a 4-bit key copy | "bound": min/max bound of q.k | "mean": q . mean key
    mediation: str = "estimate"  # "off" | "estimate" (training-free) | "learned" (trainable gate)
    sampling: str = "topk"  # "topk" (deterministic) | "gumbel" (stochastic top-k, for training)
    dense_layers: int = 0  # the first N layers keep full attention
    query_block: int = 8  # prefill: consecutive queries sharing one selection (capped at slice_len)
    return_selection: bool = False  # record slice probabilities and choices in ``recorder``
    recorder: SelectionRecorder | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.slice_len < 1:
            raise ConfigError(f"AMA slice_len must be >= 1, got {self.slice_len}; 32-128 tokens is typical")
        if self.budget % self.slice_len or self.local_tokens % self.slice_len:
            raise ConfigError(
                f"AMA budget ({self.budget}) and local_window ({self.local_tokens}) must be multiples of "
                f"slice_len ({self.slice_len}), since whole slices are attended; round them to a multiple"
            )
        if self.local_tokens < self.slice_len:
            raise ConfigError(
                f"AMA local_window ({self.local_tokens}) must cover at least the query's own slice; "
                f"set it to a multiple of slice_len >= {self.slice_len}"
            )
        if self.query_block < 1 or self.slice_len % self.prefill_block:
            raise ConfigError(
                f"AMA query_block ({self.query_block}) must divide slice_len ({self.slice_len}), so that a "
                f"block of queries lies inside one slice; use a power of two <= {self.slice_len}"
            )
        if self.sink_slices < 0 or self.dense_layers < 0:
            raise ConfigError("AMA sink_slices and dense_layers must be >= 0")
        if self.num_selected < 0:
            raise ConfigError(
                f"AMA budget {self.budget} is smaller than sinks ({self.sink_slices * self.slice_len}) + "
                f"local window ({self.local_tokens}); raise the budget or shrink the window"
            )
        for name, value, allowed in (
            ("score", self.score, SCORES),
            ("mediation", self.mediation, MEDIATIONS),
            ("sampling", self.sampling, SAMPLINGS),
        ):
            if value not in allowed:
                raise ConfigError(f"AMA {name} {value!r} is not supported; use one of {allowed}")
        if self.return_selection and self.recorder is None:
            self.recorder = SelectionRecorder()

    @property
    def budget_slices(self) -> int:
        return self.budget // self.slice_len

    @property
    def local_tokens(self) -> int:
        """The local window in tokens: ``local_window``, or LOCAL_SHARE of the budget in whole slices."""
        if self.local_window is not None:
            return self.local_window
        return max(1, int(self.budget * LOCAL_SHARE) // self.slice_len) * self.slice_len

    @property
    def local_slices(self) -> int:
        return self.local_tokens // self.slice_len

    @property
    def prefill_block(self) -> int:
        """Queries that share one selection in prefill: ``query_block``, at most one slice."""
        return min(self.query_block, self.slice_len)

    @property
    def num_selected(self) -> int:
        """Slices chosen by score, once the sinks and the local window are paid for."""
        return self.budget_slices - self.sink_slices - self.local_slices

    def describe(self) -> str:
        """The budget as its parts: sinks + local window + selected slices x slice_len."""
        return (
            f"budget {self.budget} = sinks {self.sink_slices * self.slice_len} + local {self.local_tokens} + "
            f"{self.num_selected} selected x {self.slice_len}"
        )
