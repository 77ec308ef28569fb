"""transformers generation with band attention: KV cache == full forward passes (CPU)."""

from __future__ import annotations

import hf_helpers as H
import pytest
import torch

from olmoe_spattn.bands import PATTERNS

NEW_TOKENS = 3 * H.PARTITION_LEN  # decoding runs well past the partition length


def _prompt(batch: int = 1, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, H.VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_generate_with_cache_equals_full_forward_greedy(pattern):
    model = H.hf_tiny_model(pattern)
    prompt = _prompt()
    reference = H.greedy_by_full_forward(model, prompt, NEW_TOKENS)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    assert torch.equal(cached, reference)
    assert torch.equal(uncached, reference)


@pytest.mark.parametrize("pattern", ["spattention", "exclusive_bands"])
def test_cached_logits_equal_full_forward_logits(pattern):
    """Step-by-step decoding logits vs one full pass (tight fp32 tolerance)."""
    from transformers import DynamicCache

    model = H.hf_tiny_model(pattern)
    ids = _prompt(length=2 * H.PARTITION_LEN + 3, seed=1)
    full = H.hf_logits(model, ids)
    cache = DynamicCache(config=model.config)
    steps = []
    with torch.no_grad():
        out = model(ids[:, :5], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_padded_batch_matches_single_sequences():
    """Left padding (generation) and right padding (scoring) keep every sequence's band."""
    model = H.hf_tiny_model("spattention")
    long, short = _prompt(length=22, seed=2)[0], _prompt(length=9, seed=3)[0]
    pad = model.config.pad_token_id
    # right padding: logits of the real positions
    ids = torch.full((2, 22), pad)
    mask = torch.zeros(2, 22, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, :9], mask[1, :9] = short, 1
    batched = H.hf_logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(batched[0], H.hf_logits(model, long[None])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1, :9], H.hf_logits(model, short[None])[0], rtol=1e-5, atol=1e-5)
    # left padding: greedy generation per row equals the unpadded row's
    ids = torch.full((2, 22), pad)
    mask = torch.zeros(2, 22, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, 13:], mask[1, 13:] = short, 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
        one = model.generate(short[None], max_new_tokens=20, do_sample=False)
    assert torch.equal(out[1, 22:], one[0, 9:])
    assert torch.equal(out[0], model.generate(long[None], max_new_tokens=20, do_sample=False)[0])


def test_dynamic_partition_refuses_kv_cache_and_recomputes_without():
    model = H.hf_tiny_model("spattention", partition_len="dynamic")
    prompt = _prompt(length=8, seed=4)
    with pytest.raises(ValueError, match="dynamic"), torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    with torch.no_grad():
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(uncached, H.greedy_by_full_forward(model, prompt, 12))


def test_dynamic_partition_refuses_padding():
    model = H.hf_tiny_model("exclusive_bands", partition_len="dynamic")
    ids = _prompt(batch=2, length=10, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with pytest.raises(ValueError, match="padded"):
        H.hf_logits(model, ids, attention_mask=mask)


def test_hf_band_attention_matches_float64_oracle():
    """The registered attention function vs reference_attention, GQA and a KV-cache offset."""
    from olmoe_spattn.bands import BandSpec
    from olmoe_spattn.hf.attention import band_attention_forward
    from olmoe_spattn.reference import reference_attention

    model = H.hf_tiny_model("gapped_bands")
    module = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 5, 16, generator=gen)  # [B, H, Tq, D]
    k = torch.randn(2, 2, 37, 16, generator=gen)  # [B, Hkv, Tk, D]
    v = torch.randn(2, 2, 37, 16, generator=gen)
    out, _ = band_attention_forward(module, q, k, v, None, scaling=0.25)
    spec = BandSpec("gapped_bands", 4, H.PARTITION_LEN)
    ref, _ = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spec, scale=0.25)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the padded (masked) path gives the same numbers when nothing is padded
    allowed = torch.ones(2, 1, 5, 37, dtype=torch.bool)
    masked, _ = band_attention_forward(module, q, k, v, allowed, scaling=0.25)
    torch.testing.assert_close(masked.double(), ref, rtol=1e-5, atol=1e-5)
