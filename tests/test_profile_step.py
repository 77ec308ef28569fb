"""``benchmarks/profile_step.py``: the step a profiler or a clock reading wraps.

On the CPU it runs the same forward+backward it hands to Nsight Compute on a GPU: the step must
produce the backend's gradients (checked against autograd through the float64 reference), and
bad arguments must stop with a message naming the value.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from olmoe_spattn import BandSpec
from olmoe_spattn.reference import reference_attention

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "profile_step.py")
profile_step = importlib.util.module_from_spec(spec)
sys.modules["profile_step"] = profile_step
spec.loader.exec_module(profile_step)


def test_step_computes_the_backends_gradients():
    shape = (1, 4, 37, 16)  # T odd, T % H != 0
    forward, step, (q, k, v, grad_out) = profile_step.make_step(shape, "spattention", "torch", "cpu", torch.float64)
    ref, _ = reference_attention(q, k, v, BandSpec("spattention", 4, 37))
    torch.testing.assert_close(forward(), ref)
    for got, want in zip(step(), torch.autograd.grad(ref, (q, k, v), grad_out), strict=True):
        torch.testing.assert_close(got, want)


def test_cpu_run_prints_one_line_per_backend(capsys):
    profile_step.main(["--device", "cpu", "--shape", "1,4,24,8", "--pattern", "exclusive_bands",
                       "--backends", "torch", "--dtype", "float32"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["1,4,24,8 exclusive_bands torch: one forward+backward done"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cpu", "--shape", "1,4,64"], "shape '1,4,64' must be four positive integers"),
        (["--device", "cpu", "--shape", "1,4,64,8;2,4,64,8"], "--shape takes one B,H,T,D shape"),
        (["--device", "cpu", "--clocks", "1"], "--clocks reads nvidia-smi: it needs --device cuda"),
    ],
)
def test_bad_arguments_name_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        profile_step.main(argv)
    assert message in capsys.readouterr().err
