"""Shared helpers for comparing attention implementations with the float64 oracle.

The rule (FlagAttention's): an implementation's error against float64 must stay within
``2 x`` the error of masked SDPA computed in the same low precision, plus a small atol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olmoe_spattn import BandSpec
from olmoe_spattn.reference import reference_attention, sdpa_band_attention

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


@dataclass(frozen=True)
class Case:
    """One attention problem: shapes, pattern and the odd features it exercises."""

    name: str
    pattern: str
    n_heads: int  # global heads of the spec
    partition_len: int | str
    batch: int = 1
    q_len: int = 37
    kv_len: int | None = None  # default: q_len
    local_heads: int | None = None  # default: all heads
    head_offset: int = 0
    kv_heads: int | None = None  # default: local heads (no GQA)
    head_dim: int = 16
    cu_seqlens: tuple[int, ...] | None = None

    @property
    def spec(self) -> BandSpec:
        return BandSpec(self.pattern, self.n_heads, self.partition_len)

    def tensors(self, dtype: torch.dtype, device: str = "cpu", seed: int = 0, requires_grad: bool = False):
        g = torch.Generator().manual_seed(seed)
        h = self.local_heads or self.n_heads
        hkv = self.kv_heads or h
        tk = self.kv_len or self.q_len

        def make(t, heads):
            x = torch.randn(self.batch, t, heads, self.head_dim, generator=g).to(device=device, dtype=dtype)
            return x.requires_grad_(requires_grad)

        return make(self.q_len, h), make(tk, hkv), make(tk, hkv)

    def kwargs(self, device: str | torch.device = "cpu") -> dict:
        cu = None if self.cu_seqlens is None else torch.tensor(self.cu_seqlens, dtype=torch.int32, device=device)
        return {"head_offset": self.head_offset, "cu_seqlens": cu}


CASES: list[Case] = [
    Case("spattention_gqa_odd_T", "spattention", 4, 24, batch=2, q_len=37, kv_heads=2),
    Case("exclusive_dynamic_T_mod_H", "exclusive_bands", 3, "dynamic", q_len=50, head_dim=8),
    Case("gapped_head_offset", "gapped_bands", 6, 12, q_len=33, local_heads=3, head_offset=3),
    Case("sliding_partition_gt_T", "sliding_window", 4, 64, q_len=29),
    Case("dense", "dense", 2, 16, batch=2, q_len=19),
    Case("exclusive_empty_rows", "exclusive_bands", 4, 40, q_len=45),
    Case("decode_rows_q_offset", "spattention", 4, 16, q_len=5, kv_len=40, kv_heads=1),
    Case("varlen_fixed", "spattention", 4, 12, q_len=45, cu_seqlens=(0, 7, 7, 30, 45)),
    Case("varlen_dynamic", "exclusive_bands", 4, "dynamic", q_len=45, cu_seqlens=(0, 9, 30, 45)),
]


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


def assert_within_rule(name: str, got: torch.Tensor, lowp: torch.Tensor, ref64: torch.Tensor, dtype) -> None:
    """``|got - ref64| <= 2 |lowp - ref64| + atol`` (max norms), and no NaN."""
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    err, base = max_err(got, ref64), max_err(lowp, ref64)
    assert err <= 2 * base + ATOL[dtype], f"{name}: error {err:.3g} > 2 x {base:.3g} + {ATOL[dtype]}"


def reference_outputs(case: Case, q, k, v):
    """(float64 output, lse) of the oracle for ``case``."""
    return reference_attention(q, k, v, case.spec, **case.kwargs(q.device))


def lowp_sdpa(case: Case, q, k, v):
    """Masked SDPA in the inputs' dtype: the low-precision comparator."""
    return sdpa_band_attention(q, k, v, case.spec, **case.kwargs(q.device))
