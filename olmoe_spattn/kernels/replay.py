"""Replaying a repeat call's launches: the host-side decisions of a call, made once.

An eager call of a short shape is bound by host time (tens of microseconds per launch against a
GPU that finishes in hundreds): before its two or three launches it picks a schedule, kernel
features and launch configurations, builds 40-50 argument lists and fingerprints them for
:mod:`.direct_launch`. A :class:`Replay` keeps what one call launched: for each launch the compiled
kernel, the grid and the positional arguments, with the call's own tensors (inputs, outputs,
scratch buffers) marked as slots and every TMA descriptor over one of them marked for rebasing.
A later call of the same :class:`.common.Problem` with the same :func:`layout_key` fills the slots
with its own tensors and launches.

Equal layout keys mean equal decisions: the Problem fixes the shapes, the geometry and the
band table, and the key holds everything else the launch path reads (the strides, dtypes and
16-byte alignment of every input tensor, the settings the caller passes, the current device).
The buffers a call allocates get their strides from its inputs; their alignment is checked at
every replay (:meth:`Replay.fits`). A replay is built only from a call whose every launch went
straight to a compiled kernel (so compilation and autotuning were behind it) and whose every
tensor argument is a slot or belongs to the Problem; otherwise that call keeps the ordinary path.

Kept on Problems cached by shape (eager calls of unpacked batches): packed documents make a new
Problem per call. Off where :mod:`.direct_launch` is off (``OLMOE_SPATTN_DIRECT_LAUNCH=0``, the
interpreter) and inside :func:`suspended`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import direct_launch
from .autotune import interpreting

#: Calls recorded under one key without yielding a replay before that key stops recording.
MAX_ATTEMPTS = 3
#: Keys kept per Problem (each a layout of its tensors and a choice of settings); cleared when full.
MAX_KEYS = 16


class _NotReplayable:
    """Stored under a key whose calls cannot be replayed: they take the ordinary path unrecorded."""


NOT_REPLAYABLE = _NotReplayable()


_suspended = 0


def enabled() -> bool:
    """Whether calls may be recorded and replayed: wherever :mod:`.direct_launch` is on, outside
    :func:`suspended`."""
    return direct_launch.ENABLED and not interpreting() and not _suspended


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """No call is recorded or replayed while this is open. For code that changes the launch
    decisions behind the layout key's back (a launch configuration forced by replacing
    ``launch.fixed_config``, as the benchmark sweeps do), which a replay would not see."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def layout_key(kind: str, settings: tuple, tensors: Sequence[torch.Tensor]) -> tuple:
    """What of a call, beyond its Problem, decides its launches: ``kind`` (which host function),
    the caller's ``settings``, the current device, and each tensor's strides, dtype and 16-byte
    alignment."""
    return (
        kind, settings, direct_launch._driver().get_current_device(),
        tuple([t.stride() for t in tensors]),
        tuple([t.dtype for t in tensors]),
        tuple([t.data_ptr() % 16 == 0 for t in tensors]),
    )


def rebased(descriptor: Any, base: torch.Tensor) -> Any:
    """A copy of a host-side TMA descriptor over ``base`` instead of its own tensor (same shape,
    strides, block shape and layout: the layout key keeps those equal)."""
    copy = object.__new__(type(descriptor))
    copy.__dict__.update(vars(descriptor))
    copy.__dict__["base"] = base
    return copy


class Replay:
    """The launches of one recorded call, ready for another call's tensors (see the module docstring)."""

    def __init__(self, steps: list[tuple], aligned: tuple[bool, ...]) -> None:
        #: ``(compiled kernel, grid, arguments, [(position, slot)], [(position, slot, descriptor)])``
        self.steps = steps
        #: whether each buffer the recorded call allocated was 16-byte aligned (the inputs' alignment
        #: is part of the layout key)
        self.aligned = aligned

    def fits(self, buffers: Sequence[torch.Tensor]) -> bool:
        """Whether every buffer this call allocated is aligned as in the recorded call."""
        return tuple([t.data_ptr() % 16 == 0 for t in buffers]) == self.aligned

    def run(self, slots: Sequence[torch.Tensor]) -> None:
        """Launches every recorded kernel with ``slots`` in place of the recorded call's tensors."""
        driver = direct_launch._driver()
        stream = driver.get_current_stream(driver.get_current_device())
        for kernel, grid, template, tensor_slots, descriptor_slots in self.steps:
            args = list(template)
            for position, slot in tensor_slots:
                args[position] = slots[slot]
            for position, slot, descriptor in descriptor_slots:
                args[position] = rebased(descriptor, slots[slot])
            kernel[grid](*args, stream=stream)


def _slot_of(x: torch.Tensor, slots: Sequence[torch.Tensor]) -> int | None:
    for i, s in enumerate(slots):
        if x is s:
            return i
    return None


def _holds_tensor(arg: object) -> bool:
    """Whether ``arg`` (not itself a tensor or descriptor) is a container or object reaching a tensor."""
    if isinstance(arg, (list, tuple, set, frozenset)):
        return any(isinstance(x, torch.Tensor) or _holds_tensor(x) for x in arg)
    if isinstance(arg, dict):
        return _holds_tensor(tuple(arg.keys()) + tuple(arg.values()))
    return hasattr(arg, "data_ptr")


def build(launches: list, inputs: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor],
          owned: Sequence[torch.Tensor]) -> Replay | None:
    """A :class:`Replay` of the recorded ``launches`` (:func:`recording`), whose slots are the call's
    ``inputs`` then the ``buffers`` it allocated, or ``None`` when one of the launches took Triton's
    own path, or passed a tensor that is neither a slot nor one of ``owned``
    (tensors that live with the Problem, such as its band table), or an argument of another kind
    that holds a tensor. Other arguments (integers, floats, strings, constexpr values) are kept as
    they were."""
    if not launches or any(launch is None for launch in launches):
        return None
    slots = (*inputs, *buffers)
    steps = []
    for kernel, grid, args in launches:
        tensor_slots, descriptor_slots = [], []
        for position, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                slot = _slot_of(arg, slots)
                if slot is not None:
                    tensor_slots.append((position, slot))
                elif not any(arg is o for o in owned):
                    return None
                continue
            base = getattr(arg, "base", None)
            if isinstance(base, torch.Tensor):  # a host-side TMA descriptor
                slot = _slot_of(base, slots)
                if slot is None or not hasattr(arg, "__dict__"):
                    return None
                descriptor_slots.append((position, slot, arg))
            elif _holds_tensor(arg):
                return None
        template = list(args)
        for position, _ in tensor_slots:
            template[position] = None  # the recorded call's tensors are not kept alive
        for i, (position, slot, descriptor) in enumerate(descriptor_slots):
            template[position] = None
            descriptor_slots[i] = (position, slot, rebased(descriptor, None))
        steps.append((kernel, grid, tuple(template), tensor_slots, descriptor_slots))
    return Replay(steps, tuple([t.data_ptr() % 16 == 0 for t in buffers]))


_local = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collects this thread's launches through :func:`.direct_launch.launch` while it is open:
    ``(compiled kernel, grid, all positional arguments)`` for a launch that went straight to a
    compiled kernel, ``None`` for one that took Triton's own path."""
    launches: list = []
    outer = getattr(_local, "launches", None)
    _local.launches = launches
    try:
        yield launches
    finally:
        _local.launches = outer


def lookup(p: Any, kind: str, settings: tuple, inputs: Sequence[torch.Tensor]) -> tuple:
    """``(store, key, found)`` for one call of the Problem ``p``: its :class:`Replays` (``None`` where
    replays are off or ``p`` keeps none), the :func:`layout_key` of ``kind``, ``settings`` and the
    call's ``inputs`` (the tensors that decide its launches), and what is stored under that key."""
    store = p.replays if enabled() else None
    if store is None:
        return None, None, None
    key = layout_key(kind, settings, inputs)
    return store, key, store.find(key)


def launch_or_replay(found: tuple, inputs: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor],
                     launches: Callable[[], None], owned: Sequence[torch.Tensor]) -> None:
    """Runs ``launches()`` (the ordinary launch path of the call :func:`lookup` gave ``found`` for), or
    the replay stored for it. The launches take the call's ``inputs`` (those given to :func:`lookup`),
    the ``buffers`` it allocated and ``owned``, the tensors that live with the Problem. A call with
    nothing stored yet is recorded, and what it yields is kept."""
    store, key, entry = found
    if isinstance(entry, Replay) and entry.fits(buffers):
        entry.run((*inputs, *buffers))
    elif store is None or entry is not None:  # off, not replayable, or a buffer aligned unlike before
        launches()
    else:
        with recording() as launched:
            launches()
        store.keep(key, build(launched, inputs, buffers, owned))


def record(entry: tuple | None) -> None:
    """Adds one launch to the open :func:`recording` of this thread, if there is one."""
    launches = getattr(_local, "launches", None)
    if launches is not None:
        launches.append(entry)


class Replays:
    """The replays of one Problem, by layout key, with the count of failed attempts per key."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, Any] = {}

    def find(self, key: tuple) -> object:
        """What is stored under ``key``: a :class:`Replay`, :data:`NOT_REPLAYABLE`, a caller's marker
        (:meth:`mark`), or ``None`` (record this call)."""
        found = self._by_key.get(key)
        return None if isinstance(found, int) else found

    def keep(self, key: tuple, replay: Replay | None) -> None:
        """Stores what recording a call under ``key`` gave; after :data:`MAX_ATTEMPTS` calls without
        a replay the key is marked :data:`NOT_REPLAYABLE`."""
        if replay is None:
            previous = self._by_key.get(key)
            attempts = previous + 1 if isinstance(previous, int) else 1
            self.mark(key, NOT_REPLAYABLE if attempts >= MAX_ATTEMPTS else attempts)
        else:
            self.mark(key, replay)

    def mark(self, key: tuple, value: object) -> None:
        """Stores ``value`` under ``key``: a caller's own marker (such as the backward's choice of
        schedule), or what :meth:`keep` decided. A full store is cleared first."""
        if len(self._by_key) >= MAX_KEYS and key not in self._by_key:
            self._by_key.clear()
        self._by_key[key] = value
