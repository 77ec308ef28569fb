"""On CUDA: NaN / Inf in keys and values that no query of a head attends reach no output
(compiled FlexAttention, the Triton kernel (also with its Gluon Hopper forwards) and FA4, bf16
and fp32; block-sized sequences so that fully masked and partially masked tiles both occur)."""

from __future__ import annotations

import math

import pytest
import torch

from olmoe_spattn import BandSpec, band_attention
from olmoe_spattn.bands import PATTERNS

pytestmark = pytest.mark.gpu


def _fa4_missing() -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from olmoe_spattn.fa4 import fa4_import_error

    return fa4_import_error() or ("" if torch.cuda.get_device_capability()[0] in (9, 10, 11) else "needs SM90+")


_FA4 = _fa4_missing()


@pytest.mark.parametrize(
    "backend", ["flex", "triton", "triton_gluon_fwd", "triton_gluon_ws", pytest.param("fa4", marks=pytest.mark.skipif(bool(_FA4), reason=_FA4 or "-"))]
)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_poison_in_unattended_keys_stays_out(backend, pattern, dtype, poison, monkeypatch):
    if backend in ("fa4", "triton_gluon_fwd", "triton_gluon_ws") and dtype == torch.float32:
        pytest.skip("FA4 and the Gluon Hopper forwards take 16-bit inputs only")
    if backend.startswith("triton_gluon"):  # the Triton backend with one of its Gluon Hopper forwards
        if torch.cuda.get_device_capability()[0] != 9:
            pytest.skip("the Gluon forwards run on SM90 only")
        monkeypatch.setenv("OLMOE_SPATTN_TRITON_FEATURES", backend.removeprefix("triton_"))
        backend = "triton"
    spec = BandSpec(pattern, 8, 256)
    t, h, h_kv = 384, 8, 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, t, n, 64, device="cuda", dtype=dtype, generator=gen) for n in (h, h_kv, h_kv))
    used = spec.mask(t, device="cuda").any(dim=1)  # [H, Tk]
    bad = ~used.t()  # [Tk, H]
    clean = band_attention(q, k, v, spec, backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, bad], v2[:, bad] = poison, poison
    out = band_attention(q, k2, v2, spec, backend)
    assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} non-finite outputs"
    torch.testing.assert_close(out, clean)
