"""Decode and short-query path: split the key loop across programs (flash-decoding).

With few query rows (decode against a KV cache: ``Tq`` of 1 to 16) one program per
(query tile, head, batch) leaves most of the GPU idle and walks long key ranges (dense
heads, wide windows) serially. Here each program's key-block list is cut into
``n_split`` contiguous pieces; every piece writes an fp32 partial output and its
log-sum-exp, and :func:`~.forward.combine_kernel` merges them in one more launch.
Band heads whose ranges are short get ``n_split = 1`` and go straight to the output.
"""

from __future__ import annotations

import functools

import torch
import triton

from . import direct_launch
from .autotune import fixed_config, interpreting
from .common import Problem
from .forward import combine_kernel, fwd_kernel

#: Queries per call at or below which the decode path is used.
DECODE_MAX_Q = 16
_MAX_SPLIT = 64


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: small, so tests exercise splitting
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split(p: Problem, block_m: int, block_n: int, device: torch.device) -> int:
    """Number of pieces to cut each program's key loop into (1 = no split)."""
    programs = p.batch * p.n_heads * triton.cdiv(p.tq, block_m)
    visible = min(p.extent + p.tq, p.q_offset + p.tq, p.tk)
    blocks = triton.cdiv(max(visible, 1), block_n) + 2
    min_blocks = 2 if interpreting() else 4
    by_work = triton.cdiv(blocks, min_blocks)
    by_machine = triton.cdiv(2 * _sm_count(device), programs)
    return max(1, min(by_work, by_machine, _MAX_SPLIT))


def use_decode_path(p: Problem) -> bool:
    return not p.is_varlen and p.tq <= DECODE_MAX_Q


def run_decode(q, k, v, out, lse, p: Problem) -> None:
    """Forward for ``Tq <= DECODE_MAX_Q``: writes ``out [B, Tq, H, D]`` and ``lse [B, H, Tq]``."""
    cfg = fixed_config("decode", p.block_d, p.extent)
    n_split = choose_split(p, cfg.block_m, cfg.block_n, q.device)
    if n_split == 1:
        dst_o, dst_l = out, lse
    else:
        dst_o = torch.empty(p.batch, p.n_heads, n_split, p.tq, p.block_d, device=q.device, dtype=torch.float32)
        dst_l = torch.empty(p.batch, p.n_heads, n_split, p.tq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(p.tq, cfg.block_m), p.n_heads, p.batch * n_split)
    direct_launch.launch(
        fwd_kernel, grid, q, k, v, dst_o, dst_l, p.table, p.cu,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        p.table_doc_stride,
        p.tq, p.tk, p.q_offset,
        p.group, n_split,
        p.scale,
        0,
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        IS_VARLEN=False, SPLIT=n_split > 1, DOT_PRECISION=p.dot_precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if n_split > 1:
        direct_launch.launch(
            combine_kernel, (p.tq, p.n_heads, p.batch), dst_o, dst_l, out, lse,
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            p.n_heads, p.tq, n_split,
            HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_S=triton.next_power_of_2(n_split),
            num_warps=4 if p.block_d >= 128 else 2,
        )
