"""Fast inference: fused projections, a static KV cache, the lean (optionally compiled) decode engine, batching."""

from laformer.inference.engine import DecodeEngine
from laformer.inference.fused import fuse_projections
from laformer.inference.static_cache import StaticKVCache

__all__ = ["DecodeEngine", "StaticKVCache", "fuse_projections"]
