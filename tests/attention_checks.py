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


def check_heads(fn, spec: BandSpec, q, k, v, heads=None, *, head_offset: int = 0, **kw):
    """``fn(q, k, v, spec, head_offset=..., **kw)`` (all heads) vs a per-head float64 oracle
    on ``heads`` (default: all), forward and backward, by the 2x rule; returns the output.

    Forward: error <= 2 x masked SDPA's error in the same dtype + atol. Backward: error <= 2 x
    the fp32 masked-SDPA gradient's error rounded to the dtype + 2% of the gradient's scale.
    Per head keeps the oracle's ``T x T`` memory bounded at long ``T``. GQA: dk/dv of a kv
    head are checked once all its query heads were.
    """
    dtype = q.dtype
    h_all, hkv = q.shape[2], k.shape[2]
    group = h_all // hkv
    out = fn(q, k, v, spec, head_offset=head_offset, **kw)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(x).all(), f"{name} has NaN or inf"
    kw.pop("max_seqlen", None)
    heads = range(h_all) if heads is None else heads
    dk_sum: dict[int, list] = {}
    for h in heads:
        kv = h // group
        sl = lambda x, i: x.detach()[:, :, i : i + 1]  # noqa: E731
        q64, k64, v64 = (sl(x, i).double().requires_grad_() for x, i in ((q, h), (k, kv), (v, kv)))
        ref, _ = reference_attention(q64, k64, v64, spec, head_offset=head_offset + h, **kw)
        lowp = sdpa_band_attention(sl(q, h), sl(k, kv), sl(v, kv), spec, head_offset=head_offset + h, **kw)
        e, base = max_err(out[:, :, h : h + 1], ref), max_err(lowp, ref)
        assert e <= 2 * base + ATOL[dtype], f"head {h}: out err {e:.3g} vs lowp {base:.3g}"
        gh = g[:, :, h : h + 1].double()
        want = torch.autograd.grad(ref, (q64, k64, v64), gh)
        qf, kf, vf = (sl(x, i).float().requires_grad_() for x, i in ((q, h), (k, kv), (v, kv)))
        lowf = sdpa_band_attention(qf, kf, vf, spec, head_offset=head_offset + h, **kw)
        base_g = torch.autograd.grad(lowf, (qf, kf, vf), gh.float())
        e, b = max_err(dq[:, :, h : h + 1], want[0]), max_err(base_g[0].to(dtype), want[0])
        assert e <= 2 * b + 0.02 * max(want[0].abs().max().item(), 1.0), f"head {h}: dq {e:.3g} vs {b:.3g}"
        if group == 1:
            for name, got, w, bb in (("dk", dk, want[1], base_g[1]), ("dv", dv, want[2], base_g[2])):
                e, b = max_err(got[:, :, h : h + 1], w), max_err(bb.to(dtype), w)
                assert e <= 2 * b + 0.02 * max(w.abs().max().item(), 1.0), f"head {h}: {name} {e:.3g} vs {b:.3g}"
        else:  # GQA: dk/dv of a kv head sum over its query heads
            acc = dk_sum.setdefault(kv, [0, 0, 0])
            acc[0] = acc[0] + want[1]
            acc[1] = acc[1] + want[2]
            acc[2] += 1
    for kv, (wk, wv, n) in dk_sum.items():
        if n == group:
            for got, w in ((dk, wk), (dv, wv)):
                e = max_err(got[:, :, kv : kv + 1], w)
                assert e <= 0.03 * max(w.abs().max().item(), 1.0), f"kv head {kv}: grad err {e:.3g}"
    return out
