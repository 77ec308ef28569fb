"""Expert matmuls through ``torch.nn.functional.grouped_mm`` (CUDA, bf16) instead of a Python loop.

``grouped_gemm`` (which OLMo-core's dropless MoE prefers) has no wheel on the package registry;
without it OLMo-core loops over the experts in Python with a host sync per layer. On an SM >= 80
GPU :func:`use_grouped_mm_moe` swaps each ``DroplessMoEMLP`` instance to
:class:`GroupedMMDroplessMoEMLP`, which overrides only ``gmm`` (same parameters, same math in
bf16, like ``grouped_gemm``). Used by ``olmoe-spattn bench train`` and optional elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from olmo_core.nn.moe.mlp import DroplessMoEMLP


class GroupedMMDroplessMoEMLP(DroplessMoEMLP):
    """``DroplessMoEMLP`` whose grouped GEMM is ``torch.nn.functional.grouped_mm`` (bf16)."""

    def gmm(self, x: torch.Tensor, w: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
        """``x [N, K]`` rows grouped by expert; ``w [E, *, *]``; returns ``[N, out]`` in bf16."""
        offs = torch.cumsum(batch_sizes.to(device=x.device), 0, dtype=torch.int32)  # [E]
        b = w.to(torch.bfloat16)
        b = b.transpose(1, 2) if trans_b else b  # [E, K, out]
        a = x.to(torch.bfloat16)  # [N, K]
        try:
            return F.grouped_mm(a, b, offs=offs)
        except RuntimeError:  # some layouts need a column-major right operand
            return F.grouped_mm(a, b.transpose(1, 2).contiguous().transpose(1, 2), offs=offs)


def grouped_mm_available(device: torch.device) -> bool:
    """True on CUDA devices of compute capability >= 8.0 with ``F.grouped_mm``."""
    return (
        device.type == "cuda"
        and hasattr(F, "grouped_mm")
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def use_grouped_mm_moe(model: torch.nn.Module) -> int:
    """Switches every ``DroplessMoEMLP`` in ``model`` to grouped_mm; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is DroplessMoEMLP:
            module.__class__ = GroupedMMDroplessMoEMLP
            count += 1
    return count
