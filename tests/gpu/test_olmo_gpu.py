"""GPU checks of the OLMo-core integration (run on the device: ``pytest -m gpu tests/gpu``).

* the PyTorch MoE permutation (CPU path) equals OLMo-core's Triton permutation on the GPU;
* the grouped_mm expert matmuls equal OLMo-core's per-expert loop (bf16 tolerance);
* a 2-layer OLMoE-1B-7B trains a few steps with the band kernel (Triton, else Flex);
* ``olmoe-spattn train tiny`` runs on the GPU through OLMo-core's trainer;
* a compiled band model runs forward and backward.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - conftest skips gpu tests anyway
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from olmoe_spattn.api import triton_available  # noqa: E402
from olmoe_spattn.olmo import build_model, olmoe_config, tiny_model_config, use_olmo_core_moe, use_torch_moe  # noqa: E402
from olmoe_spattn.olmo.moe_cpu import TorchDroplessMLP  # noqa: E402

CUDA = torch.device("cuda")


def _band_backend() -> str:
    return "triton" if triton_available(CUDA) else "flex"


def test_torch_moe_path_matches_olmo_core_gpu_moe():
    torch.manual_seed(0)
    config = tiny_model_config("dense", 256, d_model=128, num_experts=8, top_k=2, expert_hidden_size=128)
    model = build_model(config, CUDA)  # OLMo-core's Triton permutation on CUDA
    moe = model.blocks["0"].feed_forward_moe
    assert not isinstance(moe.experts, TorchDroplessMLP)
    x = torch.randn(4, 64, 128, device=CUDA, requires_grad=True)

    def run():
        model.zero_grad(set_to_none=True)
        x.grad = None
        w, idx, bs, _ = moe.router(x)
        out = moe.experts(x, w, idx, bs)
        (out * torch.linspace(-1, 1, 128, device=CUDA)).sum().backward()
        return out.detach(), x.grad.clone(), moe.experts.mlp.w2.grad.clone(), moe.router.weight.grad.clone()

    want = run()
    assert use_torch_moe(model) == 2
    got = run()
    use_olmo_core_moe(model)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_grouped_mm_matches_olmo_core_loop():
    from olmoe_spattn.olmo.moe_grouped import (
        GroupedMMDroplessMoEMLP,
        grouped_mm_available,
        use_grouped_mm_moe,
    )

    if not grouped_mm_available(CUDA):
        pytest.skip("torch grouped_mm needs SM >= 80")
    torch.manual_seed(1)
    config = tiny_model_config("dense", 256, d_model=128, num_experts=8, top_k=2, expert_hidden_size=128)
    model = build_model(config, CUDA)
    mlp = model.blocks["0"].feed_forward_moe.experts.mlp
    sizes = torch.tensor([5, 0, 17, 3, 30, 1, 0, 8], device=CUDA)
    x = torch.randn(int(sizes.sum()), 128, device=CUDA)
    want = mlp(x, sizes.cpu())
    assert use_grouped_mm_moe(model) == 2 and isinstance(mlp, GroupedMMDroplessMoEMLP)
    got = mlp(x, sizes)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("pattern", ["spattention", "exclusive_bands"])
def test_reduced_olmoe_1b_7b_trains_with_band_kernel(pattern):
    """Two OLMoE-1B-7B blocks at seq 4096: the kernel backend's loss and attention-weight gradients
    equal the masked-SDPA reference backend's on the same weights and batch, then training on one
    batch lowers the loss."""
    from olmoe_spattn import BandSpec
    from olmoe_spattn.olmo.attention import set_model_attention
    from olmoe_spattn.olmo.moe_grouped import grouped_mm_available, use_grouped_mm_moe

    torch.manual_seed(0)
    backend = _band_backend()
    config = olmoe_config(
        vocab_size=50304, d_model=2048, n_layers=2, n_heads=16, num_experts=64, top_k=8,
        expert_hidden_size=1024, attention=pattern, partition_len=4096, backend=backend,
    )
    model = build_model(config, CUDA, max_seq_len=4096)
    if grouped_mm_available(CUDA):
        use_grouped_mm_moe(model)
    ids = torch.randint(0, 50280, (2, 4097), device=CUDA)

    def loss_and_grads(band_backend: str) -> tuple[float, list[torch.Tensor]]:
        set_model_attention(model, BandSpec(pattern, 16, 4096), band_backend)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        weights = [block.attention.w_q.weight for block in model.blocks.values()]
        grads = torch.autograd.grad(loss, weights)
        return loss.item(), [g.float() for g in grads]

    ref_loss, ref_grads = loss_and_grads("torch")
    loss, grads = loss_and_grads(backend)
    assert loss == pytest.approx(ref_loss, rel=2e-3), (loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        cos = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0).item()
        assert cos > 0.98 and (g.norm() / r.norm()).item() == pytest.approx(1.0, abs=0.05), cos

    optim = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    losses = []
    for _ in range(4):  # the same batch: the loss must fall
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print(f"{pattern} via {backend}: reference loss {ref_loss:.4f}, losses {losses}")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses


def _train_tiny(tmp_path, run: str, *extra: str) -> dict[int, float]:
    """``olmoe-spattn train tiny`` for 8 steps; per-step losses from metrics.jsonl."""
    from olmoe_spattn.olmo.train import read_metrics

    cmd = [
        sys.executable, "-m", "olmoe_spattn.cli", "train", "tiny",
        "--set", f"train.save_folder={tmp_path / run}",
        "--set", f"data.paths=[{tmp_path / 'tokens.npy'}]",
        "--set", f"data.tokenizer.identifier={tmp_path / 'tokenizer'}",
        "--set", "train.max_steps=8",
        "--set", "train.log_interval=1",
        *extra,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-4000:]
    assert "finished: step 8, loss" in out.stdout
    return {s: m["train/CE loss"] for s, m in read_metrics(tmp_path / run).items() if "train/CE loss" in m}


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> tuple[object, dict[int, float]]:
    """The same 8 tiny steps on CUDA with the masked-SDPA reference backend (fp32)."""
    tmp = tmp_path_factory.mktemp("tiny_gpu")
    return tmp, _train_tiny(tmp, "reference", "--set", "train.device=cuda", "--set", "attention_backend=torch")


@pytest.mark.parametrize("compile_model", [False, True])
def test_train_command_on_gpu(reference_losses, compile_model):
    """`olmoe-spattn train` on CUDA with the band kernel (optionally compiled) gives the reference
    backend's losses step by step. fp32 runs the kernel's dots in IEEE fp32, so the two differ by
    rounding only (rel 1e-4); the same steps with dense attention differ by 6e-4 to 1e-3."""
    tmp, reference = reference_losses
    losses = _train_tiny(
        tmp, f"kernel-compile-{compile_model}",
        "--set", "train.device=cuda",
        "--set", f"attention_backend={_band_backend()}",
        "--set", f"train.compile={str(compile_model).lower()}",
    )  # fmt: skip
    assert sorted(losses) == sorted(reference) == list(range(1, 9))
    for step in range(1, 9):
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), (step, losses, reference)


def test_compiled_band_attention_layer_matches_eager():
    """torch.compile traces the band layer (custom op / Flex) and gives eager's output and grads."""
    torch.manual_seed(0)
    config = tiny_model_config("spattention", 256, d_model=128, n_heads=4, partition_len=256, backend=_band_backend())
    layer = build_model(config, CUDA).blocks["0"].attention
    x = torch.randn(2, 256, 128, device=CUDA, requires_grad=True)
    compiled = torch.compile(layer)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = layer(x)
        out = compiled(x)
    torch.testing.assert_close(out.float(), eager.float(), atol=2e-2, rtol=2e-2)
    (g_eager,) = torch.autograd.grad(eager.float().square().sum(), x)
    (g_compiled,) = torch.autograd.grad(out.float().square().sum(), x)
    torch.testing.assert_close(g_compiled, g_eager, atol=5e-2, rtol=5e-2)


def test_compiled_band_model_trains():
    """A whole compiled OLMoE with band attention: fp32 forward equals eager (no bf16 routing
    flips), and backward gives finite gradients."""
    torch.manual_seed(0)
    config = tiny_model_config("spattention", 256, d_model=128, n_heads=4, partition_len=256, backend=_band_backend())
    model = build_model(config, CUDA)
    use_torch_moe(model)  # keep the MoE permutation compilable
    compiled = torch.compile(model)
    ids = torch.randint(0, 256, (2, 256), device=CUDA)
    eager = model(ids)
    out = compiled(ids)
    torch.testing.assert_close(out, eager, atol=2e-3, rtol=2e-3)
    out.float().logsumexp(-1).mean().backward()
    grad = model.blocks["0"].attention.w_q.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
