"""Launch configurations: a small autotuned space on GPUs, fixed choices elsewhere.

Autotuning is on by default on CUDA and off when ``TRITON_INTERPRET=1`` or
``OLMOE_SPATTN_AUTOTUNE=0`` (tests, reproducible runs); then :func:`fixed_config` picks
one configuration by head dim and band width. The tuning key is the kernel, the head
dim, the dtype, varlen or not, a bucket of the band width (short bands like small query
tiles, long ones big tiles) and a bucket of the amount of work, so a training run tunes
once per layer shape.

The tuner (:func:`pick`) is deliberately conservative: the per-GPU sweeps behind
:func:`fixed_config` are its default, every candidate is timed in interleaved rounds
(so clock ramps and run-to-run noise, ~15% on these shapes, hit all alike), and another
configuration replaces the default only when its median is at least 3% faster.
``triton.autotune`` times each config once, in a row, and keeps whichever wins.
"""

from __future__ import annotations

import functools
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.testing


@functools.lru_cache(maxsize=1)
def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``). Read once, as Triton
    reads it once per kernel when the module defining the kernel is imported; every launch decision
    asks, and an environment lookup costs about a microsecond."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=16)
def _capability(index: int, query: Callable[[int], tuple[int, int]]) -> tuple[int, int]:
    return tuple(query(index))


def device_capability(device: torch.device | None = None) -> tuple[int, int]:
    """``torch.cuda.get_device_capability(device)``, cached for a device with an index (a tensor's):
    the launch decisions of every call ask for it, and each query costs microseconds of host time.
    The cache is keyed on the query function too, so a replaced one is asked again; a device without
    an index (the current one) is asked every time."""
    if device is None or device.index is None:
        return tuple(torch.cuda.get_device_capability(device))
    return _capability(device.index, torch.cuda.get_device_capability)


def cuda_major() -> int:
    """Compute capability major of the current CUDA device (0 without one or when interpreting)."""
    if interpreting() or not torch.cuda.is_available():
        return 0
    return device_capability(torch.device("cuda", torch.cuda.current_device()))[0]


def autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("OLMOE_SPATTN_AUTOTUNE", "1") != "0"


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}


def band_bucket(extent: int) -> int:
    """Coarse band-width class used in the tuning key: 0 (<= 512), 1 (<= 2048), 2 (longer)."""
    return 0 if extent <= 512 else (1 if extent <= 2048 else 2)


def tuning_key(block_d: int, extent: int, is_varlen: bool) -> int:
    return block_d * 100 + band_bucket(extent) * 10 + int(is_varlen)


# --------------------------------------------------------------------------- fixed choices
def row_major_store(kind: str, block_d: int, extent: int) -> bool:
    """Whether the Gluon kernel ``kind`` (fwd_sm90 | fwd_sm90_ws | dq_sm90 | dkdv_sm90) stores its
    output tile from a row-major register layout, after one trip through shared memory, instead of
    from the MMA layout. From the MMA layout a thread writes 4-byte pairs, half of every 32-byte
    sector; row-major, 16 contiguous bytes. Measured on an H200 (bf16, same bits either way): the
    forwards 1.00-1.26x and dQ 0.99-1.13x at every band width, dK/dV at head dim 128 1.02-1.39x
    (most where a program walks few query blocks); dK/dV at head dim 64 1.22x at 64 distances and
    1.09x at 129, but 0.95x at 513 and 0.90x on dense 1024."""
    if kind == "dkdv_sm90" and block_d < 128:
        return extent <= 256
    return True


def fixed_config(kind: str, block_d: int, extent: int) -> LaunchConfig:
    """The configuration used without autotuning. ``kind`` is fwd | dq | dkdv | dkdvdq | decode, or
    fwd_sm90 | fwd_sm90_ws | dq_sm90 | dkdv_sm90 for the Gluon Hopper kernels.

    Picked from per-kernel sweeps on an H100 (bf16; `olmoe-spattn bench sweep`). The backward at
    head dim 128 on SM90+ follows per-kernel sweeps on an H200 (`bench sweep --features`,
    ``NOTES.md``): bands wider than 4096 distances take deeper pipelines (dQ 1.10x on dense with
    TMA loads, dK/dV 1.02-1.04x), narrower ones the small dK/dV tiles (1.09-1.14x at 2049
    distances); the deep ones need Hopper's shared memory. The Gluon kernels (``*_sm90``) take one
    warpgroup per block and two blocks per SM (H200 sweeps). The dK/dV one steps 32 queries at a
    time at head dim 128, where it holds K in registers (11.7 vs 12.1 ms for the 64-query step at
    8193 distances, 8.04 vs 8.23 on dense 16384, 1.75 vs 1.81 at 2049); at head dim 64 it steps 32
    queries up to 4096 distances (1.81 vs 1.87 ms at 2049, 4.68 vs 5.13 ms at 4096) and 64 beyond.
    """
    if interpreting():  # small tiles: exercise multi-block logic on tiny shapes
        return LaunchConfig(16, 16, 4, 1)
    big_d = block_d > 128
    bucket = band_bucket(extent)
    if kind == "decode":
        return LaunchConfig(16, 64 if big_d else 128, 4, 2 if big_d else 3)
    if big_d:  # D up to 256: small tiles, shallow pipelines (shared memory)
        return LaunchConfig(32, 64, 4, 2) if kind in ("dkdv", "dkdvdq") else LaunchConfig(64, 32, 4, 2)
    if kind == "fwd_sm90":  # Gluon Hopper forward: block_m, block_n, warps, ring depth
        return LaunchConfig(64, 64, 4, 2)  # one warpgroup; two blocks fit an SM (H200 sweep, NOTES.md)
    if kind == "fwd_sm90_ws":  # warp-specialized forward: rows per consumer warpgroup, keys per tile
        return LaunchConfig(64, 128, 4, 2)  # 1.06-1.25x 64-key tiles on bands of 2049+ (H200)
    if kind == "dq_sm90":  # Gluon Hopper dQ: as the forward
        return LaunchConfig(64, 64, 4, 2)
    if kind == "dkdv_sm90":  # Gluon Hopper dK/dV: query step, keys per program, warps, ring depth
        return LaunchConfig(64, 64, 4, 2) if block_d < 128 and extent > 4096 else LaunchConfig(32, 64, 4, 2)
    if kind == "fwd":
        if bucket == 2:  # long bands, dense: big tiles, two warpgroups
            return LaunchConfig(128, 64, 8, 3)
        return LaunchConfig(64, 64, 4, 2)
    hopper = block_d == 128 and cuda_major() >= 9
    if kind == "dq":
        return LaunchConfig(128, 64, 8, 3) if hopper and extent > 4096 else LaunchConfig(64, 64, 4, 2)
    if kind in ("dkdv", "dkdvdq"):  # block_m = query step, block_n = keys per program
        if kind == "dkdv" and hopper:
            return LaunchConfig(64, 128, 8, 3) if extent > 4096 else LaunchConfig(32, 64, 4, 3)
        if bucket == 2 and block_d > 64:
            return LaunchConfig(64, 128, 8, 2)
        return LaunchConfig(32, 64, 4, 3)
    raise ValueError(f"unknown kernel kind {kind!r}")


# --------------------------------------------------------------------------- tuned spaces
_SPACE = {
    "fwd": [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
    "fwd_sm90": [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3)],
    "fwd_sm90_ws": [(64, 128, 4, 2), (64, 64, 4, 2), (64, 64, 4, 4)],
    "dq_sm90": [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)],
    "dkdv_sm90": [(64, 64, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2)],
    "dq": [(64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3)],
    "dkdv": [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3)],
    "dkdvdq": [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2)],
}


def _smem_bytes(kind: str, cfg: LaunchConfig, block_d: int) -> int:
    elt = 2
    if kind in ("dkdv", "dkdvdq", "dkdv_sm90"):  # resident K, V tile; streamed Q, dO
        return 2 * cfg.block_n * block_d * elt + cfg.num_stages * 2 * cfg.block_m * block_d * elt
    # resident Q and dO (the warp-specialized forward: two Q tiles); streamed K, V
    return 2 * cfg.block_m * block_d * elt + cfg.num_stages * 2 * cfg.block_n * block_d * elt


def candidates(kind: str, block_d: int, default: LaunchConfig) -> list[LaunchConfig]:
    """The default first, then the rest of the space that fits in shared memory."""
    out = [default]
    for entry in _SPACE[kind]:
        cfg = LaunchConfig(*entry)
        if cfg != default and _smem_bytes(kind, cfg, block_d) <= 200 * 1024:
            out.append(cfg)
    return out


#: Tuned choices so far: ``(kind, key) -> LaunchConfig``.
TUNED: dict[tuple, LaunchConfig] = {}
_ROUNDS = 3
_MIN_GAIN = 0.03


def pick(kind: str, key: tuple, default: LaunchConfig, block_d: int, run: Callable[[LaunchConfig], object]) -> LaunchConfig:
    """The configuration for ``(kind, key)``: cached, else timed (``run(cfg)`` launches once)."""
    cfg = TUNED.get((kind, key))
    if cfg is not None:
        return cfg
    cands = candidates(kind, block_d, default)
    if len(cands) > 1:
        fits = [default]
        for c in cands[1:]:  # compile and warm up; a GPU with less shared memory drops some
            try:
                run(c)
            except triton.runtime.errors.OutOfResources:
                continue
            fits.append(c)
        cands = fits
        run(default)
        times: dict[LaunchConfig, list[float]] = {c: [] for c in cands}
        for _ in range(_ROUNDS):
            for c in cands:
                times[c].append(triton.testing.do_bench(lambda c=c: run(c), warmup=5, rep=20, return_mode="median"))
        med = {c: statistics.median(t) for c, t in times.items()}
        best = min(cands, key=med.__getitem__)
        cfg = best if med[best] < (1.0 - _MIN_GAIN) * med[default] else default
    else:
        cfg = default
    TUNED[(kind, key)] = cfg
    return cfg
