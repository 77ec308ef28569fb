"""Can FlashAttention-4 run this call? Installation, GPU generation, dtype and head_dim.

Every answer here is cheap and cached, and the two environment probes are marked as
constants for ``torch.compile`` (they run once, eagerly, while a graph is traced).
"""

from __future__ import annotations

import functools

import torch

#: installs flash-attn-4 and its CuTe DSL packages
INSTALL_HINT = 'pip install "olmoe-spattn[fa4]"'
FA4_DTYPES = (torch.float16, torch.bfloat16)
#: GPU generations (compute capability major) whose FA4 kernels take a mask_mod with block
#: sparsity in both passes: Hopper (9) and datacenter Blackwell (10, 11)
FA4_ARCH_MAJORS = (9, 10, 11)


@torch.compiler.assume_constant_result
def fa4_import_error() -> str:
    """``""`` when ``flash_attn.cute`` (flash-attn-4) imports, else why not."""
    return _import_error()


@functools.cache
def _import_error() -> str:
    try:
        import flash_attn.cute  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken CuTe DSL install
        return f"{type(err).__name__}: {str(err)[:200]}"
    return ""


@torch.compiler.assume_constant_result
def device_arch(device_index: int) -> int:
    """Compute capability of CUDA device ``device_index`` as ``10 * major + minor`` (90 = H100/H200)."""
    return _device_arch(device_index)


@functools.cache
def _device_arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def head_dim_limits(arch: int) -> tuple[int, int]:
    """(smallest, largest) head_dim FA4's masked kernels take on ``arch`` (multiples of 8)."""
    return (8, 256) if arch // 10 == 9 else (8, 128)


def fa4_problem(q: torch.Tensor) -> tuple[str, str]:
    """``(kind, message)`` saying why FA4 cannot run attention on ``q [B, T, H, D]`` here.

    ``kind`` is ``""`` when it can, ``"missing"`` when flash-attn-4 is not importable, and
    ``"input"`` for a dtype, device, GPU generation or head_dim it does not take. Raises
    nothing (safe while ``torch.compile`` traces).
    """
    if q.dtype not in FA4_DTYPES:
        return "input", f"backend='fa4' takes dtypes float16 and bfloat16, got {q.dtype}"
    if q.device.type != "cuda":
        return "input", f"backend='fa4' needs CUDA tensors (an SM90+ NVIDIA GPU), got device {q.device}"
    why = fa4_import_error()
    if why:
        return "missing", f"backend='fa4' needs flash-attn-4, which is not importable here ({why}); {INSTALL_HINT}"
    index = q.device.index or 0  # CUDA tensors always carry their device index
    arch = device_arch(index)
    if arch // 10 not in FA4_ARCH_MAJORS:
        return "input", (
            f"backend='fa4' needs an NVIDIA GPU of compute capability 9.0 (Hopper), 10.x or 11.x "
            f"(Blackwell), got {arch // 10}.{arch % 10}; use backend='triton'"
        )
    lo, hi = head_dim_limits(arch)
    d = q.shape[-1]
    if not (lo <= d <= hi and d % 8 == 0):
        return "input", (
            f"backend='fa4' takes head_dim {lo}..{hi} in multiples of 8 on compute capability "
            f"{arch // 10}.{arch % 10}, got head_dim={d}; use backend='triton'"
        )
    return "", ""


def check_fa4(q: torch.Tensor) -> None:
    """Raises when FA4 cannot run attention on ``q`` here: ``ImportError`` (naming the extra
    that installs it) when flash-attn-4 is missing, ``ValueError`` otherwise."""
    kind, message = fa4_problem(q)
    if kind == "missing":
        raise ImportError(message)
    if kind:
        raise ValueError(message)
