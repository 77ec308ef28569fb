"""Host-side launchers: allocate outputs, pick configurations, launch the kernels."""

from __future__ import annotations

import os

import torch
import triton

from .autotune import autotune_enabled, fixed_config, interpreting, pick, tuning_key
from .backward import delta_kernel, dkdv_kernel, dq_kernel
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


def run_delta(do, out, lse, dlse, delta, p: Problem) -> None:
    """``delta = rowsum(dO * O) - dlse`` into ``delta [B, H, Tq]`` (one-pass backward)."""
    block_m = 16 if interpreting() else 64
    delta_kernel[(triton.cdiv(p.max_tq, block_m), p.n_heads, p.z)](
        out, do, lse if dlse is None else dlse, delta, p.cu,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1),
        p.tq,
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_M=block_m, IS_VARLEN=p.is_varlen,
        HAS_DLSE=dlse is not None, num_warps=4,
    )


def run_dkdv(do, q, k, v, lse, delta, dk, dv, p: Problem, dq_acc: torch.Tensor | None = None) -> None:
    """dK and dV; with ``dq_acc`` (fp32, zeroed, shaped like ``q``) also dQ by atomic adds."""
    acc = dk if dq_acc is None else dq_acc  # any tensor: unused without ATOMIC_DQ
    args = [
        q, k, v, do, dk, dv, acc, lse, delta, p.table, p.cu,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        acc.stride(0), acc.stride(1), acc.stride(2),
        lse.stride(0), lse.stride(1),
        p.table_doc_stride,
        p.tq, p.tk, p.q_offset,
        p.group,
        p.scale,
        tuning_key(p.block_d, p.extent, p.is_varlen),
    ]
    _launch(
        "dkdv" if dq_acc is None else "dkdvdq", dkdv_kernel,
        lambda bm, bn: (triton.cdiv(p.max_tk, bn), p.n_kv_heads, p.z), p, args,
        ATOMIC_DQ=dq_acc is not None, **_bwd_const(p),
    )


#: ``OLMOE_SPATTN_BWD``: force a backward schedule (``one_pass`` or ``two_pass``).
BWD_SCHEDULES = ("one_pass", "two_pass")


def use_one_pass(deterministic: bool) -> bool:
    """Whether the backward takes the one-pass (atomic dQ) schedule for this call.

    Never when ``deterministic`` or under ``torch.use_deterministic_algorithms(True)``;
    ``OLMOE_SPATTN_BWD`` forces a schedule; otherwise two-pass, which measured faster for every
    band pattern on an H200 (``NOTES.md``).
    """
    if deterministic or torch.are_deterministic_algorithms_enabled():
        return False
    forced = os.environ.get("OLMOE_SPATTN_BWD", "")
    if forced:
        if forced not in BWD_SCHEDULES:
            raise ValueError(f"OLMOE_SPATTN_BWD={forced!r}; allowed: {', '.join(BWD_SCHEDULES)}")
        return forced == "one_pass"
    return False


def run_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    p: Problem,
    dlse: torch.Tensor | None = None,
    deterministic: bool = False,
):
    """``(dq, dk, dv)``; ``dlse`` (gradient of the returned log-sum-exp) is optional.

    ``deterministic`` keeps the two-pass schedule (bit-identical gradients run to run).
    """
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if p.tq == 0 or p.tk == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)  # [B, H, Tq] fp32
    if dlse is not None:  # d lse_i / d s_ij = P_ij: folds into delta
        dlse = dlse.to(torch.float32).contiguous()
    if use_one_pass(deterministic):
        dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # [B, Tq, H, D]
        run_delta(do, out, lse, dlse, delta, p)
        run_dkdv(do, q, k, v, lse, delta, dk, dv, p, dq_acc=dq_acc)
        return dq_acc.to(q.dtype), dk, dv
    dq = torch.empty_like(q)
    run_dq(do, q, k, v, out, lse, dlse, delta, dq, p)
    run_dkdv(do, q, k, v, lse, delta, dk, dv, p)
    return dq, dk, dv
