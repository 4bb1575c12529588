"""Actively Mediated Attention (AMA): sparse attention over chosen KV slices, with the rest summarised.

``model.set_attention(AMAConfig(budget=1024))`` switches a loaded model over, with no retraining.
"""

from laformer.ama.attention import AMAAttention, MediationGate
from laformer.ama.cache import SlicedKVCache, SliceSummaries
from laformer.ama.config import AMAConfig
from laformer.ama.recorder import SelectionRecord, SelectionRecorder

__all__ = [
    "AMAAttention",
    "AMAConfig",
    "MediationGate",
    "SelectionRecord",
    "SelectionRecorder",
    "SliceSummaries",
    "SlicedKVCache",
]
