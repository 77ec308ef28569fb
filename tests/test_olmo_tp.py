"""Tensor parallelism on CPU (torchrun, gloo, 2 ranks): OLMo-core shards the heads of a band
layer, each rank computes its global heads' bands (head_offset), and the output equals the
unsharded layer's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

WORKER = r'''
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from olmoe_spattn.olmo.config import BandAttentionConfig

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
config = BandAttentionConfig(n_heads=4, bias=False, band_pattern=sys.argv[1], partition_len=32, band_backend="torch")
layer = config.build(32, layer_idx=0, n_layers=1)
for p in layer.parameters():
    torch.nn.init.normal_(p, std=0.2)
x = torch.randn(2, 40, 32)
with torch.no_grad():
    full = layer(x)
layer.apply_tp(init_device_mesh("cpu", (2,)))
assert layer.backend.head_offset == 2 * rank, layer.backend.head_offset
with torch.no_grad():
    out = layer(x)
out = out.full_tensor() if hasattr(out, "full_tensor") else out
err = (out - full).abs().max().item()
print(f"rank {rank} head_offset {layer.backend.head_offset} max err {err:.2e}", flush=True)
assert err < 1e-5, err
dist.destroy_process_group()
'''


@pytest.mark.parametrize("pattern", ["exclusive_bands", "spattention"])
def test_tensor_parallel_band_layer_matches_unsharded(tmp_path, pattern):
    script = tmp_path / "tp_worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), pattern]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "rank 1 head_offset 2" in out.stdout
