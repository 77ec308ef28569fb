"""Host-side launchers: allocate outputs, pick configurations, launch the kernels (repeat calls
go straight to the compiled kernels, :mod:`.direct_launch`).

Hopper-era features of plain Triton. Without ``OLMOE_SPATTN_TRITON_FEATURES`` (or with
``auto``) they are chosen per call on SM90+ GPUs (:func:`auto_features`, measured on an H200
with ``bench sweep --variants`` and per-kernel sweeps, see ``NOTES.md``): ``tma`` and ``flat``
in the forward when a head's band spans at most ``AUTO_FLAT_MAX_EXTENT`` distances and less
than the sequence (head dims 64 and 128; 1.1-1.5x forward there, 0.64-0.9x on wider bands and
dense), on SM90 ``gluon_fwd`` for wider bands and at head dim 128 (1.3-1.9x forward), ``gluon_ws``
for bands wider than ``AUTO_GLUON_WS_MIN_EXTENT`` and ``gluon_bwd`` for bands wider than
``AUTO_GLUON_BWD_MIN_EXTENT``, and ``tma_dq`` in the Triton
dQ kernel for head dim 128 (1.14-1.28x on the dQ kernel for every measured band
width). ``none`` (or an empty value) gives the plain kernels; a
comma-separated list forces exactly those features:

* ``tma``: the forward's Q, K and V tiles are loaded through host-side TMA tensor descriptors (2-D views
  ``[B * T, H * D]``); needs a power-of-two head dim >= 16, unit stride along D, heads packed
  along a row (``stride_h == D``), batch rows packed (``stride_b == T * stride_t``) and
  16-byte aligned data and row strides; calls that do not qualify use pointer loads.
* ``tma_dq``: the same for the K and V tiles that ``dq_kernel`` streams.
* ``tma_bwd``: ``tma_dq``, and Q and dO in ``dkdv_kernel`` (whose last query tile of a
  sequence zeroes the rows past its end, as the masked pointer loads do; measured 2-16% slower
  than pointer loads in that kernel, so the automatic choice leaves it out).
* ``tma_reduce``: the one-pass backward (``OLMOE_SPATTN_BWD=one_pass``) adds each tile's dQ
  share into the fp32 dQ buffer with one TMA bulk reduce-add (``cp.reduce.async.bulk.tensor``)
  instead of per-element atomic adds (rows past a sequence's end add zeros). Triton's
  interpreter has no descriptor reductions: there it keeps the atomic adds.
* ``flat``: the forward's key loop masks every tile (no data-dependent branch in the loop body).
* ``gluon_fwd``: the forward runs the Gluon Hopper kernel (``hopper_forward.py``: TMA rings,
  asynchronous warpgroup MMAs, the softmax of one key tile overlapping the P·V MMA of the
  previous one) on SM90 GPUs for bf16/fp16 calls with head dim 64 or 128 whose tensors a
  descriptor can read (as for ``tma``); other calls keep the Triton forward.
* ``gluon_ws``: the forward runs the warp-specialized Gluon Hopper kernel
  (``hopper_forward_ws.py``: a TMA producer warp and two consumer warpgroups sharing every K/V
  tile of a 128-row query tile) under the same conditions; it takes precedence over ``gluon_fwd``.
* ``gluon_bwd``: both passes of the two-pass backward (dQ, then dK/dV) run the Gluon Hopper
  kernels (``hopper_backward.py``) under the same conditions.

Triton's automatic warp specialization of the forward's key loop was measured too (0.37-0.59x,
and NaN at one launch config; ``NOTES.md``) and is not offered.

The backward's schedule (:func:`use_cute_backward`, :func:`use_one_pass`, ``OLMOE_SPATTN_BWD``):
on SM90 the one-pass CuTe DSL kernel (:mod:`.cute_launch`) wherever it can run and the call is not
deterministic; else the deterministic two-pass pair (dQ, then dK/dV; Gluon on SM90 for wide bands).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from . import direct_launch, replay
from .autotune import (
    LaunchConfig,
    autotune_enabled,
    device_capability,
    fixed_config,
    interpreting,
    pick,
    row_major_store,
    tuning_key,
)
from .backward import delta_kernel, dkdv_kernel, dq_kernel
from .common import Problem
from .cute_launch import cute_backward_ok, run_backward_cute
from .decode import run_decode, use_decode_path
from .forward import fwd_kernel


def _work_bucket(p: Problem) -> int:
    """log2 of the query rows times heads: part of the tuning key (grid size matters)."""
    return (max(p.z * p.max_tq * p.n_heads, 1)).bit_length()


#: ``OLMOE_SPATTN_TRITON_FEATURES``: opt-in kernel features (see the module docstring).
TRITON_FEATURES = ("tma", "tma_dq", "tma_bwd", "tma_reduce", "flat", "gluon_fwd", "gluon_ws", "gluon_bwd")


#: Widest band (distinct distances per head) for which the automatic choice takes ``tma`` + ``flat``.
AUTO_FLAT_MAX_EXTENT = 1024

#: Band width (distinct distances per head) above which the automatic choice takes ``gluon_bwd`` on SM90.
AUTO_GLUON_BWD_MIN_EXTENT = 512
#: ``gluon_ws`` (the warp-specialized Gluon forward) on bands wider than this: 1.02-1.16x the
#: one-warpgroup Gluon forward from 2049 distances on (two runs), 0.78x at 513 (H200, ``NOTES.md``)
AUTO_GLUON_WS_MIN_EXTENT = 2048


def auto_features(p: Problem, device: torch.device) -> frozenset[str]:
    """The features measured faster for this call: none off SM90+ CUDA, in the interpreter and
    for head dims other than 64 and 128 (not measured)."""
    if interpreting() or device.type != "cuda" or p.head_dim != p.block_d or p.block_d not in (64, 128):
        return frozenset()
    major = device_capability(device)[0]
    if major < 9:
        return frozenset()
    # dQ kernel: descriptor loads of K and V measured 1.14-1.28x at head dim 128 (64: not measured)
    chosen = {"tma_dq"} if p.block_d == 128 else set()
    hopper = major == 9  # the Gluon kernels' warpgroup MMAs
    wide = p.extent > AUTO_FLAT_MAX_EXTENT
    # Gluon forward: 1.35-1.7x the Triton forward on wide bands, ahead of tma+flat at head dim 128 on
    # narrow ones; at head dim 64 narrow bands tie or favour tma+flat
    if hopper and (wide or p.block_d == 128):
        chosen.add("gluon_fwd")
    # its warp-specialized version: 128-row tiles pay off on wide bands only
    if hopper and p.extent > AUTO_GLUON_WS_MIN_EXTENT:
        chosen.add("gluon_ws")
    # Gluon backward passes: 1.04-1.06x fwd+bwd from 513 distances on, 0.96x at 256
    if hopper and p.extent > AUTO_GLUON_BWD_MIN_EXTENT:
        chosen.add("gluon_bwd")
    # a band as wide as the sequence is causal attention: mostly full tiles, where the
    # branch-free masking loses (measured 0.64-0.71x forward on dense)
    if p.extent <= AUTO_FLAT_MAX_EXTENT and p.extent < p.max_tk and "gluon_fwd" not in chosen:
        chosen |= {"tma", "flat"}
    return frozenset(chosen)


def triton_features(
    p: Problem | None = None, device: torch.device | None = None, *, atomic_dq: bool = False
) -> frozenset[str]:
    """The features of one call: ``OLMOE_SPATTN_TRITON_FEATURES`` when it names them, else
    :func:`auto_features` (``p`` and ``device`` given) or none. ``atomic_dq``: the call is the
    one-pass backward, which the automatic choice leaves without descriptor loads (not measured)."""
    raw = os.environ.get("OLMOE_SPATTN_TRITON_FEATURES")
    if raw is None or raw.strip() == "auto":
        if p is None or device is None or atomic_dq:
            return frozenset()
        return auto_features(p, device)
    return parse_features(raw)


def parse_features(raw: str) -> frozenset[str]:
    """An ``OLMOE_SPATTN_TRITON_FEATURES`` value other than ``auto`` -> the features it names."""
    if raw.strip() == "none":
        return frozenset()
    names = frozenset(x.strip() for x in raw.split(",") if x.strip())
    bad = sorted(names - set(TRITON_FEATURES))
    if bad:
        raise ValueError(
            f"OLMOE_SPATTN_TRITON_FEATURES={raw!r}: unknown {bad}; allowed: {', '.join(TRITON_FEATURES)}"
        )
    return names


def tma_ok(x: torch.Tensor, head_dim: int, block_d: int) -> bool:
    """Whether ``x [B, T, H, D]`` can be read through a 2-D descriptor over ``[B * T, H * D]``."""
    b, t, h, d = x.shape
    elt = x.element_size()
    return (
        x.is_cuda or interpreting()
    ) and head_dim == block_d and x.stride(3) == 1 and x.stride(2) == d and (
        b == 1 or x.stride(0) == t * x.stride(1)
    ) and x.data_ptr() % 16 == 0 and (x.stride(1) * elt) % 16 == 0 and b * t > 0


def tma_descriptor(x: torch.Tensor, block_rows: int, block_d: int):
    """Host-side TMA descriptor over ``x [B, T, H, D]`` viewed as ``[B * T, H * D]``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, t, h, d = x.shape
    return TensorDescriptor(x, [b * t, h * d], [x.stride(1), 1], [block_rows, block_d])


def _launch(kind: str, fn, grid_of, p: Problem, args: list, descriptors=None, **constexprs) -> None:
    """Launches ``fn`` with the fixed config, or the tuned one (autotuning on).

    ``descriptors(cfg)``, when given, returns ``{argument index: TMA descriptor}`` for that
    config's tile sizes; those replace the pointer arguments.
    """
    cfg = fixed_config(kind, p.block_d, p.extent)

    def run(c):
        a = args
        if descriptors is not None:
            a = list(args)
            for i, desc in descriptors(c).items():
                a[i] = desc
        direct_launch.launch(fn, grid_of(c.block_m, c.block_n), *a, **constexprs, **c.kwargs(),
                             num_warps=c.num_warps, num_stages=c.num_stages)

    if autotune_enabled():
        key = (args[0].dtype, p.block_d, p.is_varlen, p.group > 1, args[-1], _work_bucket(p),
               tuple(sorted(constexprs.items())))
        cfg = pick(kind, key, cfg, p.block_d, run)
    run(cfg)


def run_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem):
    """``(out [B, Tq, H, D], lse [B, H, Tq] fp32)``; a repeat call of ``p`` replays the launches of
    an earlier one (:mod:`.replay`)."""
    out = torch.empty_like(q)
    lse = torch.empty(p.batch, p.n_heads, p.tq, device=q.device, dtype=torch.float32)
    if p.tq == 0:
        return out, lse
    if p.tk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    if use_decode_path(p):
        run_decode(q, k, v, out, lse, p)
        return out, lse
    found = replay.lookup(p, "fwd", (os.environ.get("OLMOE_SPATTN_TRITON_FEATURES"), autotune_enabled()), (q, k, v))
    replay.launch_or_replay(found, (q, k, v), (out, lse), lambda: _forward_launches(q, k, v, out, lse, p),
                            (p.table, p.cu))
    return out, lse


def _forward_launches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      p: Problem) -> None:
    """The forward's launch into ``out`` and ``lse``: the Gluon kernels where :func:`triton_features`
    picks them and they can run, else the Triton kernel."""
    features = triton_features(p, q.device)
    if features & {"gluon_fwd", "gluon_ws"} and sm90_ok(p, q, k, v):  # with both, the warp-specialized one
        (run_forward_sm90_ws if "gluon_ws" in features else run_forward_sm90)(q, k, v, out, lse, p)
        return
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
    extra = {}
    descriptors = None
    if "tma" in features and all(tma_ok(x, p.head_dim, p.block_d) for x in (q, k, v)):
        extra = dict(USE_TMA=True)

        def descriptors(c):
            return {0: tma_descriptor(q, c.block_m, p.block_d), 1: tma_descriptor(k, c.block_n, p.block_d),
                    2: tma_descriptor(v, c.block_n, p.block_d)}
    if "flat" in features:
        extra["FLAT_MASK"] = True
    _launch(
        "fwd", fwd_kernel, lambda bm, bn: (triton.cdiv(p.max_tq, bm), p.n_heads, p.z), p, args, descriptors,
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, IS_VARLEN=p.is_varlen, SPLIT=False,
        DOT_PRECISION=p.dot_precision, **extra,
    )


def sm90_ok(p: Problem, *tensors: torch.Tensor) -> bool:
    """Whether the Gluon Hopper kernels can run this call: an SM90 GPU (their warpgroup MMAs do
    not exist elsewhere), bf16/fp16, head dim 64 or 128, tensors a descriptor can read."""
    x = tensors[0]
    return (
        not interpreting() and x.is_cuda and device_capability(x.device)[0] == 9
        and x.dtype in (torch.bfloat16, torch.float16)
        and p.head_dim in (64, 128) and all(tma_ok(t, p.head_dim, p.block_d) for t in tensors)
    )


@functools.lru_cache(maxsize=32)
def _sm90_tile_layout(rows: int, head_dim: int, bf16: bool):
    """The shared-memory layout of a ``[rows, head_dim]`` tile (cached: ~7 us to build, per launch)."""
    from triton.experimental.gluon import language as gl

    return gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl.bfloat16 if bf16 else gl.float16)


def sm90_descriptor(x: torch.Tensor, rows: int):
    """Gluon TMA descriptor over ``x [B, T, H, D]`` viewed as ``[B * T, H * D]``, ``[rows, D]`` tiles."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    b, t, h, d = x.shape
    layout = _sm90_tile_layout(rows, d, x.dtype == torch.bfloat16)
    return TensorDescriptor(x, [b * t, h * d], [x.stride(1), 1], [rows, d], layout)


def _sm90_tail(p: Problem, lse: torch.Tensor) -> tuple:
    """The arguments every Gluon kernel takes after its own tensors and strides: the log-sum-exp
    (and delta) strides, the interval table's document stride, the sequence geometry, the scale."""
    return (lse.stride(0), lse.stride(1), p.table_doc_stride, p.tq, p.tk, p.q_offset, p.group, p.scale)


def _sm90_constexprs(kind: str, p: Problem, c: LaunchConfig) -> dict:
    """The compile-time arguments every Gluon kernel takes for one launch configuration."""
    return dict(HEAD_DIM=p.head_dim, BLOCK_M=c.block_m, BLOCK_N=c.block_n, STAGES=c.num_stages,
                IS_VARLEN=p.is_varlen, num_warps=c.num_warps,
                ROW_MAJOR_STORE=row_major_store(kind, p.block_d, p.extent))


def _launch_sm90(kind: str, p: Problem, dtype: torch.dtype, run) -> None:
    """Runs ``run(config)`` with the fixed Gluon config of ``kind``, or the tuned one."""
    cfg = fixed_config(kind, p.block_d, p.extent)
    if autotune_enabled():
        key = (dtype, p.block_d, p.is_varlen, p.group > 1, tuning_key(p.block_d, p.extent, p.is_varlen), _work_bucket(p))
        cfg = pick(kind, key, cfg, p.block_d, run)
    run(cfg)


def _run_forward_gluon(kind: str, kernel, rows_per_block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, p: Problem, **launch_options) -> None:
    """One of the Gluon forwards into ``out`` and ``lse``: ``rows_per_block`` query tiles of
    ``block_m`` rows per program."""

    def run(c: LaunchConfig):
        grid = (triton.cdiv(p.max_tq, rows_per_block * c.block_m), p.n_heads, p.z)
        direct_launch.launch(
            kernel, grid, sm90_descriptor(q, c.block_m), sm90_descriptor(k, c.block_n), sm90_descriptor(v, c.block_n),
            out, lse, p.table, p.cu,
            out.stride(0), out.stride(1), out.stride(2),
            *_sm90_tail(p, lse), **_sm90_constexprs(kind, p, c), **launch_options,
        )

    _launch_sm90(kind, p, q.dtype, run)


def run_forward_sm90(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     p: Problem) -> None:
    """The forward through :func:`hopper_forward.fwd_kernel_sm90` into ``out`` and ``lse``."""
    from .hopper_forward import fwd_kernel_sm90

    _run_forward_gluon("fwd_sm90", fwd_kernel_sm90, 1, q, k, v, out, lse, p)


def run_forward_sm90_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        p: Problem) -> None:
    """The forward through :func:`hopper_forward_ws.fwd_kernel_sm90_ws` (warp-specialized: a
    producer warp and two consumer warpgroups of ``block_m`` rows each) into ``out`` and ``lse``."""
    from .hopper_forward_ws import MAX_REGISTERS, fwd_kernel_sm90_ws

    _run_forward_gluon("fwd_sm90_ws", fwd_kernel_sm90_ws, 2, q, k, v, out, lse, p, maxnreg=MAX_REGISTERS)


def run_dq_sm90(do, q, k, v, out, lse, dlse, delta, dq, p: Problem) -> None:
    """dQ and ``delta`` through :func:`hopper_backward.dq_kernel_sm90` (as :func:`run_dq`)."""
    from .hopper_backward import dq_kernel_sm90

    def run(c: LaunchConfig):
        grid = (triton.cdiv(p.max_tq, c.block_m), p.n_heads, p.z)
        direct_launch.launch(
            dq_kernel_sm90, grid, sm90_descriptor(q, c.block_m), sm90_descriptor(k, c.block_n), sm90_descriptor(v, c.block_n),
            sm90_descriptor(do, c.block_m), out, dq, lse, lse if dlse is None else dlse, delta, p.table, p.cu,
            out.stride(0), out.stride(1), out.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            *_sm90_tail(p, lse), **_sm90_constexprs("dq_sm90", p, c), HAS_DLSE=dlse is not None,
        )

    _launch_sm90("dq_sm90", p, q.dtype, run)


def run_dkdv_sm90(do, q, k, v, lse, delta, dk, dv, p: Problem) -> None:
    """dK and dV through :func:`hopper_backward.dkdv_kernel_sm90` (``delta`` from :func:`run_dq`)."""
    from .hopper_backward import dkdv_kernel_sm90

    def run(c: LaunchConfig):
        grid = (triton.cdiv(p.max_tk, c.block_n), p.n_kv_heads, p.z)
        direct_launch.launch(
            dkdv_kernel_sm90, grid, sm90_descriptor(q, c.block_m), sm90_descriptor(k, c.block_n), sm90_descriptor(v, c.block_n),
            sm90_descriptor(do, c.block_m), dk, dv, lse, delta, p.table, p.cu,
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            *_sm90_tail(p, lse), **_sm90_constexprs("dkdv_sm90", p, c),
        )

    _launch_sm90("dkdv_sm90", p, q.dtype, run)


def _bwd_const(p: Problem) -> dict:
    return dict(HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, IS_VARLEN=p.is_varlen, DOT_PRECISION=p.dot_precision)


def run_dq(do, q, k, v, out, lse, dlse, delta, dq, p: Problem) -> None:
    """dQ, and ``delta = rowsum(dO * O) - dlse`` written into ``delta`` for :func:`run_dkdv`."""
    features = triton_features(p, q.device)
    if "gluon_bwd" in features and sm90_ok(p, q, k, v, do):
        run_dq_sm90(do, q, k, v, out, lse, dlse, delta, dq, p)
        return
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
    extra = {}
    descriptors = None
    if features & {"tma_dq", "tma_bwd"} and all(tma_ok(x, p.head_dim, p.block_d) for x in (k, v)):
        extra = dict(USE_TMA=True)

        def descriptors(c):
            return {1: tma_descriptor(k, c.block_n, p.block_d), 2: tma_descriptor(v, c.block_n, p.block_d)}
    _launch(
        "dq", dq_kernel, lambda bm, bn: (triton.cdiv(p.max_tq, bm), p.n_heads, p.z), p, args, descriptors,
        HAS_DLSE=dlse is not None, **_bwd_const(p), **extra,
    )


def run_delta(do, out, lse, dlse, delta, p: Problem) -> None:
    """``delta = rowsum(dO * O) - dlse`` into ``delta [B, H, Tq]`` (one-pass backward)."""
    block_m = 16 if interpreting() else 64
    direct_launch.launch(
        delta_kernel, (triton.cdiv(p.max_tq, block_m), p.n_heads, p.z), out, do, lse if dlse is None else dlse, delta, p.cu,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1),
        p.tq,
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BLOCK_M=block_m, IS_VARLEN=p.is_varlen,
        HAS_DLSE=dlse is not None, num_warps=4,
    )


def run_dkdv(do, q, k, v, lse, delta, dk, dv, p: Problem, dq_acc: torch.Tensor | None = None) -> None:
    """dK and dV; with ``dq_acc`` (fp32, zeroed, shaped like ``q``) also dQ by atomic adds."""
    features = triton_features(p, q.device, atomic_dq=dq_acc is not None)
    if dq_acc is None and "gluon_bwd" in features and sm90_ok(p, q, k, v, do):
        run_dkdv_sm90(do, q, k, v, lse, delta, dk, dv, p)
        return
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
    extra = {}
    streamed = []  # (argument index, tensor): read or reduced through [BLOCK_M, D] descriptors
    if "tma_bwd" in features and all(tma_ok(x, p.head_dim, p.block_d) for x in (q, do)):
        extra["USE_TMA"] = True
        streamed += [(0, q), (3, do)]
    if dq_acc is not None and "tma_reduce" in features and not interpreting() and tma_ok(dq_acc, p.head_dim, p.block_d):
        extra["TMA_REDUCE"] = True
        streamed.append((6, dq_acc))

    def descriptors(c):
        return {i: tma_descriptor(x, c.block_m, p.block_d) for i, x in streamed}
    _launch(
        "dkdv" if dq_acc is None else "dkdvdq", dkdv_kernel,
        lambda bm, bn: (triton.cdiv(p.max_tk, bn), p.n_kv_heads, p.z), p, args, descriptors,
        ATOMIC_DQ=dq_acc is not None, **_bwd_const(p), **extra,
    )


#: ``OLMOE_SPATTN_BWD``: the backward schedule. ``auto`` (or unset): the CuTe one-pass kernel where
#: it can run (:func:`use_cute_backward`), else two-pass; ``cute``: the CuTe kernel wherever it can
#: run (other calls as ``auto``); ``one_pass``: the Triton one-pass kernel (atomic fp32 dQ);
#: ``two_pass``: the deterministic Triton pair.
BWD_SCHEDULES = ("auto", "cute", "one_pass", "two_pass")
#: Narrowest band (distances per head) that ``auto`` gives the CuTe backward.
AUTO_CUTE_BWD_MIN_EXTENT = 0


def forced_schedule() -> str:
    """``OLMOE_SPATTN_BWD`` checked against :data:`BWD_SCHEDULES` (``auto`` when unset or empty)."""
    forced = os.environ.get("OLMOE_SPATTN_BWD", "") or "auto"
    if forced not in BWD_SCHEDULES:
        raise ValueError(f"OLMOE_SPATTN_BWD={forced!r}; allowed: {', '.join(BWD_SCHEDULES)}")
    return forced


def use_one_pass(deterministic: bool) -> bool:
    """Whether the backward takes the Triton one-pass (atomic dQ) schedule for this call:
    only when ``OLMOE_SPATTN_BWD=one_pass``, and never when ``deterministic`` or under
    ``torch.use_deterministic_algorithms(True)`` (it measured slower than two passes on every band
    pattern on an H200, ``NOTES.md``)."""
    if deterministic or torch.are_deterministic_algorithms_enabled():
        return False
    return forced_schedule() == "one_pass"


def use_cute_backward(p: Problem, deterministic: bool, *tensors: torch.Tensor) -> bool:
    """Whether the backward takes the CuTe one-pass kernel (:mod:`.cute_launch`): never when
    ``deterministic`` or under ``torch.use_deterministic_algorithms(True)`` (its dQ adds arrive in
    any order), nor when ``OLMOE_SPATTN_BWD`` names a Triton schedule or ``OLMOE_SPATTN_TRITON_FEATURES``
    forces Triton kernels; otherwise wherever :func:`.cute_launch.cute_backward_ok` accepts the call
    (an SM90 GPU, bf16/fp16, head dim 128, no GQA, ``nvidia-cutlass-dsl`` and
    ``quack-kernels`` installed), for bands of at least ``AUTO_CUTE_BWD_MIN_EXTENT`` distances
    unless ``OLMOE_SPATTN_BWD=cute``."""
    if deterministic or torch.are_deterministic_algorithms_enabled():
        return False
    forced = forced_schedule()
    if forced in ("one_pass", "two_pass"):
        return False
    if forced == "auto":
        if os.environ.get("OLMOE_SPATTN_TRITON_FEATURES", "auto").strip() != "auto":
            return False
        if p.extent < AUTO_CUTE_BWD_MIN_EXTENT:
            return False
    return cute_backward_ok(p, *tensors)


#: What :func:`run_backward` keeps under a call's layout key when that call took the CuTe backward.
CUTE_SCHEDULE = "cute"


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

    ``deterministic`` keeps the two-pass schedule (bit-identical gradients run to run); otherwise
    the CuTe one-pass kernel runs where :func:`use_cute_backward` allows it. A repeat call of ``p``
    reuses the schedule an earlier one took, and replays its Triton launches (:mod:`.replay`).
    """
    if p.tq == 0 or p.tk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if dlse is not None:  # d lse_i / d s_ij = P_ij: folds into delta
        dlse = dlse.to(torch.float32).contiguous()
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    inputs = (do, q, k, v, out, lse) if dlse is None else (do, q, k, v, out, lse, dlse)
    settings = (deterministic, os.environ.get("OLMOE_SPATTN_BWD"), os.environ.get("OLMOE_SPATTN_TRITON_FEATURES"),
                autotune_enabled())
    found = store, key, entry = replay.lookup(p, "bwd", settings, inputs)
    if entry is CUTE_SCHEDULE or (entry is None and use_cute_backward(p, deterministic, q, k, v, out, do)):
        grads = run_backward_cute(do, q, k, v, out, lse, p, dlse)
        if grads is not None:
            if store is not None and entry is None:
                store.mark(key, CUTE_SCHEDULE)
            return grads
        found = store, key, None  # the CuTe kernels did not compile: the Triton backward from now on
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty_like(lse)  # [B, H, Tq] fp32
    if use_one_pass(deterministic):
        dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # [B, Tq, H, D], atomic adds

        def launches() -> None:
            run_delta(do, out, lse, dlse, delta, p)
            run_dkdv(do, q, k, v, lse, delta, dk, dv, p, dq_acc=dq)
    else:
        dq = torch.empty_like(q)

        def launches() -> None:
            run_dq(do, q, k, v, out, lse, dlse, delta, dq, p)
            run_dkdv(do, q, k, v, lse, delta, dk, dv, p)
    replay.launch_or_replay(found, inputs, (dq, dk, dv, delta), launches, (p.table, p.cu))
    return dq.to(q.dtype), dk, dv
