"""Fake Triton kernels and driver for CPU tests of the launch path (``kernels/direct_launch.py``,
``kernels/replay.py``): they record whether a launch went through Triton's path or straight to the
compiled kernel, and with which arguments."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import triton.language as tl

from olmoe_spattn.kernels import direct_launch


class FakeCompiled:
    """A compiled kernel: ``kernel[grid](*args, stream=...)`` is its launcher."""

    def __init__(self, log: list):
        self.log = log

    def run(self, *args):  # present on Triton's compiled kernels; not called here
        raise AssertionError("launches go through kernel[grid]")

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            self.log.append(("direct", grid, args, stream))

        return runner


class FakeJit:
    """A JIT kernel over ``fn``: ``kernel[grid](*args, **kwargs)`` is Triton's path."""

    def __init__(self, fn):
        self.fn = fn
        self.params = [SimpleNamespace(is_constexpr="constexpr" in str(p.annotation))
                       for p in inspect.signature(fn).parameters.values()]
        self.log: list = []
        self.compiled = FakeCompiled(self.log)

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return self.compiled

        return call


def kernel_fn(x_ptr, n, scale, BLOCK: tl.constexpr = 16, FLAG: tl.constexpr = False, MODE: tl.constexpr = 3):  # noqa: N803
    """The fake kernel's signature: three runtime arguments, then constexprs with defaults."""


class FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234 + device


def set_gpu_path(monkeypatch) -> None:
    """The launcher as on a GPU: not interpreting, enabled, an empty cache, a fake driver."""
    monkeypatch.setattr(direct_launch, "interpreting", lambda: False)
    monkeypatch.setattr(direct_launch, "ENABLED", True)
    monkeypatch.setattr(direct_launch, "_driver", FakeDriver)
    monkeypatch.setattr(direct_launch, "_COMPILED", {})
    monkeypatch.setattr(direct_launch, "_CONSTEXPR_POSITIONS", {})
