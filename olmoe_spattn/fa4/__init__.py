"""FlashAttention-4 (``flash-attn-4``, CuTe DSL) as a band attention backend.

``band_attention(..., backend="fa4")`` runs :func:`fa4_band_attention`. flash-attn-4 is an
optional dependency (``pip install "olmoe-spattn[fa4]"``) imported only when a call needs
it; it runs on Hopper (SM90) and datacenter Blackwell (SM100/SM110) GPUs.
"""

from .op import fa4_band_attention
from .support import INSTALL_HINT, check_fa4, fa4_import_error, fa4_problem

__all__ = ["INSTALL_HINT", "check_fa4", "fa4_band_attention", "fa4_import_error", "fa4_problem"]
