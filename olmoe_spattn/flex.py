"""FlexAttention backend: band patterns (and the paper's Table 2 baselines) as mask_mods.

A band ``mask_mod`` reads a per-document, per-head table of allowed distance intervals
(the same table the Triton kernel consumes), so every pattern, fixed or dynamic
partition length, head offsets, query offsets and packed documents share one
definition. Block masks are built once per shape and cached. On CUDA the attention
call is compiled (with a raised recompile limit, and an error instead of a silent
eager fallback); on CPU it runs eagerly, forward only (torch has no CPU backward for
FlexAttention).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch

from .bands import MAX_INTERVALS, PATTERNS, BandSpec
from .flex_blocks import band_block_mask_from_intervals, device_key, document_bounds, document_interval_tables
from .validation import check_qkv

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_BLOCK_MASK_CACHE_SIZE = 64
_RECOMPILE_LIMIT = 64
_FLEX_MIN_HEAD_DIM = 16  # FlexAttention's CUDA kernels reject smaller heads


def band_mask_mod(
    spec: BandSpec,
    *,
    kv_len: int,
    q_offset: int = 0,
    head_offset: int = 0,
    n_local_heads: int | None = None,
    cu_seqlens: tuple[int, ...] | None = None,
    device: torch.device | str = "cpu",
) -> MaskMod:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for ``spec``.

    ``q_idx`` is shifted by ``q_offset`` inside the key sequence. With ``cu_seqlens``
    (packed batch of one) pairs must share a document and distances are measured
    inside it; a dynamic partition length then resolves per document.
    """
    n_local = spec.n_heads - head_offset if n_local_heads is None else n_local_heads
    bounds = document_bounds(cu_seqlens, kv_len)
    table = document_interval_tables(spec, bounds, head_offset=head_offset, n_local_heads=n_local)
    table = table.to(device)  # [n_docs, H_local, MAX_INTERVALS, 2]
    doc_of = torch.zeros(kv_len, dtype=torch.int64)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        doc_of[a:b] = i
    doc_of = doc_of.to(device)  # [Tk]

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + q_offset
        dist = q_pos - kv_idx
        doc = doc_of[q_pos]
        allowed = dist < 0  # all False, in the broadcast shape
        for slot in range(MAX_INTERVALS):
            allowed = allowed | ((dist >= table[doc, h, slot, 0]) & (dist < table[doc, h, slot, 1]))
        return allowed & (dist >= 0) & (doc == doc_of[kv_idx])

    return mask_mod


# ---------------------------------------------------------------- Table 2 baselines
BASELINES: tuple[str, ...] = ("longformer", "bigbird", "reformer")
_BIGBIRD_BLOCK = 64
_REFORMER_BUCKET = 64
_REFORMER_PRIME = 1_000_003


def _check_baseline(name: str, seq_len: int) -> None:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; allowed: {', '.join(BASELINES)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")


# The geometry of each baseline, shared by its mask_mod and by baseline_covered_pairs.
def _longformer_sizes(seq_len: int) -> tuple[int, int]:
    """(local window, number of global keys) of ``longformer`` at context ``seq_len``."""
    return min(256, seq_len // 4), min(16, seq_len // 32)


def _bigbird_sizes(seq_len: int) -> tuple[int, int]:
    """(local window, number of global keys) of ``bigbird`` at context ``seq_len``."""
    return min(128, seq_len // 8), max(1, min(8, seq_len // 128))


def _bigbird_link(q_block, kv_block, h):
    """``bigbird``'s strided random-like links: query block ``q_block`` sees key block ``kv_block``."""
    return (31 * q_block + 17 * kv_block + 13 * h) % 7 == 0


def _reformer_n_buckets(seq_len: int) -> int:
    return max(2, seq_len // _REFORMER_BUCKET)


def _reformer_bucket(pos, h, n_buckets: int):
    """``reformer``'s bucket of position ``pos`` in head ``h`` (a multiplicative hash per head)."""
    mult = 2654435761 % _REFORMER_PRIME + 2 * h
    return ((pos * mult) % _REFORMER_PRIME) % n_buckets


def baseline_mask_mod(name: str, seq_len: int) -> MaskMod:
    """Causal ``mask_mod`` of a Table 2 baseline for context length ``seq_len`` (``N``).

    - ``longformer``: local window ``min(256, N // 4)`` plus the first ``min(16, N // 32)``
      tokens as global keys.
    - ``bigbird``: local window ``min(128, N // 8)``, the first ``min(8, N // 128)`` (at
      least 1) tokens global, and strided random-like links: query block ``qb`` sees key
      block ``kb`` when ``(31 * qb + 17 * kb + 13 * h) % 7 == 0`` (blocks of 64 tokens).
    - ``reformer``: hashed buckets: each position falls in one of ``max(2, N // 64)``
      buckets by a multiplicative hash that differs per head; a query sees the keys of
      its own bucket, and itself.
    These are fixed, content-independent re-creations of the baselines' sparsity for
    the throughput and quality comparisons; they are never the training path.
    """
    _check_baseline(name, seq_len)
    if name == "longformer":
        window, n_global = _longformer_sizes(seq_len)

        def longformer(b, h, q_idx, kv_idx):
            dist = q_idx - kv_idx
            return (dist >= 0) & ((dist < window) | (kv_idx < n_global))

        return longformer
    if name == "bigbird":
        window, n_global = _bigbird_sizes(seq_len)

        def bigbird(b, h, q_idx, kv_idx):
            dist = q_idx - kv_idx
            random_link = _bigbird_link(q_idx // _BIGBIRD_BLOCK, kv_idx // _BIGBIRD_BLOCK, h)
            return (dist >= 0) & ((dist < window) | (kv_idx < n_global) | random_link)

        return bigbird
    n_buckets = _reformer_n_buckets(seq_len)

    def reformer(b, h, q_idx, kv_idx):
        dist = q_idx - kv_idx
        same = _reformer_bucket(q_idx, h, n_buckets) == _reformer_bucket(kv_idx, h, n_buckets)
        return (dist >= 0) & (same | (dist == 0))

    return reformer


def _window_global_pairs(seq_len: int, window: int, n_global: int) -> int:
    """Causal pairs with ``dist < window`` or ``key < n_global`` (the same for every head)."""
    i = torch.arange(seq_len, dtype=torch.int64)  # query positions
    local = torch.clamp(i + 1, max=window)  # keys i - window + 1 .. i
    # global keys outside the window: j < n_global and j <= i - window
    far_global = torch.clamp(torch.clamp(i - window + 1, max=n_global), min=0)
    return int((local + far_global).sum())


def _bigbird_link_pairs(seq_len: int, n_heads: int, window: int, n_global: int) -> torch.Tensor:
    """Per head, the causal pairs that only ``bigbird``'s random links allow (beyond the
    window and the global keys): int64 ``[n_heads]``."""
    n_blocks = -(-seq_len // _BIGBIRD_BLOCK)
    i = torch.arange(seq_len, dtype=torch.int64)[:, None]  # [N, 1] query positions
    kb = torch.arange(n_blocks, dtype=torch.int64)[None, :]  # [1, nb] key blocks
    k_lo = torch.clamp(kb * _BIGBIRD_BLOCK, min=n_global)  # first key that is not global
    k_hi = torch.clamp(i - window + 1, max=torch.clamp((kb + 1) * _BIGBIRD_BLOCK, max=seq_len))
    per_query = torch.clamp(k_hi - k_lo, min=0)  # [N, nb]: keys of block kb beyond the window
    per_block = torch.zeros(n_blocks, n_blocks, dtype=torch.int64)
    per_block.index_add_(0, i[:, 0] // _BIGBIRD_BLOCK, per_query)  # [nb, nb] summed per query block
    h = torch.arange(n_heads, dtype=torch.int64)[:, None, None]
    qb = torch.arange(n_blocks, dtype=torch.int64)[None, :, None]
    linked = _bigbird_link(qb, kb[None], h)  # [H, nb, nb]
    return (linked * per_block).sum(dim=(1, 2))


def baseline_covered_pairs(name: str, n_heads: int, seq_len: int) -> list[int]:
    """Number of (query, key) pairs each head of a Table 2 baseline allows over ``seq_len``
    tokens (the same pairs as :func:`baseline_mask_mod`, counted in ``O(N^2 / 64)`` time
    instead of evaluating all ``N^2`` cells; tests check the counts against the mask)."""
    _check_baseline(name, seq_len)
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads <= 0:
        raise ValueError(f"n_heads must be a positive integer, got {n_heads!r}")
    if name == "longformer":
        return [_window_global_pairs(seq_len, *_longformer_sizes(seq_len))] * n_heads
    if name == "bigbird":
        window, n_global = _bigbird_sizes(seq_len)
        local = _window_global_pairs(seq_len, window, n_global)
        return [local + int(x) for x in _bigbird_link_pairs(seq_len, n_heads, window, n_global)]
    n_buckets = _reformer_n_buckets(seq_len)
    pos = torch.arange(seq_len, dtype=torch.int64)
    counts = []
    for h in range(n_heads):
        size = torch.bincount(_reformer_bucket(pos, h, n_buckets), minlength=n_buckets)  # [n_buckets]
        counts.append(int((size * (size + 1) // 2).sum()))  # causal pairs inside each bucket, self included
    return counts


def causal_pair_fraction(method: str, n_heads: int, seq_len: int) -> float:
    """Fraction of the ``N (N + 1) / 2`` causal (query, key) pairs that ``method`` allows,
    averaged over ``n_heads`` heads: a measure of the attention work it does.

    ``method`` is a band pattern (:data:`~olmoe_spattn.bands.PATTERNS`, ``"dense"``
    included; partition length ``seq_len``, as the benchmarks run it) or a Table 2
    baseline (:data:`BASELINES`).
    """
    if method in BASELINES:
        pairs = baseline_covered_pairs(method, n_heads, seq_len)
    elif method in PATTERNS:
        pairs = BandSpec(method, n_heads, seq_len).covered_pairs(seq_len)
    else:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(PATTERNS + BASELINES)}")
    return sum(pairs) / (n_heads * seq_len * (seq_len + 1) / 2)


def dense_mask_from_mod(mask_mod: MaskMod, n_heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    """Evaluates a ``mask_mod`` on every (head, query, key): bool ``[H, Tq, Tk]`` (for tests)."""
    h = torch.arange(n_heads)[:, None, None]
    q = torch.arange(q_len)[None, :, None]
    k = torch.arange(kv_len)[None, None, :]
    return torch.broadcast_to(mask_mod(torch.zeros((), dtype=torch.int64), h, q, k), (n_heads, q_len, kv_len))


# ---------------------------------------------------------------- block masks and calls
@functools.lru_cache(maxsize=_BLOCK_MASK_CACHE_SIZE)
def _cached_block_mask(
    spec: BandSpec,
    q_len: int,
    kv_len: int,
    q_offset: int,
    head_offset: int,
    n_local_heads: int,
    cu_seqlens: tuple[int, ...] | None,
    device: str,
    block_size: int | tuple[int, int],
):
    mod = band_mask_mod(
        spec,
        kv_len=kv_len,
        q_offset=q_offset,
        head_offset=head_offset,
        n_local_heads=n_local_heads,
        cu_seqlens=cu_seqlens,
        device=device,
    )
    return band_block_mask_from_intervals(
        spec, q_len, kv_len, q_offset=q_offset, head_offset=head_offset, n_local_heads=n_local_heads,
        cu_seqlens=cu_seqlens, mask_mod=mod, device=device, block_size=block_size,
    )


def band_block_mask(
    spec: BandSpec,
    q_len: int,
    kv_len: int,
    *,
    q_offset: int | None = None,
    head_offset: int = 0,
    n_local_heads: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    block_size: int | tuple[int, int] = 128,
):
    """The (cached) FlexAttention ``BlockMask`` of ``spec`` for one shape.

    Built from the band's distance intervals (``flex_blocks``): no ``T x T`` tensor, so
    it scales to long sequences. Cached by value on every argument, so repeated calls
    with the same shape (every training step) reuse one mask. ``q_offset`` defaults to
    ``kv_len - q_len``.
    """
    offset = kv_len - q_len if q_offset is None else q_offset
    n_local = spec.n_heads - head_offset if n_local_heads is None else n_local_heads
    cu = None if cu_seqlens is None else tuple(int(x) for x in cu_seqlens.tolist())
    return _cached_block_mask(spec, q_len, kv_len, offset, head_offset, n_local, cu, device_key(device), block_size)


@functools.cache
def _compiled_flex_attention():
    """``torch.compile``d flex_attention; recompiles are allowed up to a raised limit and
    hitting the limit raises instead of silently falling back to slow eager code."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), _RECOMPILE_LIMIT))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=_BLOCK_MASK_CACHE_SIZE)
def _attended_keys_cached(
    spec: BandSpec, q_len: int, kv_len: int, q_offset: int, head_offset: int, n_local: int,
    cu: tuple[int, ...] | None, device: str,
) -> torch.Tensor:
    bounds = document_bounds(cu, kv_len)
    table = document_interval_tables(spec, bounds, head_offset=head_offset, n_local_heads=n_local).long()
    used = torch.zeros(n_local, kv_len, dtype=torch.bool)
    for d, (a, b) in enumerate(zip(bounds, bounds[1:])):
        q_first, q_last = max(a, q_offset), min(b, q_offset + q_len) - 1  # query positions in the doc
        if q_last < q_first:
            continue
        j = torch.arange(a, b, dtype=torch.int64)[None, None, :]  # [1, 1, n]
        lo, hi = table[d, :, :, 0, None], table[d, :, :, 1, None]  # [H, MAX_INTERVALS, 1]
        # some query i in [q_first, q_last] has distance i - j in [lo, hi)
        hit = (lo < hi) & (torch.maximum(j + lo, torch.tensor(q_first)) <= torch.minimum(j + hi - 1, torch.tensor(q_last)))
        used[:, a:b] = hit.any(dim=1)
    return used.to(device)


@functools.lru_cache(maxsize=_BLOCK_MASK_CACHE_SIZE)
def unattended_kv_table(
    spec: BandSpec, q_len: int, kv_len: int, q_offset: int, head_offset: int, n_local: int, n_kv: int,
    cu: tuple[int, ...] | None, device: str,
) -> torch.Tensor | None:
    """``[1, Tk, Hkv, 1]`` bool on ``device``: key ``j`` is attended by no query of any head in
    kv head ``g``'s group; ``None`` when every key is attended. Cached per geometry
    (``cu``: document offsets as a tuple, or ``None``)."""
    used = _attended_keys_cached(spec, q_len, kv_len, q_offset, head_offset, n_local, cu, "cpu")  # [H, Tk]
    used_kv = used.view(n_kv, -1, kv_len).any(dim=1)  # [Hkv, Tk]: any head of the kv head's group
    if bool(used_kv.all()):
        return None
    return (~used_kv.t())[None, :, :, None].to(device)  # [1, Tk, Hkv, 1]


@functools.lru_cache(maxsize=_BLOCK_MASK_CACHE_SIZE)
def unattended_kv_rows(
    spec: BandSpec, q_len: int, kv_len: int, q_offset: int, head_offset: int, n_local: int, n_kv: int,
    cu: tuple[int, ...] | None, device: str,
) -> torch.Tensor | None:
    """int64 ``[R]``: the rows ``t * Hkv + g`` of K or V viewed as ``[B, Tk * Hkv, D]`` that
    :func:`unattended_kv_table` marks; ``None`` when every key is attended. Cached per geometry."""
    table = unattended_kv_table(spec, q_len, kv_len, q_offset, head_offset, n_local, n_kv, cu, "cpu")
    if table is None:
        return None
    return table.reshape(-1).nonzero().squeeze(1).to(device)


def zero_kv_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """A copy of ``x [B, Tk, Hkv, D]`` with the rows of :func:`unattended_kv_rows` set to 0
    (``x`` itself when ``rows`` is ``None``). A plain copy plus a row fill: a ``masked_fill``
    with a mask broadcast along ``D`` measured 1.7x slower on an H200 (``olmoe_spattn/kernels/NOTES.md``)."""
    if rows is None:
        return x
    out = x.contiguous().clone()  # [B, Tk, Hkv, D]
    out.view(x.shape[0], -1, x.shape[-1]).index_fill_(1, rows, 0)
    return out


def zero_unattended_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    spec: BandSpec,
    q_len: int,
    *,
    q_offset: int | None = None,
    head_offset: int = 0,
    n_local_heads: int,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)`` with the keys and values that no query of a kv head's group attends set to 0.

    Block-sparse kernels (FlexAttention, FlashAttention-4) load whole key blocks and multiply
    the zero weights of masked keys by V, so a NaN or Inf at a key nobody attends would reach
    rows that never attend it. Returns the inputs themselves when every key is attended
    (no copy); the per-geometry table is computed once on the CPU and cached.
    """
    kv_len = k.shape[1]
    offset = kv_len - q_len if q_offset is None else q_offset
    cu = None if cu_seqlens is None else tuple(int(x) for x in cu_seqlens.tolist())
    rows = unattended_kv_rows(
        spec, q_len, kv_len, offset, head_offset, n_local_heads, k.shape[2], cu, device_key(k.device)
    )
    return zero_kv_rows(k, rows), zero_kv_rows(v, rows)


def run_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, *, scale: float | None
) -> torch.Tensor:
    """FlexAttention on ``[B, T, H, D]`` tensors (GQA allowed): eager on CPU, compiled on CUDA.

    FlexAttention's CUDA kernels need ``D >= 16``: smaller heads are zero-padded to 16
    (scores and the first ``D`` output channels are unchanged) and sliced back.
    """
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.shape[2] != k.shape[2]
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if q.device.type == "cuda" and head_dim < _FLEX_MIN_HEAD_DIM:
        pad = (0, _FLEX_MIN_HEAD_DIM - head_dim)
        q, k, v = (torch.nn.functional.pad(x, pad) for x in (q, k, v))  # [B, T, H, 16]
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, T, D]
    if q.device.type == "cuda":
        out = _compiled_flex_attention()(*args, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    else:  # eager is the only CPU path; silence torch's "not compiled" advice
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(*args, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)[..., :head_dim]  # [B, Tq, H, D]


def flex_band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: BandSpec,
    *,
    head_offset: int = 0,
    q_offset: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The ``"flex"`` backend: same arguments and result as ``band_attention``.

    Keys and values at positions that no query of a kv head's group attends are zeroed
    first (:func:`zero_unattended_kv`): inside a partially masked block FlexAttention multiplies
    zero weights by V, so a NaN or Inf there would otherwise reach rows that never attend it.
    Raises ``ValueError`` for a CPU backward (not supported by torch's FlexAttention).
    """
    check_qkv(q, k, v, spec, head_offset=head_offset, cu_seqlens=cu_seqlens, q_offset=q_offset)
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError(
            "backend='flex' has no backward on CPU (torch's FlexAttention); use backend='torch' "
            "for training on CPU, or run under torch.no_grad()"
        )
    block_mask = band_block_mask(
        spec, q.shape[1], k.shape[1], q_offset=q_offset, head_offset=head_offset,
        n_local_heads=q.shape[2], cu_seqlens=cu_seqlens, device=q.device,
    )
    k, v = zero_unattended_kv(
        k, v, spec, q.shape[1], q_offset=q_offset, head_offset=head_offset, n_local_heads=q.shape[2],
        cu_seqlens=cu_seqlens,
    )
    return run_flex(q, k, v, block_mask, scale=scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))


def flex_baseline_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str, *, scale: float | None = None
) -> torch.Tensor:
    """Self-attention ``[B, T, H, D]`` under a Table 2 baseline mask (Longformer, BigBird, Reformer)."""
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"baselines are self-attention: q has {q.shape[1]} tokens, k has {k.shape[1]}")
    block_mask = _baseline_block_mask(name, q.shape[1], q.shape[2], str(q.device))
    return run_flex(q, k, v, block_mask, scale=scale)


@functools.lru_cache(maxsize=16)
def _baseline_block_mask(name: str, seq_len: int, n_heads: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(baseline_mask_mod(name, seq_len), None, n_heads, seq_len, seq_len, device=device)
