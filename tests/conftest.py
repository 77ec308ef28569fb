"""Shared pytest set-up: GPU-marked tests run only where CUDA is available, and without a
GPU the Triton kernels run through Triton's CPU interpreter."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel is defined (i.e. before olmoe_spattn.kernels loads).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m gpu on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def no_replays(monkeypatch):
    """Every kernel call takes the ordinary launch path instead of replaying an earlier call's
    launches (``olmoe_spattn/kernels/replay.py``): for tests that force a launch configuration by
    replacing ``launch.fixed_config``, or count the steps of that path."""
    from olmoe_spattn.kernels import replay

    monkeypatch.setattr(replay, "enabled", lambda: False)
