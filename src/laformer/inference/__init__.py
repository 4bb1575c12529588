"""Fast inference: the decode engine behind every generation API, its static KV cache, batching."""

from laformer.inference.engine import DecodeEngine, engine_for
from laformer.inference.static_cache import StaticKVCache

__all__ = ["DecodeEngine", "StaticKVCache", "engine_for"]
