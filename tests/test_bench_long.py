"""``bench train`` long-context options: --compile wiring (OLMo-core's apply_compile), activation
checkpointing, depth extrapolation (hand arithmetic) and the --preset long plan."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("olmo_core")

from olmoe_spattn.bench import train as bt  # noqa: E402
from olmoe_spattn.cli import main  # noqa: E402


def test_compile_and_checkpointing_are_applied_as_training_does(tmp_path, monkeypatch):
    """--compile calls OLMo-core's Transformer.apply_compile after its activation checkpointing.
    (Compiling for real on a CPU takes minutes, so the call is recorded instead; the GPU test
    tests/gpu/test_bench_long_gpu.py compiles for real.)"""
    from olmo_core.nn.transformer.model import Transformer

    calls: list[str] = []
    real_ac = Transformer.apply_activation_checkpointing
    monkeypatch.setattr(Transformer, "apply_compile", lambda self: calls.append("compile"))

    def ac(self, mode, *a, **k):
        calls.append(f"ac:{mode}")
        return real_ac(self, mode, *a, **k)

    monkeypatch.setattr(Transformer, "apply_activation_checkpointing", ac)
    argv = ["bench", "train", "--model", "tiny", "--seq-len", "32", "--batch", "2", "--patterns", "exclusive_bands",
            "--backend", "torch", "--steps", "1", "--rounds", "1", "--warmup", "1", "--device", "cpu",
            "--out-dir", str(tmp_path), "--compile", "--activation-checkpointing", "attention"]
    assert main(argv) == 0
    assert calls == ["ac:selected_modules", "compile"]
    (row,) = json.loads((tmp_path / "train_bench.json").read_text())["settings"]
    assert row["compile"] is True and row["activation_checkpointing"] == "attention"
    assert row["tokens_per_s"]["exclusive_bands"] > 0 and 0 < row["attention_share"] <= 1
    md = (tmp_path / "train_bench.md").read_text()
    assert "| tiny | 2 | 32 | 2 | yes | attention | exclusive_bands |" in md and "--compile" in md


def _row(layers: int, dense: float, band: float, attn_dense: float, attn_band: float) -> bt.Setting:
    s = bt.Setting("olmoe-1b-7b", layers, 1024, 2, n_heads=16, head_dim=128)
    s.step_ms = {"dense": dense, "exclusive_bands": band}
    s.attn_ms = {"dense": attn_dense * layers, "exclusive_bands": attn_band * layers}
    return s


def test_extrapolation_matches_hand_arithmetic():
    a, b = _row(2, 100.0, 90.0, 10.0, 2.0), _row(4, 160.0, 134.0, 10.0, 2.0)
    out = bt.extrapolate(a, b, 16, ["exclusive_bands"])
    # dense: 30 ms per layer, 40 fixed -> 40 + 16*30 = 520; band: 22 per layer, 46 fixed -> 398
    assert out.step_ms == pytest.approx({"dense": 520.0, "exclusive_bands": 398.0})
    assert out.tokens_per_s["dense"] == pytest.approx(2 * 1024 / 0.520)
    assert out.speedup["exclusive_bands"] == pytest.approx(520 / 398)
    assert out.attn_ms == pytest.approx({"dense": 160.0, "exclusive_bands": 32.0})
    share = 160 / 520
    assert out.attention_share == pytest.approx(share)
    assert out.amdahl_bound["exclusive_bands"] == pytest.approx(1 / (1 - share + share * 32 / 160))
    assert out.extrapolated_from == [2, 4] and out.layers == 16
    with pytest.raises(ValueError, match="two depths"):
        bt.extrapolate(b, a, 16, ["exclusive_bands"])


def test_long_preset_plans_full_depth_only_where_it_fits(monkeypatch):
    import argparse

    fits = {16384: "selected_ops", 32768: None, 65536: None}
    monkeypatch.setattr(bt, "fits_one_device", lambda model, layers, seq, batch, ac, device: fits[seq] == ac)
    args = argparse.Namespace(preset="long", activation_checkpointing=None)
    plan = bt._plan(args, torch.device("cuda"))
    assert plan == [
        ("olmoe-1b-7b", 0, 16384, 1, "selected_ops", None),  # full recipe depth, checkpointed
        ("olmoe-1b-7b", 2, 32768, 1, "none", 16),             # 2 and 4 layers, extrapolated to 16
        ("olmoe-1b-7b", 2, 65536, 1, "none", 16),
    ]


def test_fits_one_device_uses_the_memory_estimate(monkeypatch):
    class Props:
        total_memory = 141 * 10**9

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    cuda = torch.device("cuda")
    assert bt.fits_one_device("olmoe-1b-7b", 2, 65536, 1, "none", cuda)
    assert not bt.fits_one_device("olmoe-1b-7b", None, 65536, 1, "selected_ops", cuda)  # 16 layers: >110 GB states
    assert bt.fits_one_device("olmoe-1b-7b", None, 65536, 1, "none", torch.device("cpu"))


def test_extrapolate_to_needs_smaller_layers():
    assert main(["bench", "train", "--model", "tiny", "--extrapolate-to", "2", "--layers", "2", "--device", "cpu"]) == 2
