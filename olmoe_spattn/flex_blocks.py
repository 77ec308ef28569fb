"""Block-sparse layout of a band pattern, computed from its distance intervals.

``torch``'s ``create_block_mask`` evaluates the ``mask_mod`` on every (head, query, key)
cell, which materialises an ``[H, T, T]`` tensor (64 GiB at ``T = 65536``, 16 heads). A
band's allowed set depends only on the distance ``d = i - j``, so each (query block,
key block) tile can be classified from the range of distances it spans:

* the distances of a tile with rows ``i0..i1`` and keys ``j0..j1`` are exactly the
  integers ``i0 - j1 .. i1 - j0``;
* the tile is **empty** when that range meets none of the head's intervals,
  **full** when one interval contains the whole range (and the tile has no padding),
  and **partial** otherwise (FlexAttention then applies the exact ``mask_mod``).

With packed documents a tile inside one document is classified the same way with that
document's intervals; a tile that straddles a document boundary is marked partial
whenever the documents it touches overlap causally (conservative, still exact because
partial tiles are masked element by element). Memory is ``O(H * (T / block)^2)``.
"""

from __future__ import annotations

import torch

from .bands import BandSpec


def device_key(device: torch.device | str) -> str:
    """A hashable cache key of ``device`` ("cpu", "cuda", "cuda:1")."""
    dev = torch.device(device)
    return f"{dev.type}:{dev.index}" if dev.index is not None else dev.type


def document_bounds(cu_seqlens: tuple[int, ...] | None, total: int) -> list[int]:
    """Boundaries ``[0, ..., total]`` of the packed documents (one document without ``cu_seqlens``)."""
    return [0, total] if cu_seqlens is None else list(cu_seqlens)


def document_interval_tables(
    spec: BandSpec, bounds: list[int], *, head_offset: int, n_local_heads: int
) -> torch.Tensor:
    """Per-document interval tables, int32 ``[n_docs, H_local, MAX_INTERVALS, 2]``.

    A dynamic partition length resolves to each document's length; a fixed one gives the
    same table for every document. An empty document gets empty intervals (it has no keys).
    """
    tables = []
    for a, b in zip(bounds, bounds[1:]):
        if spec.is_dynamic and b == a:  # no length to resolve the partition from, nothing to attend
            tables.append(torch.zeros_like(spec.interval_tensor(1, head_offset=head_offset, n_local_heads=n_local_heads)))
        else:
            tables.append(spec.interval_tensor(
                b - a if spec.is_dynamic else None, head_offset=head_offset, n_local_heads=n_local_heads
            ))
    return torch.stack(tables)


def _block_bounds(
    length: int, block: int, shift: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first index, last index, has padding) per block of ``length`` positions, shifted."""
    n_blocks = -(-length // block)
    first = torch.arange(n_blocks, dtype=torch.int64, device=device) * block  # [n_blocks]
    last = torch.clamp(first + block - 1, max=length - 1)  # [n_blocks]
    padded = (first + block) > length  # [n_blocks]
    return first + shift, last + shift, padded


def band_block_classes(
    spec: BandSpec,
    q_len: int,
    kv_len: int,
    *,
    q_offset: int,
    head_offset: int,
    n_local_heads: int,
    cu_seqlens: tuple[int, ...] | None,
    q_block: int,
    kv_block: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) tile classes, each bool ``[H_local, n_q_blocks, n_kv_blocks]``.

    ``partial`` and ``full`` are disjoint; a tile in neither holds no allowed pair. The
    classification runs on ``device`` (default CPU); only ``O(H * n_q_blocks * n_kv_blocks)``
    values are ever built.
    """
    i0, i1, q_pad = _block_bounds(q_len, q_block, q_offset, device)  # [nQ] absolute key positions
    j0, j1, k_pad = _block_bounds(kv_len, kv_block, 0, device)  # [nK]
    d_min = (i0[:, None] - j1[None, :])[None, :, :, None]  # [1, nQ, nK, 1]
    d_max = (i1[:, None] - j0[None, :])[None, :, :, None]  # [1, nQ, nK, 1]

    bounds = document_bounds(cu_seqlens, kv_len)
    tables = document_interval_tables(spec, bounds, head_offset=head_offset, n_local_heads=n_local_heads)
    tables = tables.to(device=device, dtype=torch.int64)  # [n_docs, H, S, 2]
    starts = torch.tensor(bounds[1:], dtype=torch.int64, device=device)
    doc_q0 = torch.bucketize(i0, starts, right=True)  # [nQ] document of the first row
    doc_q1 = torch.bucketize(i1, starts, right=True)
    doc_k0 = torch.bucketize(j0, starts, right=True)  # [nK]
    doc_k1 = torch.bucketize(j1, starts, right=True)

    table = tables[doc_q0].permute(1, 0, 2, 3)  # [H, nQ, S, 2]: intervals of each row block's doc
    lo = table[..., 0][:, :, None, :]  # [H, nQ, 1, S]
    hi = table[..., 1][:, :, None, :]
    used = lo < hi
    meets = (used & (lo <= d_max) & (hi > d_min)).any(-1)  # [H, nQ, nK]
    inside = (used & (lo <= d_min) & (d_max < hi)).any(-1)  # [H, nQ, nK]

    one_doc = (doc_q0 == doc_q1)[:, None] & (doc_k0 == doc_k1)[None, :] & (doc_q0[:, None] == doc_k0[None, :])
    overlap = (doc_q0[:, None] <= doc_k1[None, :]) & (doc_k0[None, :] <= doc_q1[:, None])  # [nQ, nK]
    causal = d_max[0, :, :, 0] >= 0  # [nQ, nK]
    straddle = ~one_doc & overlap & causal
    unpadded = ~q_pad[:, None] & ~k_pad[None, :]

    full = inside & (one_doc & unpadded)[None]
    partial = ((meets & one_doc[None]) | straddle[None]) & ~full
    return partial, full


def sparse_block_indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) of chosen tiles per row, the layout FlexAttention and FA4 share.

    ``blocks`` is bool ``[..., n_rows, n_cols]``; ``count [..., n_rows]`` (int32) says how
    many columns a row visits and ``indices [..., n_rows, n_cols]`` (int32) lists them
    first, ascending (the remaining slots hold the unchosen columns).
    """
    count = blocks.sum(-1, dtype=torch.int32)  # [H, nQ]
    n_cols = blocks.shape[-1]
    columns = torch.arange(n_cols, dtype=torch.int64, device=blocks.device)
    order_key = torch.where(blocks, columns, columns + n_cols)  # chosen columns sort first
    indices = order_key.argsort(dim=-1).to(torch.int32)  # [H, nQ, nK]
    return count, indices


def band_block_mask_from_intervals(
    spec: BandSpec,
    q_len: int,
    kv_len: int,
    *,
    q_offset: int,
    head_offset: int,
    n_local_heads: int,
    cu_seqlens: tuple[int, ...] | None,
    mask_mod,
    device: torch.device | str,
    block_size: int | tuple[int, int] = 128,
):
    """A FlexAttention ``BlockMask`` for ``spec`` without ever building a ``T x T`` mask."""
    from torch.nn.attention.flex_attention import BlockMask

    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    partial, full = band_block_classes(
        spec, q_len, kv_len, q_offset=q_offset, head_offset=head_offset,
        n_local_heads=n_local_heads, cu_seqlens=cu_seqlens, q_block=q_block, kv_block=kv_block,
    )
    kv_num, kv_idx = sparse_block_indices(partial)
    full_num, full_idx = sparse_block_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num[None].to(device),  # [1, H, nQ]
        kv_idx[None].to(device),  # [1, H, nQ, nK]
        full_num[None].to(device),
        full_idx[None].to(device),
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )
