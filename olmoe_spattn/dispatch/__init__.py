"""``backend="auto"``: per call, the faster of the Triton kernel and FlashAttention-4.

The choice comes from a dispatch table measured by ``olmoe-spattn bench kernel`` on one
GPU kind and shipped in this package as ``olmoe_spattn/dispatch/<gpu-slug>.json`` (the
slug of ``torch.cuda.get_device_name``, e.g. ``nvidia-h100-80gb-hbm3``). Its entries are
keyed by pattern, head_dim and band width (see :func:`band_width`), each naming the faster
backend for training (forward+backward) and for inference (forward only). For a call:

1. an explicit ``backend=`` other than ``"auto"`` is used as given;
2. the environment variable ``OLMOE_SPATTN_BACKEND`` (any name but ``auto``) overrides
   ``auto`` everywhere (OLMo-core configs included);
3. off CUDA, or with no table for this GPU: today's rule (``triton`` on CUDA, ``flex``
   if Triton is missing, ``torch`` elsewhere);
4. ``fa4`` is picked only where the table says it is faster for the nearest measured
   width of the same pattern and head_dim, the call is self-attention (``Tq == Tk``),
   and FA4 can run it (installed, SM90+, fp16/bf16, head_dim it takes); otherwise
   ``triton``.

``OLMOE_SPATTN_DISPATCH_TABLE=path.json`` replaces the shipped table (to try a freshly
measured one). The environment and table are read once per device (``reset()`` re-reads);
the table in use, and each distinct decision, is logged once. The decision is plain Python
over constants, so ``torch.compile`` traces it without a graph break.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bands import BandSpec

log = logging.getLogger(__name__)

ENV_BACKEND = "OLMOE_SPATTN_BACKEND"
ENV_TABLE = "OLMOE_SPATTN_DISPATCH_TABLE"
TABLE_FORMAT = 1
CHOICES = ("triton", "fa4")
MODES = ("train", "infer")
TABLE_DIR = Path(__file__).resolve().parent


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (dispatch table file stem)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def band_width(spec: BandSpec, kv_len):
    """The width a call is keyed by: keys per query row a head's band spans.

    ``ceil(N / H)`` for the band patterns (``N`` the partition length, the call's key length
    when dynamic), capped at the key length; the key length for ``dense``. Works on
    symbolic sizes too (only arithmetic and comparisons).
    """
    if spec.pattern == "dense":
        return kv_len
    n = kv_len if spec.is_dynamic else int(spec.partition_len)  # type: ignore[arg-type]
    width = -(-n // spec.n_heads)
    return width if width < kv_len else kv_len


def width_bucket(width: int) -> int:
    """The power of two nearest to ``width`` (geometric rounding): a table entry's width."""
    if width <= 1:
        return 1
    low = 1 << (int(width).bit_length() - 1)
    return low if width * width < low * (2 * low) else 2 * low


# ---------------------------------------------------------------- tables
@dataclass(frozen=True)
class Entry:
    """One measured key: which backend is faster for training and for inference."""

    pattern: str
    head_dim: int
    width: int
    train: str
    infer: str


def load_table(path: str | Path) -> tuple[dict, tuple[Entry, ...]]:
    """Reads and validates a dispatch table; returns ``(header, entries sorted by width)``.

    Raises ``ValueError`` naming the file and the offending field.
    """
    from ..bands import PATTERNS

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"dispatch table {path} cannot be read: {err}") from err
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("entries"), list):
        raise ValueError(f"dispatch table {path} must be a JSON object with format={TABLE_FORMAT} and a list 'entries'")
    entries = []
    for i, e in enumerate(data["entries"]):
        where = f"dispatch table {path}, entries[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where} must be an object")
        if e.get("pattern") not in PATTERNS:
            raise ValueError(f"{where}: pattern {e.get('pattern')!r} is not one of {', '.join(PATTERNS)}")
        for key in ("head_dim", "width"):
            if isinstance(e.get(key), bool) or not isinstance(e.get(key), int) or e[key] <= 0:
                raise ValueError(f"{where}: {key} must be a positive integer, got {e.get(key)!r}")
        for key in MODES:
            if e.get(key) not in CHOICES:
                raise ValueError(f"{where}: {key} must be one of {', '.join(CHOICES)}, got {e.get(key)!r}")
        entries.append(Entry(e["pattern"], e["head_dim"], e["width"], e["train"], e["infer"]))
    header = {k: v for k, v in data.items() if k != "entries"}
    return header, tuple(sorted(entries, key=lambda x: (x.pattern, x.head_dim, x.width)))


def table_path_for(gpu_name: str) -> Path | None:
    """The table to use on ``gpu_name``: ``$OLMOE_SPATTN_DISPATCH_TABLE`` or the shipped one."""
    override = os.environ.get(ENV_TABLE)
    if override:
        return Path(override)
    path = TABLE_DIR / f"{gpu_slug(gpu_name)}.json"
    return path if path.is_file() else None


# ---------------------------------------------------------------- the rule
def choose(entries: tuple[Entry, ...], pattern: str, head_dim: int, width, training: bool) -> Entry | None:
    """The entry of ``(pattern, head_dim)`` whose width is nearest (geometrically) to ``width``.

    ``None`` when the table has no entry for that pattern and head_dim.
    """
    candidates = [e for e in entries if e.pattern == pattern and e.head_dim == head_dim]
    if not candidates:
        return None
    best = candidates[0]
    for low, high in zip(candidates, candidates[1:]):
        if width * width >= low.width * high.width:  # past the geometric midpoint
            best = high
    return best


@dataclass(frozen=True)
class Context:
    """What ``auto`` knows about one device, read once."""

    override: str
    base: str
    gpu: str
    table: str
    entries: tuple[Entry, ...]


def _read_override() -> str:
    from ..api import BACKENDS

    value = os.environ.get(ENV_BACKEND, "").strip()
    if value in ("", "auto"):
        return ""
    if value not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={value!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    return value


@functools.cache
def _context(device_type: str, index: int) -> Context:
    from ..api import resolve_backend

    override = _read_override()
    device = torch.device(device_type, index) if device_type == "cuda" else torch.device(device_type)
    base = resolve_backend("auto", device)
    if device_type != "cuda":
        return Context(override, base, "", "", ())
    gpu = torch.cuda.get_device_name(index)
    path = table_path_for(gpu)
    entries: tuple[Entry, ...] = ()
    if path is not None and base == "triton":
        header, entries = load_table(path)
        measured = header.get("measured", {})
        log.info(
            "band_attention backend='auto' on %s: dispatch table %s (%d entries, measured %s with "
            "flash-attn-4 %s); flash-attn-4 here: %s",
            gpu, path, len(entries), measured.get("date", "?"), measured.get("fa4", "?"), _fa4_state(),
        )
    else:
        why = "Triton is not importable" if base != "triton" else f"no dispatch table for {gpu_slug(gpu)}"
        log.info("band_attention backend='auto' on %s: %s, using %s", gpu, why, base)
    if override:
        log.info("band_attention backend='auto' is overridden by %s=%s", ENV_BACKEND, override)
    return Context(override, base, gpu, str(path or ""), entries)


def _fa4_state() -> str:
    from ..fa4.support import fa4_import_error

    why = fa4_import_error()
    return "available" if not why else f"not installed ({why})"


@torch.compiler.assume_constant_result
def device_context(device_type: str, index: int) -> Context:
    """The (cached) :class:`Context` of a device; a constant while ``torch.compile`` traces."""
    return _context(device_type, index)


_ANNOUNCED: set[tuple] = set()


@torch.compiler.assume_constant_result
def _announce(gpu: str, pattern: str, head_dim: int, width: int, mode: str, name: str, why: str) -> bool:
    key = (gpu, pattern, head_dim, width, mode, name)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        log.info("band_attention auto -> %s for %s head_dim=%d width~%d (%s): %s", name, pattern, head_dim,
                 width, mode, why)
    return True


def auto_backend(q: torch.Tensor, k: torch.Tensor, spec: BandSpec) -> str:
    """The backend ``"auto"`` resolves to for this call (see the module docstring)."""
    ctx = device_context(q.device.type, q.device.index or 0)
    if ctx.override:
        return ctx.override
    if not ctx.entries or ctx.base != "triton":
        return ctx.base
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    mode = "train" if training else "infer"
    head_dim = q.shape[-1]
    entry = choose(ctx.entries, spec.pattern, head_dim, band_width(spec, k.shape[1]), training)
    if entry is None:
        _announce(ctx.gpu, spec.pattern, head_dim if isinstance(head_dim, int) else -1, 0, mode, "triton",
                  "no measurement for this pattern and head_dim")
        return "triton"
    head_dim = entry.head_dim  # equal, and a constant even where shapes are symbolic
    name = entry.train if training else entry.infer
    if name == "fa4":
        if q.shape[1] != k.shape[1]:
            return "triton"  # decoding / chunked prefill: the table measured self-attention
        from ..fa4.support import fa4_problem

        kind, why = fa4_problem(q)
        if kind:
            _announce(ctx.gpu, spec.pattern, head_dim, entry.width, mode, "triton", why)
            return "triton"
    _announce(ctx.gpu, spec.pattern, head_dim, entry.width, mode, name, f"measured faster in {ctx.table}")
    return name


def reset() -> None:
    """Forgets the cached environment and tables (re-read on the next call)."""
    _context.cache_clear()
    _ANNOUNCED.clear()
