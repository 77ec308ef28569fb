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


def check_heads(fn, spec: BandSpec, q, k, v, heads=None, *, head_offset: int = 0, lse: bool = False, **kw):
    """``fn(q, k, v, spec, head_offset=..., **kw)`` (all heads) vs the float64 oracle, one kv
    group at a time, forward and backward, by the 2x rule; returns the output.

    Every kv head whose group holds one of ``heads`` (default: all) is checked: out and dq of
    each query head in the group, and dk, dv of the kv head (GQA sums them over its query heads).
    Forward: error <= 2 x masked SDPA's error in the same dtype + atol. Backward: error <= 2 x
    the fp32 masked-SDPA gradient's error rounded to the dtype + 2% of the gradient's scale.
    One group at a time keeps the oracle's ``T x T`` memory bounded at long ``T``. With
    ``lse=True``, ``fn`` is called with ``return_lse=True`` and its log-sum-exp ``[B, H, Tq]``
    must be ``-inf`` exactly on empty rows and within 2e-4 of the float64 one elsewhere (fp32
    accumulation of exact products).
    """
    dtype = q.dtype
    h_all, hkv = q.shape[2], k.shape[2]
    group = h_all // hkv
    got_lse = None
    if lse:
        out, got_lse = fn(q, k, v, spec, head_offset=head_offset, return_lse=True, **kw)
        assert got_lse.shape == (q.shape[0], h_all, q.shape[1]) and got_lse.dtype == torch.float32
    else:
        out = fn(q, k, v, spec, head_offset=head_offset, **kw)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(x).all(), f"{name} has NaN or inf"
    kw.pop("max_seqlen", None)
    heads = range(h_all) if heads is None else heads
    for kv in sorted({h // group for h in heads}):
        hs = slice(kv * group, (kv + 1) * group)  # the query heads reading kv head `kv`
        off = head_offset + kv * group
        qg, kg, vg = q.detach()[:, :, hs], k.detach()[:, :, kv : kv + 1], v.detach()[:, :, kv : kv + 1]
        q64, k64, v64 = (x.double().requires_grad_() for x in (qg, kg, vg))
        ref, ref_lse = reference_attention(q64, k64, v64, spec, head_offset=off, **kw)  # [B,T,G,D], [B,G,T]
        lowp = sdpa_band_attention(qg, kg, vg, spec, head_offset=off, **kw)
        gg = g[:, :, hs].double()
        want = torch.autograd.grad(ref, (q64, k64, v64), gg)
        qf, kf, vf = (x.float().requires_grad_() for x in (qg, kg, vg))
        lowf = sdpa_band_attention(qf, kf, vf, spec, head_offset=off, **kw)
        base_g = torch.autograd.grad(lowf, (qf, kf, vf), gg.float())
        for j in range(group):
            h = kv * group + j
            r = ref[:, :, j : j + 1]
            e, base = max_err(out[:, :, h : h + 1], r), max_err(lowp[:, :, j : j + 1], r)
            assert e <= 2 * base + ATOL[dtype], f"head {h}: out err {e:.3g} vs lowp {base:.3g}"
            w = want[0][:, :, j : j + 1]
            e, b = max_err(dq[:, :, h : h + 1], w), max_err(base_g[0][:, :, j : j + 1].to(dtype), w)
            assert e <= 2 * b + 0.02 * max(w.abs().max().item(), 1.0), f"head {h}: dq {e:.3g} vs {b:.3g}"
            if got_lse is not None:
                empty = torch.isinf(ref_lse[:, j])  # [B, Tq]
                assert torch.equal(torch.isneginf(got_lse[:, h]), empty), f"head {h}: lse -inf exactly on empty rows"
                if (~empty).any():
                    e = (got_lse[:, h].double() - ref_lse[:, j])[~empty].abs().max().item()
                    assert e <= 2e-4, f"head {h}: lse err {e:.3g}"
        for name, got, w, bb in (("dk", dk, want[1], base_g[1]), ("dv", dv, want[2], base_g[2])):
            e, b = max_err(got[:, :, kv : kv + 1], w), max_err(bb.to(dtype), w)
            assert e <= 2 * b + 0.02 * max(w.abs().max().item(), 1.0), f"kv head {kv}: {name} {e:.3g} vs {b:.3g}"
    return out


def check_compiled_layer(attention, spec: BandSpec) -> None:
    """A qkv-projection + ``attention(q, k, v, spec)`` layer under ``torch.compile(fullgraph=True)``
    gives the eager layer's output and weight gradient (bf16, CUDA; 8 heads of 64, T = 512)."""

    def layer(x, w):
        b, t, _ = x.shape
        q, k, v = (x @ w).view(b, t, 3, 8, 64).unbind(2)
        return attention(q, k, v, spec).reshape(b, t, -1)

    x = torch.randn(2, 512, 512, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(512, 3 * 512, device="cuda", dtype=torch.bfloat16) / 23).requires_grad_()
    y = torch.compile(layer, fullgraph=True)(x, w)
    y.float().square().sum().backward()
    gw = w.grad.clone()
    w.grad = None
    y_eager = layer(x, w)
    y_eager.float().square().sum().backward()
    assert max_err(y, y_eager) <= 1e-2
    assert max_err(gw, w.grad) <= 1e-2 * w.grad.abs().max().item()
