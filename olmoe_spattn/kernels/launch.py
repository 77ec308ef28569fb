"""Host-side launchers: allocate outputs, pick configurations, launch the kernels."""

from __future__ import annotations

import torch
import triton

from .autotune import autotune_enabled, fixed_config, pick, tuning_key
from .backward import dkdv_kernel, dq_kernel
from .common import Problem
from .decode import run_decode, use_decode_path
from .forward import fwd_kernel


def _work_bucket(p: Problem) -> int:
    """log2 of the query rows times heads: part of the tuning key (grid size matters)."""
    return (max(p.z * p.max_tq * p.n_heads, 1)).bit_length()


def _launch(kind: str, fn, grid_of, p: Problem, args: list, **constexprs) -> None:
    """Launches ``fn`` with the fixed config, or the tuned one (autotuning on)."""
    cfg = fixed_config(kind, p.block_d, p.extent)

    def run(c):
        return fn[grid_of(c.block_m, c.block_n)](
            *args, **constexprs, **c.kwargs(), num_warps=c.num_warps, num_stages=c.num_stages
        )

    if autotune_enabled():
        key = (args[0].dtype, p.block_d, p.is_varlen, p.group > 1, args[-1], _work_bucket(p),
               tuple(sorted(constexprs.items())))
        cfg = pick(kind, key, cfg, p.block_d, run)
    run(cfg)


def run_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem):
    """``(out [B, Tq, H, D], lse [B, H, Tq] fp32)``."""
    out = torch.empty_like(q)
    lse = torch.empty(p.batch, p.n_heads, p.tq, device=q.device, dtype=torch.float32)
    if p.tq == 0:
        return out, lse
    if p.tk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    if use_decode_path(p):
        run_decode(q, k, v, out, lse, p)
        return out, lse
    args = [
        q, k, v, out, lse, p.table, p.cu,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        p.table_doc_stride,
        p.tq, p.tk, p.q_offset,
        p.group, 1,
        p.scale,
        tuning_key(p.block_d, p.extent, p.is_varlen),
    ]
    _launch(
        "fwd", fwd_kernel, lambda bm, bn: (triton.cdiv(p.max_tq, bm), p.n_heads, p.z), p, args,
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, IS_VARLEN=p.is_varlen, SPLIT=False,
        DOT_PRECISION=p.dot_precision,
    )
    return out, lse


def _bwd_const(p: Problem) -> dict:
    return dict(HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, IS_VARLEN=p.is_varlen, DOT_PRECISION=p.dot_precision)


def run_dq(do, q, k, v, out, lse, dlse, delta, dq, p: Problem) -> None:
    """dQ, and ``delta = rowsum(dO * O) - dlse`` written into ``delta`` for :func:`run_dkdv`."""
    args = [
        q, k, v, out, do, dq, lse, lse if dlse is None else dlse, delta, p.table, p.cu,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        lse.stride(0), lse.stride(1),
        p.table_doc_stride,
        p.tq, p.tk, p.q_offset,
        p.group,
        p.scale,
        tuning_key(p.block_d, p.extent, p.is_varlen),
    ]
    _launch(
        "dq", dq_kernel, lambda bm, bn: (triton.cdiv(p.max_tq, bm), p.n_heads, p.z), p, args,
        HAS_DLSE=dlse is not None, **_bwd_const(p),
    )


def run_dkdv(do, q, k, v, lse, delta, dk, dv, p: Problem) -> None:
    args = [
        q, k, v, do, dk, dv, lse, delta, p.table, p.cu,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        lse.stride(0), lse.stride(1),
        p.table_doc_stride,
        p.tq, p.tk, p.q_offset,
        p.group,
        p.scale,
        tuning_key(p.block_d, p.extent, p.is_varlen),
    ]
    _launch(
        "dkdv", dkdv_kernel, lambda bm, bn: (triton.cdiv(p.max_tk, bn), p.n_kv_heads, p.z), p, args, **_bwd_const(p)
    )


def run_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    p: Problem,
    dlse: torch.Tensor | None = None,
):
    """``(dq, dk, dv)``; ``dlse`` (gradient of the returned log-sum-exp) is optional."""
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if p.tq == 0 or p.tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)  # [B, H, Tq] fp32, written by the dQ pass
    if dlse is not None:  # d lse_i / d s_ij = P_ij: folds into delta
        dlse = dlse.to(torch.float32).contiguous()
    run_dq(do, q, k, v, out, lse, dlse, delta, dq, p)
    run_dkdv(do, q, k, v, lse, delta, dk, dv, p)
    return dq, dk, dv
