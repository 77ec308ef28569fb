"""A pure-PyTorch token permutation for OLMo-core's dropless MoE, for machines without a GPU.

OLMo-core's ``ParallelDroplessMLP`` routes tokens to experts with autotuned Triton kernels
(``olmo_core.ops.moe.gather`` / ``scatter``), which need a GPU driver. This module computes the
same math with ``index_select`` / ``index_add_``:

    sorted slot p (tokens * top_k of them, sorted by expert) holds token ``indices[p] // top_k``;
    y_p  = expert_mlp(x[token_p])                       # OLMo-core's own expert MLP module
    out[t] = sum_{p : token_p = t} weight[indices[p]] * y_p

It is not a fork: :func:`use_torch_moe` swaps the class of each ``ParallelDroplessMLP`` instance
to :class:`TorchDroplessMLP`, a subclass overriding only ``permute_and_compute``; parameters, the
router, the expert MLP and the auxiliary losses are OLMo-core's. Expert parallelism is not
supported on this path.
"""

from __future__ import annotations

import torch
from olmo_core.nn.moe.parallel_mlp import ParallelDroplessMLP, ParallelMLP


class TorchDroplessMLP(ParallelDroplessMLP):
    """``ParallelDroplessMLP`` whose gather/scatter are plain PyTorch (runs on any device)."""

    def permute_and_compute(
        self,
        x: torch.Tensor,
        *,
        batch_size_per_expert: torch.Tensor,
        indices: torch.Tensor,
        bin_ids: torch.Tensor,
        expert_weights: torch.Tensor | None,
        bins: torch.Tensor,
        top_k: int,
    ) -> torch.Tensor:
        """``x [N, d]`` -> ``[N, d]``: gather by expert, run the experts, weighted scatter back."""
        del bin_ids, bins
        if self._expert_parallel_enabled:
            raise RuntimeError("the PyTorch MoE path does not support expert parallelism; use a GPU")
        x = x.view(-1, x.shape[-1])  # [N, d]
        slots = indices.long()  # [N * top_k], flattened (token, k) slot of each sorted row
        tokens = torch.div(slots, top_k, rounding_mode="floor")  # [N * top_k]
        routed = x.index_select(0, tokens)  # [N * top_k, d], grouped by expert
        out = self.mlp(routed, batch_size_per_expert)  # [N * top_k, d]
        if expert_weights is not None:
            out = out * expert_weights.index_select(0, slots).unsqueeze(-1).to(out.dtype)
        result = torch.zeros(x.shape[0], out.shape[-1], dtype=out.dtype, device=out.device)
        return result.index_add(0, tokens, out)  # [N, d]


def use_torch_moe(model: torch.nn.Module) -> int:
    """Switches every dropless MoE in ``model`` to the PyTorch token permutation.

    Returns the number of MoE layers switched. Raises ``ValueError`` for OLMo-core's capacity-based
    (``MoEType.default``) MoE, which has no PyTorch path here.
    """
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, ParallelMLP):
            raise ValueError(
                f"{name}: OLMo-core's capacity-based MoE (name: default) needs a GPU; use "
                "feed_forward_moe.name: dropless to train on a CPU"
            )
        if isinstance(module, ParallelDroplessMLP) and not isinstance(module, TorchDroplessMLP):
            module.__class__ = TorchDroplessMLP
            count += 1
    return count


def use_olmo_core_moe(model: torch.nn.Module) -> int:
    """Undoes :func:`use_torch_moe` (back to OLMo-core's Triton permutation); returns the count."""
    count = 0
    for module in model.modules():
        if isinstance(module, TorchDroplessMLP):
            module.__class__ = ParallelDroplessMLP
            count += 1
    return count
