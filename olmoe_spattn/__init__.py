"""olmoe-spattn: SPAttention (per-head band partitioning of causal attention) for OLMo-core."""

from .api import BACKENDS, band_attention
from .bands import DYNAMIC, PATTERNS, BandSpec

__version__ = "0.1.0"

__all__ = ["BACKENDS", "DYNAMIC", "PATTERNS", "BandSpec", "band_attention", "__version__"]
