"""Band semantics of SPAttention: which (query, key) pairs each head may attend to.

Everything in this module is plain integer arithmetic on distances ``d = i - j``
(query position ``i``, key position ``j``). Implementations (masked SDPA,
FlexAttention, the Triton kernel) consume the per-head distance intervals
returned by :meth:`BandSpec.intervals`; the boolean mask from
:meth:`BandSpec.mask` is the oracle they are all tested against.

For head ``h`` of ``H`` heads and partition length ``N``::

    Wb = N // H          R = N % H
    W_h = Wb + (1 if h < R else 0)
    S_h = h * Wb + min(h, R)

| pattern           | head h attends to key j iff d >= 0 and ...   |
|-------------------|----------------------------------------------|
| exclusive_bands   | S_h <= d < S_h + W_h                         |
| spattention       | d <= W_h  or  S_h <= d < S_h + W_h           |
| gapped_bands      | S_h <= d < S_h + W_h // 2                    |
| sliding_window    | d <= W_h                                     |
| dense             | always                                       |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

if TYPE_CHECKING:  # torch is imported where a tensor is built, so the command line starts fast
    import torch

PATTERNS: tuple[str, ...] = (
    "spattention",
    "exclusive_bands",
    "gapped_bands",
    "sliding_window",
    "dense",
)
DYNAMIC = "dynamic"
#: Upper end used for an interval that never ends (dense attention).
UNBOUNDED = 2**30
#: Every pattern's allowed distances are the union of at most this many intervals.
MAX_INTERVALS = 2

PartitionLen = Union[int, Literal["dynamic"]]
Interval = tuple[int, int]


def partition_len_arg(text: str) -> int | str:
    """A command-line partition length (argparse ``type=``): an integer or ``"dynamic"``."""
    if text == DYNAMIC:
        return DYNAMIC
    try:
        return int(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"must be an integer or 'dynamic', got {text!r}") from None


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _merge(intervals: list[Interval]) -> list[Interval]:
    """Sorts half-open intervals, drops empty ones and merges those that touch."""
    merged: list[Interval] = []
    for lo, hi in sorted(i for i in intervals if i[1] > i[0]):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


@dataclass(frozen=True)
class BandSpec:
    """Which keys each attention head may see, as a function of distance.

    Args:
        pattern: one of :data:`PATTERNS`.
        n_heads: total number of query heads ``H`` (global, before any tensor-parallel
            sharding; a shard passes ``head_offset`` to the implementations).
        partition_len: the partition length ``N`` (an int ``>= n_heads``, normally the
            training context length), or ``"dynamic"`` to use each call's key length,
            as the authors' released code did.
    """

    pattern: str
    n_heads: int
    partition_len: PartitionLen

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(
                f"unknown attention pattern {self.pattern!r}; allowed: {', '.join(PATTERNS)}"
            )
        _check_positive_int("n_heads", self.n_heads)
        if self.partition_len == DYNAMIC:
            return
        if isinstance(self.partition_len, str):
            raise ValueError(
                f"partition_len must be a positive integer or 'dynamic', got {self.partition_len!r}"
            )
        _check_positive_int("partition_len", self.partition_len)
        if self.partition_len < self.n_heads:
            raise ValueError(
                f"partition_len={self.partition_len} is smaller than n_heads={self.n_heads}: "
                "every head needs a band of width >= 1 (use partition_len >= n_heads)"
            )

    # ------------------------------------------------------------------ geometry
    @property
    def is_dynamic(self) -> bool:
        """True when the partition length is re-derived from each call's key length."""
        return self.partition_len == DYNAMIC

    def resolve_partition_len(self, seq_len: int | None = None) -> int:
        """The partition length ``N`` in force for a key sequence of ``seq_len`` tokens."""
        if not self.is_dynamic:
            return int(self.partition_len)  # type: ignore[arg-type]
        if seq_len is None:
            raise ValueError("partition_len='dynamic' needs seq_len to resolve the partition length")
        return _check_positive_int("seq_len", seq_len)

    def widths(self, seq_len: int | None = None) -> list[int]:
        """Band width ``W_h`` of every head (``seq_len`` is needed only when dynamic)."""
        n = self.resolve_partition_len(seq_len)
        base, rem = divmod(n, self.n_heads)
        return [base + (1 if h < rem else 0) for h in range(self.n_heads)]

    def starts(self, seq_len: int | None = None) -> list[int]:
        """Band start ``S_h`` of every head (``seq_len`` is needed only when dynamic)."""
        n = self.resolve_partition_len(seq_len)
        base, rem = divmod(n, self.n_heads)
        return [h * base + min(h, rem) for h in range(self.n_heads)]

    def intervals(self, seq_len: int | None = None) -> list[list[Interval]]:
        """Allowed distances of every head as sorted, disjoint half-open ``[lo, hi)`` ranges.

        Each head has at most :data:`MAX_INTERVALS` ranges; a head with none has only
        empty rows. ``dense`` is ``[(0, UNBOUNDED)]``.
        """
        if self.pattern == "dense":
            return [[(0, UNBOUNDED)] for _ in range(self.n_heads)]
        result = []
        for w, s in zip(self.widths(seq_len), self.starts(seq_len)):
            if self.pattern == "exclusive_bands":
                parts = [(s, s + w)]
            elif self.pattern == "gapped_bands":
                parts = [(s, s + w // 2)]
            elif self.pattern == "sliding_window":
                parts = [(0, w + 1)]
            else:  # spattention
                parts = [(0, w + 1), (s, s + w)]
            result.append(_merge(parts))
        return result

    def interval_tensor(
        self,
        seq_len: int | None = None,
        *,
        head_offset: int = 0,
        n_local_heads: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Per-head intervals as an int32 tensor ``[n_local_heads, MAX_INTERVALS, 2]``.

        Row ``h`` describes global head ``head_offset + h``; unused slots are ``(0, 0)``.
        This is the form the kernels consume.
        """
        heads = self._local_heads(head_offset, n_local_heads)
        import torch

        table = torch.zeros(len(heads), MAX_INTERVALS, 2, dtype=torch.int32)
        all_intervals = self.intervals(seq_len)
        for row, h in enumerate(heads):
            for slot, (lo, hi) in enumerate(all_intervals[h]):
                table[row, slot, 0] = lo
                table[row, slot, 1] = hi
        return table.to(device) if device is not None else table

    def _local_heads(self, head_offset: int, n_local_heads: int | None) -> range:
        if isinstance(head_offset, bool) or not isinstance(head_offset, int) or head_offset < 0:
            raise ValueError(f"head_offset must be a non-negative integer, got {head_offset!r}")
        count = self.n_heads - head_offset if n_local_heads is None else n_local_heads
        _check_positive_int("n_local_heads", count)
        if head_offset + count > self.n_heads:
            raise ValueError(
                f"heads {head_offset}..{head_offset + count - 1} are out of range for "
                f"n_heads={self.n_heads}"
            )
        return range(head_offset, head_offset + count)

    # ------------------------------------------------------------------ oracle
    def mask(
        self,
        seq_len: int,
        *,
        q_len: int | None = None,
        q_offset: int | None = None,
        head_offset: int = 0,
        n_local_heads: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Boolean attention mask ``[H, Tq, Tk]`` (True = attend): the oracle.

        ``seq_len`` is the key length ``Tk``. Queries are the last ``q_len`` positions
        by default (``q_offset = Tk - q_len``, as in decoding against a KV cache); with
        neither given, queries and keys are the same ``Tk`` positions.
        """
        tk = _check_positive_int("seq_len", seq_len)
        tq = tk if q_len is None else _check_positive_int("q_len", q_len)
        offset = tk - tq if q_offset is None else q_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"q_offset must be a non-negative integer, got {offset!r}")
        heads = self._local_heads(head_offset, n_local_heads)
        import torch

        dist = (torch.arange(tq, device=device) + offset)[:, None] - torch.arange(tk, device=device)
        causal = dist >= 0  # [Tq, Tk]
        all_intervals = self.intervals(tk)
        out = torch.zeros(len(heads), tq, tk, dtype=torch.bool, device=device)
        for row, h in enumerate(heads):
            for lo, hi in all_intervals[h]:
                out[row] |= (dist >= lo) & (dist < hi)
            out[row] &= causal
        return out

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, object]:
        """Plain-data form stored in configs and checkpoints."""
        return {"pattern": self.pattern, "n_heads": self.n_heads, "partition_len": self.partition_len}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> BandSpec:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on missing or unknown keys."""
        expected = {"pattern", "n_heads", "partition_len"}
        if set(data) != expected:
            raise ValueError(f"BandSpec needs exactly the keys {sorted(expected)}, got {sorted(data)}")
        return cls(data["pattern"], data["n_heads"], data["partition_len"])  # type: ignore[arg-type]

    def covered_pairs(self, seq_len: int) -> list[int]:
        """Number of allowed (query, key) pairs of each head over ``seq_len`` tokens."""
        total = []
        for parts in self.intervals(seq_len):
            count = 0
            for lo, hi in parts:
                hi = min(hi, seq_len)
                # distance d occurs for (seq_len - d) query positions
                n = max(hi - lo, 0)
                count += n * seq_len - n * (lo + hi - 1) // 2
            total.append(count)
        return total
