"""The band as CuTe ``mask_mod`` functions for FlashAttention-4 (built once, on first use).

FA4 calls a ``mask_mod(batch, head, m_idx, n_idx, seqlen_info, aux_tensors)`` on every
element of a partial tile (``m_idx``/``n_idx``: query row and key index, each a length-1
``TensorSSA``) and caches compiled kernels by the function's source hash, so each
function below is created once per process. The data they read is built by
:mod:`olmoe_spattn.fa4.blocks`, whose ``allowed_from_aux`` is the same computation in
torch (the CPU tests check it against ``BandSpec.mask``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

from .blocks import in_band


def _quiet_aux_warning() -> None:
    # CuTe DSL warns on every compile that the aux-tensor bundle is not a JIT argument; harmless.
    warnings.filterwarnings("ignore", message=r"Argument aux_data .* cannot be converted")


@functools.cache
def band_mask_mod() -> Callable:
    """``mask_mod`` for one sequence: ``aux_tensors = [table [H, 4] int32]``.

    Key ``n`` is allowed for row ``m`` of head ``h`` iff ``m - n`` lies in
    ``[table[h, 0], table[h, 1])`` or ``[table[h, 2], table[h, 3])`` (the table already
    holds the query offset).
    """
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    _quiet_aux_warning()

    @cute.jit
    def band_interval_mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        table = aux_tensors[0]  # [H, 4] int32: lo0, hi0, lo1, hi1
        h = head[0]
        lo0 = utils.scalar_to_ssa(table[h, 0], cutlass.Int32)
        hi0 = utils.scalar_to_ssa(table[h, 1], cutlass.Int32)
        lo1 = utils.scalar_to_ssa(table[h, 2], cutlass.Int32)
        hi1 = utils.scalar_to_ssa(table[h, 3], cutlass.Int32)
        return in_band(m_idx - n_idx, lo0, hi0, lo1, hi1)

    return band_interval_mask


@functools.cache
def document_band_mask_mod() -> Callable:
    """``mask_mod`` for packed documents: ``aux_tensors = [table [n_docs + 1, 4 H], doc_of [T_pad]]``.

    Row ``m`` and key ``n`` must share a document ``d = doc_of[m]``, and ``m - n`` must lie
    in one of that document's intervals for head ``h``: ``table[d, 4 h .. 4 h + 3]``.
    """
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    _quiet_aux_warning()

    @cute.jit
    def band_document_mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        table = aux_tensors[0]  # [n_docs + 1, 4 H] int32
        doc_of = aux_tensors[1]  # [T_pad] int32
        col = head[0] * 4
        doc_q = doc_of[m_idx[0]]
        doc_k = doc_of[n_idx[0]]
        lo0 = utils.scalar_to_ssa(table[doc_q, col], cutlass.Int32)
        hi0 = utils.scalar_to_ssa(table[doc_q, col + 1], cutlass.Int32)
        lo1 = utils.scalar_to_ssa(table[doc_q, col + 2], cutlass.Int32)
        hi1 = utils.scalar_to_ssa(table[doc_q, col + 3], cutlass.Int32)
        same_doc = utils.scalar_to_ssa(doc_q, cutlass.Int32) == utils.scalar_to_ssa(doc_k, cutlass.Int32)
        return same_doc & in_band(m_idx - n_idx, lo0, hi0, lo1, hi1)

    return band_document_mask
