"""olmoe-spattn: SPAttention (per-head band partitioning of causal attention) for OLMo-core."""

from .api import BACKENDS, band_attention
from .bands import DYNAMIC, PATTERNS, BandSpec

__version__ = "0.1.0"

try:  # register band attention with OLMo-core when (and only when) OLMo-core gets imported
    from .olmo._hook import install as _install_olmo_hook

    _install_olmo_hook()
except Exception:  # pragma: no cover - never let the optional integration break the import
    pass

__all__ = ["BACKENDS", "DYNAMIC", "PATTERNS", "BandSpec", "band_attention", "__version__"]
