"""Table 2 baselines (Longformer, BigBird, Reformer-like) as FlexAttention masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from olmoe_spattn.flex import BASELINES, baseline_mask_mod, dense_mask_from_mod, flex_baseline_attention


def test_longformer_window_and_global_tokens():
    n = 1024
    mask = dense_mask_from_mod(baseline_mask_mod("longformer", n), 1, n, n)[0]
    window, n_global = 256, 16
    i, j = 900, 900 - window
    assert mask[i, j + 1] and not mask[i, j]  # window edge
    assert mask[i, n_global - 1] and not mask[i, n_global]  # global keys
    assert not mask[5, 6]  # causal
    row = 1000
    assert mask[row].sum().item() == window + n_global


def test_bigbird_has_window_globals_and_random_links_that_vary_by_head():
    n = 2048
    mask = dense_mask_from_mod(baseline_mask_mod("bigbird", n), 2, n, n)
    assert mask[0, 1500, 1500 - 127] and mask[0, 1500, 0]
    assert not mask[0, 3, 4]
    far = mask[:, 1500, : 1500 - 128].clone()
    far[:, :8] = False
    assert far.any()  # random-like long-range links beyond the window and globals
    assert not torch.equal(mask[0], mask[1])


def test_reformer_like_buckets_are_symmetric_and_causal():
    n = 512
    mask = dense_mask_from_mod(baseline_mask_mod("reformer", n), 2, n, n)
    assert torch.all(mask.diagonal(dim1=1, dim2=2))
    assert not torch.any(mask & ~torch.ones(n, n, dtype=torch.bool).tril())
    lower = mask[0] | mask[0].T
    # same bucket is an equivalence relation: i~j and j~k implies i~k (checked on a sample)
    assert torch.equal(lower[:64, :64].float() @ lower[:64, :64].float() > 0, lower[:64, :64])
    assert 0.001 < mask[0].float().mean().item() < 0.1


@pytest.mark.parametrize("name", BASELINES)
def test_flex_baseline_attention_matches_masked_sdpa(name):
    t, h = 300, 2
    q, k, v = (torch.randn(1, t, h, 16) for _ in range(3))
    mask = dense_mask_from_mod(baseline_mask_mod(name, t), h, t, t)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    got = flex_baseline_attention(q, k, v, name)
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-5)


def test_unknown_baseline():
    with pytest.raises(ValueError, match="'linformer'"):
        baseline_mask_mod("linformer", 64)
