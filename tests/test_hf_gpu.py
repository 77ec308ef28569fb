"""GPU: the converted HF model runs band attention through the Triton kernel (CUDA only)."""

from __future__ import annotations

import hf_helpers as H
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("pattern", ["spattention", "exclusive_bands"])
def test_triton_path_matches_torch_path_and_cache(pattern, monkeypatch):
    import olmoe_spattn.hf.attention as attn

    calls = []
    real = attn.band_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(attn, "band_attention", spy)
    model = H.hf_tiny_model(pattern).cuda()  # fp32: the kernel uses IEEE dots
    ids = torch.randint(2, H.VOCAB, (2, 3 * H.PARTITION_LEN), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    triton_logits = H.hf_logits(model, ids)
    assert calls and set(calls) == {"auto"}
    model.config.attention_backend = "torch"
    torch_logits = H.hf_logits(model, ids)
    torch.testing.assert_close(triton_logits, torch_logits, rtol=1e-4, atol=1e-4)
    model.config.attention_backend = "auto"
    prompt = ids[:1, :6]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=2 * H.PARTITION_LEN, do_sample=False, use_cache=True)
    assert torch.equal(cached, H.greedy_by_full_forward(model, prompt, 2 * H.PARTITION_LEN))
