"""Replaying a repeat call's launches (``kernels/replay.py``), on the CPU with fake kernels.

The GPU test ``tests/gpu/test_replay_gpu.py`` replays the real forward and backward paths and
compares them with the ordinary launch path bit for bit.
"""

from __future__ import annotations

import gc
import threading
import weakref
from types import SimpleNamespace

import pytest
import torch
import triton.language as tl
from fake_triton import FakeDriver, FakeJit, kernel_fn, set_gpu_path
from triton.tools.tensor_descriptor import TensorDescriptor

from olmoe_spattn import BandSpec
from olmoe_spattn.kernels import direct_launch, launch, replay
from olmoe_spattn.kernels.op import _problem
from olmoe_spattn.kernels.replay import NOT_REPLAYABLE, Replay, Replays, build, layout_key


@pytest.fixture
def on_gpu_path(monkeypatch):
    set_gpu_path(monkeypatch)
    monkeypatch.setattr(replay, "interpreting", lambda: False)


def pointer_fn(x_ptr, out_ptr, table_ptr, n, scale, BLOCK: tl.constexpr = 16, FLAG: tl.constexpr = False,  # noqa: N803
               MODE: tl.constexpr = 3):
    """A fake kernel over two tensors of the call and one of the Problem."""


def descriptor_fn(x_desc, cu_ptr, n, BLOCK: tl.constexpr = 16, FLAG: tl.constexpr = False,  # noqa: N803
                  PRECISION: tl.constexpr = "tf32"):
    """A fake kernel over a descriptor of the call and a tensor of the Problem (or a scratch buffer)."""


def _kernels():
    return FakeJit(pointer_fn), FakeJit(descriptor_fn)


def _problem_like():
    """What a replay needs of a Problem: its store and the tensors that live with it."""
    return SimpleNamespace(replays=Replays(), table=torch.zeros(4, dtype=torch.int32),
                           cu=torch.zeros(2, dtype=torch.int32))


def _slots(n=64):
    x, y, out = torch.randn(n, 16), torch.randn(n, 16), torch.empty(n, 16)
    return x, y, out


class Call:
    """One call's ordinary launch path: a pointer launch and a descriptor launch over its tensors."""

    def __init__(self, p, jit_a, jit_b, scratch=False):
        self.p, self.jit_a, self.jit_b, self.scratch = p, jit_a, jit_b, scratch
        self.ordinary = 0

    def __call__(self, slots, settings=("auto",)):
        x, y, out = slots
        found = replay.lookup(self.p, "fwd", settings, (x, y))

        def launches():
            self.ordinary += 1
            direct_launch.launch(self.jit_a, (4, 1, 1), x, out, self.p.table, 100, 0.5, BLOCK=32)
            extra = torch.empty(4) if self.scratch else self.p.cu  # a buffer the call makes, or the Problem's
            direct_launch.launch(self.jit_b, (2, 2, 1), TensorDescriptor(y, [64, 16], [16, 1], [16, 16]), extra, 7,
                                 FLAG=True)

        replay.launch_or_replay(found, (x, y), (out,), launches, (self.p.table, self.p.cu))


def test_a_repeat_call_replays_the_launches_with_its_own_tensors(on_gpu_path):
    p, (jit_a, jit_b) = _problem_like(), _kernels()
    call = Call(p, jit_a, jit_b)
    calls = [_slots() for _ in range(4)]
    for slots in calls:
        call(slots)
    # call 1 compiles (Triton's path, nothing kept), call 2 goes direct and is kept, calls 3-4 replay
    assert call.ordinary == 2
    assert [e[0] for e in jit_a.log] == ["triton", "direct", "direct", "direct"]
    for i, slots in enumerate(calls[2:], start=2):
        _, grid, args, stream = jit_a.log[i]
        assert grid == (4, 1, 1) and stream == 1234
        assert args[0] is slots[0] and args[1] is slots[2] and args[2] is p.table
        assert args[3:5] == (100, 0.5) and args[5:] == (32, False, 3)  # trailing constexprs and defaults
        _, grid, args, _ = jit_b.log[i]
        desc = args[0]
        assert grid == (2, 2, 1) and isinstance(desc, TensorDescriptor) and desc.base is slots[1]
        assert list(desc.block_shape) == [16, 16] and list(desc.shape) == [64, 16]
        assert args[1] is p.cu and args[2] == 7 and args[3:] == (16, True, "tf32")  # FLAG given, the others defaults


def test_a_call_with_a_buffer_of_its_own_is_not_replayed(on_gpu_path):
    """A tensor that is neither a slot nor the Problem's (scratch made inside the launch path) would
    be reused by every replay: such calls keep the ordinary path, and stop being recorded."""
    p = _problem_like()
    call = Call(p, *_kernels(), scratch=True)
    for _ in range(replay.MAX_ATTEMPTS + 3):
        call(_slots())
    assert call.ordinary == replay.MAX_ATTEMPTS + 3
    assert NOT_REPLAYABLE in p.replays._by_key.values()


def test_build_refuses_what_it_cannot_replay():
    x, y, out = _slots()
    kernel, owned = object(), (torch.zeros(2),)
    assert build([], (x, y), (out,), owned) is None
    assert build([(kernel, (1,), (x, 1)), None], (x, y), (out,), owned) is None  # a launch took Triton's path
    assert build([(kernel, (1,), (x, torch.zeros(3)))], (x, y), (out,), owned) is None  # a foreign tensor
    assert build([(kernel, (1,), (x, [y]))], (x, y), (out,), owned) is None  # a container of tensors
    assert build([(kernel, (1,), (x, {"a": (3, out)}))], (x, y), (out,), owned) is None
    assert build([(kernel, (1,), (x, y.untyped_storage()))], (x, y), (out,), owned) is None
    foreign = TensorDescriptor(torch.randn(64, 16), [64, 16], [16, 1], [16, 16])
    assert build([(kernel, (1,), (foreign,))], (x, y), (out,), owned) is None  # a descriptor over a foreign tensor
    kept = build([(kernel, (1,), (x, owned[0], 3, 0.5, True, None, "tf32", (16, 32)))], (x, y), (out,), owned)
    assert isinstance(kept, Replay) and kept.steps[0][2][2:] == (3, 0.5, True, None, "tf32", (16, 32))


def test_a_replay_keeps_no_tensor_of_the_recorded_call(on_gpu_path):
    x, y, out = _slots()
    desc = TensorDescriptor(y, [64, 16], [16, 1], [16, 16])
    kept = build([(object(), (1,), (x, desc, out))], (x, y), (out,), ())
    refs = [weakref.ref(t) for t in (x, y, out)]
    del x, y, out, desc
    gc.collect()
    assert kept is not None and all(r() is None for r in refs)


def test_the_key_holds_what_decides_the_launches(on_gpu_path, monkeypatch):
    x = torch.zeros(8, 32, dtype=torch.float16)
    misaligned = torch.zeros(8 * 32 + 1, dtype=torch.float16)[1:].view(8, 32)  # same strides, 2 bytes off
    base = layout_key("fwd", ("a",), (x,))
    others = [
        layout_key("bwd", ("a",), (x,)),  # another host function
        layout_key("fwd", ("b",), (x,)),  # other settings
        layout_key("fwd", ("a",), (torch.zeros(32, 8, dtype=torch.float16).t(),)),  # strides
        layout_key("fwd", ("a",), (x.float(),)),  # dtype
        layout_key("fwd", ("a",), (misaligned,)),  # 16-byte alignment
    ]
    assert base == layout_key("fwd", ("a",), (torch.ones(8, 32, dtype=torch.float16),))  # another aligned tensor
    assert all(k != base for k in others)
    monkeypatch.setattr(direct_launch, "_driver", lambda: SimpleNamespace(get_current_device=lambda: 1))
    assert layout_key("fwd", ("a",), (x,)) != base  # the current device


def test_a_buffer_aligned_unlike_the_recorded_call_takes_the_ordinary_path(on_gpu_path):
    p, (jit_a, jit_b) = _problem_like(), _kernels()
    call = Call(p, jit_a, jit_b)
    for _ in range(3):
        call(_slots())
    assert call.ordinary == 2
    x, y, _ = _slots()
    misaligned_out = torch.empty(64 * 16 + 1)[1:].view(64, 16)  # an output buffer off by 4 bytes
    call((x, y, misaligned_out))
    assert call.ordinary == 3
    assert jit_a.log[-1][0] == "triton" and jit_a.log[-1][2][1] is misaligned_out


def test_other_settings_are_recorded_apart(on_gpu_path):
    p, (jit_a, jit_b) = _problem_like(), _kernels()
    call = Call(p, jit_a, jit_b)
    for settings in [("auto",)] * 3 + [("none",)] * 2:
        call(_slots(), settings)
    # the new settings are recorded (their first call goes direct, and is kept), not replayed from the old ones
    assert call.ordinary == 3
    assert sum(isinstance(r, Replay) for r in p.replays._by_key.values()) == 2


def test_recording_is_per_thread(on_gpu_path):
    jit = FakeJit(kernel_fn)
    x = torch.zeros(64)
    direct_launch.launch(jit, (1,), x, 100, 0.5)  # compile
    seen = []
    with replay.recording() as launched:
        worker = threading.Thread(target=lambda: direct_launch.launch(jit, (1,), x, 100, 0.5))
        worker.start()
        worker.join()
        seen.append(len(launched))
        direct_launch.launch(jit, (1,), x, 100, 0.5)
    assert seen == [0] and len(launched) == 1 and launched[0][0] is jit.compiled
    direct_launch.launch(jit, (1,), x, 100, 0.5)
    assert len(launched) == 1  # closed


def test_the_store_is_bounded_and_counts_attempts():
    store = Replays()
    for i in range(replay.MAX_KEYS):
        store.mark(("k", i), "x")
    store.keep(("new",), None)
    assert store.find(("k", 0)) is None and store.find(("new",)) is None  # cleared; one attempt so far
    for _ in range(replay.MAX_ATTEMPTS - 1):
        store.keep(("new",), None)
    assert store.find(("new",)) is NOT_REPLAYABLE
    store.mark(("cute",), launch.CUTE_SCHEDULE)
    store.keep(("cute",), None)  # the CuTe kernels did not compile: recorded from the first attempt
    assert store.find(("cute",)) is None


def test_the_backward_remembers_its_schedule(monkeypatch):
    """The backward's choice of the CuTe kernel is made once per layout key; another setting asks
    again, and a CuTe backward that cannot compile hands the call to the Triton kernels."""
    monkeypatch.setattr(replay, "enabled", lambda: True)
    monkeypatch.setattr(direct_launch, "_driver", FakeDriver)
    asked, cute_calls = [], []
    monkeypatch.setattr(launch, "use_cute_backward", lambda *a: asked.append(1) or True)

    def fake_cute(do, q, k, v, out, lse, p, dlse):
        cute_calls.append(1)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    monkeypatch.setattr(launch, "run_backward_cute", fake_cute)
    spec = BandSpec("spattention", 2, 40)
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    p = _problem(q, k, None, spec.pattern, 2, 40, 0, 0, -1, 0.25)
    out, lse = launch.run_forward(q, k, v, p)
    do = torch.randn_like(q)
    for _ in range(3):
        launch.run_backward(do, q, k, v, out, lse, p)
    assert len(asked) == 1 and len(cute_calls) == 3
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "cute")
    launch.run_backward(do, q, k, v, out, lse, p)
    assert len(asked) == 2
    monkeypatch.setattr(launch, "run_backward_cute", lambda *a: None)  # its kernels failed to compile
    dq, dk, dv = launch.run_backward(do, q, k, v, out, lse, p)
    monkeypatch.setattr(replay, "enabled", lambda: False)
    monkeypatch.setattr(launch, "use_cute_backward", lambda *a: False)
    want = launch.run_backward(do, q, k, v, out, lse, p)
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), want))


def test_suspended_calls_neither_record_nor_replay(on_gpu_path):
    p, (jit_a, jit_b) = _problem_like(), _kernels()
    call = Call(p, jit_a, jit_b)
    with replay.suspended():
        for _ in range(4):
            call(_slots())
        assert not replay.enabled()
    assert call.ordinary == 4 and not p.replays._by_key
    for _ in range(3):
        call(_slots())
    assert call.ordinary == 5  # recorded (its launches go direct), then replayed


def test_benchmark_overrides_suspend_replays(on_gpu_path):
    """A forced launch configuration is invisible to the layout key: the sweeps' override turns
    replays off for its duration."""
    from olmoe_spattn.bench.features import overridden
    from olmoe_spattn.kernels.autotune import LaunchConfig

    assert replay.enabled()
    with overridden({"OLMOE_SPATTN_TRITON_FEATURES": "none"}, {"fwd": LaunchConfig(32, 32, 4, 2)}):
        assert not replay.enabled()
    assert replay.enabled()


def test_a_nested_recording_hands_back_to_the_outer_one(on_gpu_path):
    jit = FakeJit(pointer_fn)
    x, out, table = torch.zeros(64), torch.zeros(64), torch.zeros(4)
    direct_launch.launch(jit, (1,), x, out, table, 100, 0.5)  # compile
    with replay.recording() as outer:
        direct_launch.launch(jit, (1,), x, out, table, 100, 0.5)
        with replay.recording() as inner:
            direct_launch.launch(jit, (2,), x, out, table, 100, 0.5)
        direct_launch.launch(jit, (3,), x, out, table, 100, 0.5)
    assert [grid for _, grid, _ in outer] == [(1,), (3,)] and [grid for _, grid, _ in inner] == [(2,)]
