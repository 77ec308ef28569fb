"""Launching a Triton or Gluon kernel again without Triton's per-call argument binding.

``kernel[grid](*args, **kwargs)`` binds every argument to the kernel's signature, computes the
specialization of each one (type, 16-byte alignment, integer divisibility), hashes it into the
compilation cache key and looks the compiled kernel up, on every call: about 25-30 us of host time
for the 40-50 arguments of our kernels (H200 host), against 10-17 us for the compiled kernel's own
launcher. In eager mode a short call's three launches are a large part of its host time.

:func:`launch` keeps the compiled kernel of each distinct call and, on a repeat call, hands the
arguments straight to it (``CompiledKernel[grid](*args, stream=...)``, the launcher Triton itself
ends in). A repeat call is one whose key (:func:`call_key`) matches: the kernel, the device, the
keyword arguments, and for every positional argument a fingerprint at least as fine as Triton's
specialization of it: a float by its type, a tensor by its dtype and whether its data is 16-byte
aligned, a TMA descriptor by its type, dtype, alignment, shape, strides, block shape, layout and
padding, and an integer either by its value (the exact key, looked up first) or by the class Triton
specializes it by (:func:`integer_class`: equal to 1, divisible by 16, 32- or 64-bit; the class key,
looked up when the exact one misses, so that a decode step's growing position or a batch of packed
documents of new lengths still goes direct). A positional argument the kernel declares
``tl.constexpr`` is always keyed by its value. Equal keys therefore mean equal specializations, and
so the same compiled kernel; the grid is not part of the key (it does not change the compiled code).
A call with any other kind of argument takes Triton's path.

Off under ``TRITON_INTERPRET=1`` (the interpreter has no compiled kernels) and when
``OLMOE_SPATTN_DIRECT_LAUNCH=0`` is set at import (every launch through Triton's path).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch
import triton

from . import replay
from .autotune import interpreting

#: ``OLMOE_SPATTN_DIRECT_LAUNCH=0`` at import: every launch takes Triton's own path.
ENABLED = os.environ.get("OLMOE_SPATTN_DIRECT_LAUNCH", "1") != "0"
#: Compiled kernels kept (each entry is a kernel, a device and one argument fingerprint); cleared when full.
MAX_ENTRIES = 1024


class _Unkeyable:
    """Fingerprint of an argument of a kind :func:`call_key` does not know: its call is not cached."""


UNKEYABLE = _Unkeyable()

#: ``call key -> (JIT kernel, compiled kernel, values of the signature's parameters after the positional
#: ones)``; keys hold the JIT kernel's ``id``, and a hit checks that it is still the same object
_COMPILED: dict[tuple, tuple[Any, Any, tuple]] = {}


def fingerprint(arg: object) -> object:
    """What of ``arg`` decides the kernel's specialization, or :data:`UNKEYABLE`."""
    kind = type(arg)
    if kind is int or arg is None:
        return arg
    if kind is bool:
        return (bool, arg)  # True == 1 as a key, but a bool compiles as i1
    if kind is float:
        return float
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    base = getattr(arg, "base", None)
    if isinstance(base, torch.Tensor) and hasattr(arg, "block_shape"):  # a host-side TMA descriptor
        return (kind, base.dtype, base.data_ptr() % 16 == 0, tuple(arg.shape), tuple(arg.strides),
                tuple(arg.block_shape), getattr(arg, "layout", None), getattr(arg, "padding", None))
    return UNKEYABLE


def integer_class(value: int) -> tuple:
    """What of a runtime integer argument Triton specializes on: equal to 1 (compiled as a constant),
    divisible by 16, and the range that picks i32, i64 or u64."""
    return (int, value == 1, value % 16 == 0, -(1 << 31) <= value < (1 << 31), value < (1 << 63))


#: ``id(kernel) -> (kernel, positions of its tl.constexpr parameters)`` (``None``: not known)
_CONSTEXPR_POSITIONS: dict[int, tuple[Any, frozenset[int] | None]] = {}


def constexpr_positions(fn: Any) -> frozenset[int] | None:
    """Positions of ``fn``'s ``tl.constexpr`` parameters (from Triton's parameter list), or ``None``."""
    known = _CONSTEXPR_POSITIONS.get(id(fn))
    if known is not None and known[0] is fn:
        return known[1]
    params = getattr(fn, "params", None)
    try:
        found = frozenset(i for i, param in enumerate(params) if param.is_constexpr)
    except (TypeError, AttributeError):
        found = None
    _CONSTEXPR_POSITIONS[id(fn)] = (fn, found)
    return found


def call_key(fn: object, device: int, args: Sequence[object], kwargs: dict) -> tuple | None:
    """The exact key of one launch, integers by value (``None``: an argument has no fingerprint)."""
    prints = tuple([a if type(a) is int else fingerprint(a) for a in args])
    if UNKEYABLE in prints:
        return None
    return (id(fn), device, tuple(kwargs.items()), prints)


def class_key(fn: object, exact: tuple, args: Sequence[object]) -> tuple | None:
    """The class key derived from the exact key ``exact`` of the same launch: integers by
    :func:`integer_class`, except at the kernel's constexpr positions (``None`` when those are not
    known)."""
    fixed = constexpr_positions(fn)
    if fixed is None:
        return None
    *head, prints = exact
    by_class = tuple([integer_class(a) if type(a) is int and i not in fixed else fp
                      for i, (a, fp) in enumerate(zip(args, prints))])
    return (*head, by_class)


def _lookup(fn: object, key: tuple | None) -> tuple | None:
    """``(compiled kernel, trailing values)`` kept under ``key`` for ``fn``, or ``None``."""
    try:
        entry = _COMPILED.get(key) if key is not None else None
    except TypeError:  # an unhashable layout or option
        return None
    return entry[1:] if entry is not None and entry[0] is fn else None


def trailing_values(fn: Any, n_positional: int, kwargs: dict) -> tuple | None:
    """The values of the kernel's parameters after the first ``n_positional``, in signature order:
    from ``kwargs``, else the parameter's default (``None`` when one has neither). Launch options in
    ``kwargs`` (``num_warps``, ``num_stages``, ...) are not parameters and are left out."""
    params = list(inspect.signature(fn.fn).parameters.values())[n_positional:]
    values = []
    for param in params:
        if param.name in kwargs:
            values.append(kwargs[param.name])
        elif param.default is not inspect.Parameter.empty:
            values.append(param.default)
        else:
            return None
    return tuple(values)


def _driver() -> Any:
    """Triton's active GPU driver (its current device and stream, as Triton's own launches use)."""
    return triton.runtime.driver.active


def launch(fn: Any, grid: tuple, *args: object, **kwargs: object) -> None:
    """``fn[grid](*args, **kwargs)``; a repeat call goes straight to the compiled kernel. An open
    :func:`.replay.recording` gets the launch: the compiled kernel, the grid and every positional
    argument when it went straight there, ``None`` when it took Triton's path."""
    if not ENABLED or interpreting():
        replay.record(None)
        fn[grid](*args, **kwargs)
        return
    driver = _driver()
    device = driver.get_current_device()
    exact = call_key(fn, device, args, kwargs)
    entry = _lookup(fn, exact)
    by_class = None
    if entry is None and exact is not None:
        by_class = class_key(fn, exact, args)
        entry = _lookup(fn, by_class)
    if entry is not None:
        kernel, trailing = entry
        replay.record((kernel, grid, (*args, *trailing)))
        kernel[grid](*args, *trailing, stream=driver.get_current_stream(device))
        return
    replay.record(None)
    kernel = fn[grid](*args, **kwargs)
    if exact is None or kernel is None:
        return
    if hasattr(kernel, "result"):  # compiled asynchronously
        kernel = kernel.result()
    trailing = trailing_values(fn, len(args), kwargs)
    if trailing is None or not hasattr(kernel, "run"):
        return
    if len(_COMPILED) >= MAX_ENTRIES:
        _COMPILED.clear()
    for key in (exact, by_class):
        try:
            if key is not None:
                _COMPILED[key] = (fn, kernel, trailing)
        except TypeError:
            return
