"""The direct relaunch of compiled kernels (``kernels/direct_launch.py``), on the CPU.

A fake JIT function stands in for a Triton kernel: it records whether a launch went through
Triton's path (binding, specialization, cache lookup) or straight to the compiled kernel, and with
which arguments. The GPU test ``tests/gpu/test_direct_launch_gpu.py`` runs the real kernels both
ways and compares their outputs bit for bit.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton.language as tl
from fake_triton import FakeJit, kernel_fn, set_gpu_path
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.tools.tensor_descriptor import TensorDescriptor

from olmoe_spattn.kernels import direct_launch


@pytest.fixture
def on_gpu_path(monkeypatch):
    set_gpu_path(monkeypatch)


def _kinds(log):
    return [entry[0] for entry in log]


def test_a_repeat_call_goes_straight_to_the_compiled_kernel(on_gpu_path):
    jit = FakeJit(kernel_fn)
    x = torch.zeros(64, dtype=torch.float16)
    for _ in range(3):
        direct_launch.launch(jit, (4, 2, 1), x, 100, 0.5, MODE=7, BLOCK=32, num_warps=4)
    assert _kinds(jit.log) == ["triton", "direct", "direct"]
    _, grid, args, stream = jit.log[1]
    # positional arguments, then every later parameter in signature order: kwargs, else defaults;
    # launch options (num_warps) are not parameters
    assert grid == (4, 2, 1) and stream == 1234
    assert args[:3] == (x, 100, 0.5) and args[3:] == (32, False, 7)
    assert jit.log[0][3] == {"MODE": 7, "BLOCK": 32, "num_warps": 4}


def test_a_call_that_specializes_differently_takes_tritons_path(on_gpu_path):
    jit = FakeJit(kernel_fn)
    x = torch.zeros(64, dtype=torch.float16)
    base = ((x, 100, 0.5), {"BLOCK": 32})
    changed = [
        ((x, 112, 0.5), {"BLOCK": 32}),  # an integer now divisible by 16
        ((x, 1, 0.5), {"BLOCK": 32}),  # an integer equal to 1
        ((x, 2**31 + 4, 0.5), {"BLOCK": 32}),  # an integer past 32 bits
        ((x, True, 0.5), {"BLOCK": 32}),  # a bool where an int was
        ((x[1:], 100, 0.5), {"BLOCK": 32}),  # data not 16-byte aligned
        ((x.float(), 100, 0.5), {"BLOCK": 32}),  # dtype
        ((x, 100, 0.5), {"BLOCK": 64}),  # a constexpr
        ((x, 100, 0.5), {"BLOCK": 32, "num_warps": 8}),  # a launch option
    ]
    for args, kwargs in [base, *changed]:
        direct_launch.launch(jit, (1,), *args, **kwargs)
    assert _kinds(jit.log) == ["triton"] * 9
    direct_launch.launch(jit, (2,), x, 100, 0.75, BLOCK=32)  # another grid; floats are not specialized
    assert jit.log[-1][:2] == ("direct", (2,))
    y = torch.ones(64, dtype=torch.float16)  # another aligned tensor of the same dtype
    direct_launch.launch(jit, (1,), y, 100, 0.5, BLOCK=32)
    assert jit.log[-1][0] == "direct" and jit.log[-1][2][0] is y


def test_a_new_integer_of_the_same_class_goes_direct(on_gpu_path):
    """A decode step's position or a new document length: a new value that Triton specializes the
    same way (not 1, the same divisibility by 16, the same width) reuses the compiled kernel."""
    jit = FakeJit(kernel_fn)
    x = torch.zeros(64, dtype=torch.float16)
    for n in (100, 101, 102, 103, 1000001):
        direct_launch.launch(jit, (1,), x, n, 0.5)
    assert _kinds(jit.log) == ["triton", "direct", "direct", "direct", "direct"]
    assert jit.log[-1][2][1] == 1000001
    assert len(direct_launch._COMPILED) == 2  # the first call's exact and class keys only


def test_a_positional_constexpr_is_keyed_by_value(on_gpu_path):
    def positional_constexpr(x_ptr, n, WIDTH: tl.constexpr, BLOCK: tl.constexpr = 16):  # noqa: N803
        pass

    jit = FakeJit(positional_constexpr)
    x = torch.zeros(64)
    for width in (3, 5, 5):
        direct_launch.launch(jit, (1,), x, 7, width)
    assert _kinds(jit.log) == ["triton", "triton", "direct"]


def test_descriptors_are_keyed_by_their_geometry(on_gpu_path):
    jit = FakeJit(kernel_fn)
    x = torch.zeros(64, 64, dtype=torch.float16)
    z = torch.zeros(64, 64, dtype=torch.float16)
    for desc in (TensorDescriptor(x, [64, 64], [64, 1], [16, 16]), TensorDescriptor(x, [64, 64], [64, 1], [32, 16]),
                 TensorDescriptor(x, [32, 64], [64, 1], [16, 16]), TensorDescriptor(z, [64, 64], [64, 1], [16, 16])):
        direct_launch.launch(jit, (1,), desc, 1, 0.5)
    assert _kinds(jit.log) == ["triton", "triton", "triton", "direct"]


def test_unknown_arguments_and_the_interpreter_take_tritons_path(on_gpu_path, monkeypatch):
    jit = FakeJit(kernel_fn)
    for _ in range(2):
        direct_launch.launch(jit, (1,), [1, 2], 100, 0.5)  # a list: no fingerprint
    assert _kinds(jit.log) == ["triton", "triton"]
    x = torch.zeros(64)
    monkeypatch.setattr(direct_launch, "interpreting", lambda: True)
    for _ in range(2):
        direct_launch.launch(jit, (1,), x, 100, 0.5)
    monkeypatch.setattr(direct_launch, "interpreting", lambda: False)
    monkeypatch.setattr(direct_launch, "ENABLED", False)
    for _ in range(2):
        direct_launch.launch(jit, (1,), x, 100, 0.5)
    assert _kinds(jit.log) == ["triton"] * 6
    assert direct_launch._COMPILED == {}


def test_a_parameter_without_value_or_default_is_not_cached(on_gpu_path):
    def needs_all(x_ptr, n, BLOCK):  # noqa: N803
        pass

    jit = FakeJit(needs_all)
    x = torch.zeros(64)
    for _ in range(2):
        direct_launch.launch(jit, (1,), x, 3)  # BLOCK missing: Triton's path reports it
    assert _kinds(jit.log) == ["triton", "triton"]


def test_an_entry_serves_only_the_kernel_that_made_it(on_gpu_path):
    """Keys hold a kernel's ``id``; an entry left by a kernel since freed (whose ``id`` another
    kernel now has) is not used, and neither are its constexpr positions."""
    jit, other = FakeJit(kernel_fn), FakeJit(kernel_fn)
    x = torch.zeros(64)
    direct_launch.launch(jit, (1,), x, 3, 0.5)
    key = direct_launch.call_key(jit, 0, (x, 3, 0.5), {})
    assert direct_launch._lookup(jit, key) is not None
    assert direct_launch._lookup(other, key) is None
    direct_launch._CONSTEXPR_POSITIONS[id(other)] = (jit, frozenset({0}))  # as if ``other`` reused an id
    assert direct_launch.constexpr_positions(other) == frozenset({3, 4, 5})


def test_the_cache_is_cleared_when_full(on_gpu_path, monkeypatch):
    monkeypatch.setattr(direct_launch, "MAX_ENTRIES", 3)
    jit = FakeJit(kernel_fn)
    dtypes = (torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.int32)
    for dtype in dtypes:  # two keys per new call: full at the third and the fifth, then cleared
        direct_launch.launch(jit, (1,), torch.zeros(64, dtype=dtype), 3, 0.5)
    assert len(direct_launch._COMPILED) == 2
    direct_launch.launch(jit, (1,), torch.zeros(64, dtype=torch.int32), 3, 0.5)
    assert _kinds(jit.log) == ["triton"] * 5 + ["direct"]


def _specialization(arg):
    return native_specialize_impl(BaseBackend, arg, False, True, True)


def test_equal_fingerprints_mean_equal_triton_specializations():
    """Every pair of arguments with the same fingerprint specializes the same in Triton (so one
    compiled kernel serves both); different specializations never share a fingerprint."""
    buf = torch.zeros(4096, dtype=torch.float16)
    tensors = [buf[i:] for i in (0, 1, 8, 16)] + [buf.float()[i:] for i in (0, 4)] + [buf.to(torch.bfloat16)]
    descs = [TensorDescriptor(buf.view(64, 64), [64, 64], [64, 1], [b, 16]) for b in (16, 32)]
    descs += [TensorDescriptor(buf.float().view(64, 64), [64, 64], [64, 1], [16, 16])]
    ints = [0, 1, 2, 15, 16, 17, 32, 2**31 - 1, 2**31, 2**32, -1, -16]
    args = [*ints, True, False, 0.5, 2.0, None, *tensors, *descs]
    for a, b in itertools.combinations(args, 2):
        if direct_launch.fingerprint(a) == direct_launch.fingerprint(b):
            assert _specialization(a) == _specialization(b), (a, b)
    for a in args:
        assert direct_launch.fingerprint(a) is not direct_launch.UNKEYABLE
    more_ints = [*ints, 3, 48, 2**31 - 16, 2**40 + 1, 2**63 - 1, 2**63, 2**64 - 16, -(2**31), -(2**31) - 1]
    for a, b in itertools.combinations(more_ints, 2):
        if direct_launch.integer_class(a) == direct_launch.integer_class(b):
            assert _specialization(a) == _specialization(b), (a, b)
