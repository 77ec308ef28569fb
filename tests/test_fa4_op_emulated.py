"""The ``fa4`` custom op end to end on CPU, with FlashAttention-4 replaced by an emulator.

The emulator does what FA4's kernels are documented to do with what the op hands them:
causal attention, or attention restricted to the listed tiles, where *partial* tiles are
masked by the band ``mask_mod`` (evaluated as ``allowed_from_aux``) and *full* tiles are
not masked at all; the backward derives its mask from the backward (per key tile) tables.
So these tests check, without a GPU, the op's plumbing (plans, query offsets, documents,
GQA, autograd, fake implementations under ``torch.compile``) and that the tables' classes
are safe to use as FA4 uses them. The real kernels are checked in ``tests/gpu/test_fa4_gpu.py``.
"""

from __future__ import annotations

import math
import sys
import types
from typing import NamedTuple

import pytest
import torch
from attention_checks import CASES, max_err, reference_outputs

from olmoe_spattn import BandSpec
from olmoe_spattn.fa4 import blocks, op
from olmoe_spattn.fa4.op import fa4_band_attention

BAND, DOCS = object(), object()  # stand-ins for the two CuTe mask_mods


class _Sparse(NamedTuple):  # flash_attn.cute.block_sparsity.BlockSparseTensorsTorch's fields used here
    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor | None = None
    full_block_idx: torch.Tensor | None = None
    cu_total_m_blocks: torch.Tensor | None = None
    cu_block_idx_offsets: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None


def _tile_map(cnt, idx, n_cols):
    out = torch.zeros(*cnt.shape[1:], n_cols, dtype=torch.bool)  # [H, R, n_cols]
    for h in range(cnt.shape[1]):
        for r in range(cnt.shape[2]):
            out[h, r, idx[0, h, r, : cnt[0, h, r]].long()] = True
    return out


def _element_mask(q, k, causal, mask_mod, aux, sparse, transposed):
    """[H, Tq, Tk] allowed cells as FA4 would compute them from the op's arguments."""
    h, tq, tk = q.shape[2], q.shape[1], k.shape[1]
    if causal:
        return (torch.arange(tq)[:, None] + (tk - tq) >= torch.arange(tk)[None, :]).expand(h, tq, tk)
    assert mask_mod in (BAND, DOCS) and (mask_mod is DOCS) == (len(aux) == 2)
    qb, kb = sparse.block_size
    nq, nk = math.ceil(tq / qb), math.ceil(tk / kb)
    if transposed:  # backward tables: per key tile, its query tiles
        partial = _tile_map(sparse.mask_block_cnt, sparse.mask_block_idx, nq).transpose(1, 2)
        full = _tile_map(sparse.full_block_cnt, sparse.full_block_idx, nq).transpose(1, 2)
    else:
        partial = _tile_map(sparse.mask_block_cnt, sparse.mask_block_idx, nk)
        full = _tile_map(sparse.full_block_cnt, sparse.full_block_idx, nk)
    grow = lambda t: t.repeat_interleave(qb, 1).repeat_interleave(kb, 2)[:, :tq, :tk]  # noqa: E731
    return (grow(partial) & blocks.allowed_from_aux(tuple(aux), h, tq, tk)) | grow(full)


def _probs(q, k, mask, scale):
    """Softmax weights ``[B, H, Tq, Tk]`` (zero rows where nothing is allowed) and lse ``[B, H, Tq]``."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf on empty rows
    return torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None]), lse


def _fake_fwd(q, k, v, *, softmax_scale, causal, mask_mod, aux_tensors, block_sparse_tensors, return_lse):
    assert return_lse and q.is_contiguous() and k.is_contiguous()
    mask = _element_mask(q, k, causal, mask_mod, aux_tensors, block_sparse_tensors, transposed=False)
    p, lse = _probs(q, k, mask, softmax_scale)
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float()).to(q.dtype), lse, None, None, None


def _fake_bwd(q, k, v, out, dout, lse, *, softmax_scale, causal, mask_mod, aux_tensors, block_sparse_tensors):
    """Attention's gradient by its formula (autograd is off inside a custom op)."""
    mask = _element_mask(q, k, causal, mask_mod, aux_tensors, block_sparse_tensors, transposed=True)
    group = q.shape[2] // k.shape[2]
    p, _ = _probs(q, k, mask, softmax_scale)  # [B, H, Tq, Tk]
    kk, vv = (x.repeat_interleave(group, dim=2).float() for x in (k, v))
    do = dout.float()
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, vv)
    delta = (do * out.float()).sum(-1).transpose(1, 2)[..., None]  # [B, H, Tq, 1]
    ds = p * (dp - delta) * softmax_scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kk)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float())
    fold = lambda x: x.view(*x.shape[:2], k.shape[2], group, x.shape[-1]).sum(3)  # noqa: E731  GQA: sum a kv head's queries
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@pytest.fixture(autouse=True)
def fake_fa4(monkeypatch):
    """flash_attn.cute replaced by the emulator; CPU tensors and an SM90 'GPU' accepted."""
    interface = types.SimpleNamespace(_flash_attn_fwd=_fake_fwd, _flash_attn_bwd=_fake_bwd)
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    sparsity = types.ModuleType("flash_attn.cute.block_sparsity")
    sparsity.BlockSparseTensorsTorch = _Sparse
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.block_sparsity", sparsity)
    monkeypatch.setattr(op, "check_fa4", lambda q: None)
    monkeypatch.setattr(op, "device_arch", lambda index: 90)
    from olmoe_spattn.fa4 import masks

    monkeypatch.setattr(masks, "band_mask_mod", lambda: BAND)
    monkeypatch.setattr(masks, "document_band_mask_mod", lambda: DOCS)
    # tiny tiles, so these short sequences span many of them (partial, full and skipped)
    monkeypatch.setattr(op, "block_size_for", lambda arch, head_dim: (8, 4))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_and_backward_match_the_reference(case):
    q, k, v = case.tensors(torch.float32, requires_grad=True)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_outputs(case, q64, k64, v64)
    out = fa4_band_attention(q, k, v, case.spec, **case.kwargs())
    assert max_err(out, ref) < 1e-5
    g = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g.float()),
                          torch.autograd.grad(ref, (q64, k64, v64), g)):
        assert max_err(a, b) < 1e-4, f"d{name}"


def test_dense_default_offset_takes_the_causal_path(monkeypatch):
    seen = []
    monkeypatch.setattr(sys.modules["flash_attn.cute"].interface, "_flash_attn_fwd",
                        lambda *a, **kw: seen.append(kw["causal"]) or _fake_fwd(*a, **kw))
    q = torch.randn(1, 20, 2, 16)
    fa4_band_attention(q, q, q, BandSpec("dense", 2, 20))
    fa4_band_attention(q[:, :5], q, q, BandSpec("dense", 2, 20), q_offset=3)  # not bottom-right: mask path
    assert seen == [True, False]


def test_compiled_graph_uses_the_fake_implementations_and_autograd():
    spec = BandSpec("spattention", 4, 24)

    def layer(x, w):
        q, k, v = (x @ w).view(2, 37, 3, 4, 16).unbind(2)
        return fa4_band_attention(q, k, v, spec).sum(dim=(2, 3))

    x = torch.randn(2, 37, 32)
    w = torch.randn(32, 3 * 64, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x, w)
    (gw,) = torch.autograd.grad(y.square().sum(), w)
    y_eager = layer(x, w)
    (gw_eager,) = torch.autograd.grad(y_eager.square().sum(), w)
    assert max_err(y, y_eager) < 1e-5 and max_err(gw, gw_eager) < 1e-4
