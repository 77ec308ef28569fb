"""What FlashAttention-4 needs to run a band: block-sparse tables and the mask's data.

FA4 takes an arbitrary mask as a ``mask_mod`` evaluated only on *partial* tiles, plus
block-sparse tensors saying, per query tile (forward) or per key tile (backward), which
tiles to visit and which of them are *full* (no element mask needed). Both come from the
band's distance intervals, never from an ``[H, T, T]`` mask:

- tiles are classified by :func:`olmoe_spattn.flex_blocks.band_block_classes` (the same
  classifier FlexAttention uses), on the inputs' device;
- the mask data is one int32 table of interval bounds (and, for packed documents, the
  document of every position); :func:`allowed_from_aux` evaluates it exactly as the
  CuTe ``mask_mod`` does, so CPU tests can check it against ``BandSpec.mask``.

Nothing in this module imports ``flash_attn``: it is pure torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..bands import MAX_INTERVALS, BandSpec
from ..flex_blocks import band_block_classes, device_key, document_interval_tables, sparse_block_indices

#: slots per head in the interval table: lo0, hi0, lo1, hi1 (half-open distance ranges)
SLOTS = 2 * MAX_INTERVALS
#: position tables are padded to a multiple of this, so a tile's reads stay in bounds
POSITION_PAD = 256
_CACHE_SIZE = 64


def block_size_for(arch: int, head_dim: int) -> tuple[int, int]:
    """(query tile, key tile) of the sparse tables FA4 accepts on ``arch`` (e.g. 90, 100).

    On Hopper (SM90) the key tile must equal the kernels' own ``tile_n`` in both passes:
    128 up to ``head_dim`` 128, 96 up to 192, 64 above. On Blackwell (SM100/SM110) the
    forward processes two 128-row query tiles per step, so query tiles are 256 rows.
    """
    if arch // 10 == 9:
        return 128, (128 if head_dim <= 128 else 96 if head_dim <= 192 else 64)
    return 256, 128


def dedupe_bounds(cu_seqlens: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Document boundaries without empty documents (they hold no position)."""
    if cu_seqlens is None:
        return None
    out = [cu_seqlens[0]]
    for x in cu_seqlens[1:]:
        if x != out[-1]:
            out.append(x)
    return tuple(out) if len(out) > 1 else (cu_seqlens[0], cu_seqlens[-1])


@dataclass(frozen=True)
class BlockTables:
    """Block-sparse tables of one geometry, int32, batch dim 1 (FA4 broadcasts it).

    Forward (per query tile): ``fwd_mask_cnt [1, H, nQ]``, ``fwd_mask_idx [1, H, nQ, cK]``
    list the partial key tiles, ``fwd_full_*`` the full ones. Backward (per key tile):
    ``bwd_*_cnt [1, H, nK]``, ``bwd_*_idx [1, H, nK, cQ]``. Index tensors are compacted to
    the longest row (FA4 reads only the first ``cnt`` entries of a row).
    """

    block_size: tuple[int, int]
    fwd_mask_cnt: torch.Tensor
    fwd_mask_idx: torch.Tensor
    fwd_full_cnt: torch.Tensor
    fwd_full_idx: torch.Tensor
    bwd_mask_cnt: torch.Tensor
    bwd_mask_idx: torch.Tensor
    bwd_full_cnt: torch.Tensor
    bwd_full_idx: torch.Tensor


def canonical(x: torch.Tensor) -> torch.Tensor:
    """``x`` with row-major strides in every dimension, size-1 ones included.

    ``Tensor.contiguous()`` keeps any stride on a size-1 dimension, and FA4's CuTe layer reads
    the stride of the innermost dimension (``[..., 1]`` tensors, e.g. a one-query-tile table
    taken from a transposed map, can carry stride 33 there), so FA4 gets fresh copies then."""
    expected, step = [], 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= size
    if tuple(x.stride()) == tuple(reversed(expected)):
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def _compact(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count [1, H, R], indices [1, H, R, C]) of a bool tile map ``[H, R, n_cols]``."""
    count, idx = sparse_block_indices(blocks)
    width = max(int(count.max().item()) if count.numel() else 0, 1)
    return canonical(count[None]), canonical(idx[..., :width][None])


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_tables(
    spec: BandSpec,
    q_len: int,
    kv_len: int,
    q_offset: int,
    head_offset: int,
    n_local_heads: int,
    cu_seqlens: tuple[int, ...] | None,
    block_size: tuple[int, int],
    device: str,
) -> BlockTables:
    partial, full = band_block_classes(
        spec, q_len, kv_len, q_offset=q_offset, head_offset=head_offset, n_local_heads=n_local_heads,
        cu_seqlens=cu_seqlens, q_block=block_size[0], kv_block=block_size[1], device=device,
    )  # each bool [H, nQ, nK]
    fwd_mask = _compact(partial)
    fwd_full = _compact(full)
    bwd_mask = _compact(partial.transpose(1, 2))  # [H, nK, nQ]
    bwd_full = _compact(full.transpose(1, 2))
    return BlockTables(block_size, *fwd_mask, *fwd_full, *bwd_mask, *bwd_full)


def band_block_tables(
    spec: BandSpec,
    q_len: int,
    kv_len: int,
    *,
    q_offset: int,
    head_offset: int,
    n_local_heads: int,
    cu_seqlens: tuple[int, ...] | None,
    block_size: tuple[int, int],
    device: torch.device | str,
) -> BlockTables:
    """The (cached) FA4 block-sparse tables of ``spec`` for one geometry, built on ``device``."""
    return _cached_tables(
        spec, q_len, kv_len, q_offset, head_offset, n_local_heads, dedupe_bounds(cu_seqlens),
        tuple(block_size), device_key(device),
    )


# ---------------------------------------------------------------- mask data
@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_aux(
    spec: BandSpec,
    kv_len: int,
    q_offset: int,
    head_offset: int,
    n_local_heads: int,
    cu_seqlens: tuple[int, ...] | None,
    device: str,
) -> tuple[torch.Tensor, ...]:
    if cu_seqlens is None:
        table = document_interval_tables(spec, [0, kv_len], head_offset=head_offset, n_local_heads=n_local_heads)
        table = table[0].reshape(n_local_heads, SLOTS).to(torch.int64)  # [H, 4]
        table = table - q_offset  # distances measured from the query's row index, not its position
        return (table.to(torch.int32).contiguous().to(device),)
    bounds = list(cu_seqlens)
    n_docs = len(bounds) - 1
    tables = document_interval_tables(spec, bounds, head_offset=head_offset, n_local_heads=n_local_heads)
    table = torch.zeros(n_docs + 1, n_local_heads * SLOTS, dtype=torch.int32)  # last row: padding, empty
    table[:n_docs] = tables.reshape(n_docs, n_local_heads * SLOTS)
    padded_len = -(-kv_len // POSITION_PAD) * POSITION_PAD
    doc_of = torch.full((padded_len,), n_docs, dtype=torch.int32)  # [T padded]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        doc_of[a:b] = i
    return table.contiguous().to(device), doc_of.to(device)


def band_aux_tensors(
    spec: BandSpec,
    kv_len: int,
    *,
    q_offset: int,
    head_offset: int,
    n_local_heads: int,
    cu_seqlens: tuple[int, ...] | None,
    device: torch.device | str,
) -> tuple[torch.Tensor, ...]:
    """The (cached) int32 data the band ``mask_mod`` reads.

    Without documents: ``(table [H, 4],)``, head ``h``'s intervals shifted by ``-q_offset``
    so that the kernel's row index ``m`` and key index ``n`` give ``m - n`` directly.
    With documents (``q_offset == 0``): ``(table [n_docs + 1, 4 H], doc_of [T_pad])``, row
    ``d`` holding document ``d``'s intervals (a dynamic partition resolves per document)
    and ``doc_of`` every position's document; padding positions belong to the extra,
    empty last row.
    """
    return _cached_aux(spec, kv_len, q_offset, head_offset, n_local_heads, dedupe_bounds(cu_seqlens), device_key(device))


def in_band(dist, lo0, hi0, lo1, hi1):
    """``dist`` in ``[lo0, hi0)`` or ``[lo1, hi1)``: the test the CuTe ``mask_mod`` applies."""
    return ((dist >= lo0) & (dist < hi0)) | ((dist >= lo1) & (dist < hi1))


def allowed_from_aux(aux: tuple[torch.Tensor, ...], n_heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Evaluates the band ``mask_mod`` on every (head, row, key): bool ``[H, Tq, Tk]``.

    Mirrors the CuTe code cell by cell (same table reads, same :func:`in_band`); for tests.
    """
    m = torch.arange(q_len)[None, :, None]  # [1, Tq, 1]
    n = torch.arange(kv_len)[None, None, :]  # [1, 1, Tk]
    h = torch.arange(n_heads)[:, None, None]  # [H, 1, 1]
    table = aux[0].cpu().to(torch.int64)
    dist = m - n
    if len(aux) == 1:
        lo0, hi0, lo1, hi1 = (table[h, s] for s in range(SLOTS))
        return in_band(dist, lo0, hi0, lo1, hi1)
    doc_of = aux[1].cpu().to(torch.int64)
    doc_q, doc_k = doc_of[m], doc_of[n]
    lo0, hi0, lo1, hi1 = (table[doc_q, h * SLOTS + s] for s in range(SLOTS))
    return in_band(dist, lo0, hi0, lo1, hi1) & (doc_q == doc_k)
