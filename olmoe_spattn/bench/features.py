"""``bench sweep --variants``: the Triton band kernel with and without opt-in kernel features.

A *variant* is a set of ``OLMOE_SPATTN_TRITON_FEATURES`` names joined by ``+`` (``default``
= none), optionally with a forward launch configuration ``@BMxBNxWARPSxSTAGES``, e.g.
``tma+flat@64x64x4x3``. Every case (shape and pattern) times all variants in one
process, interleaved in rounds (so clock drift hits all alike): the forward alone and the
forward plus the two-pass backward, both through the raw launchers (no autograd, so small
shapes stay GPU-bound), and records each variant's largest difference from the default's
output. ``x default`` = default ms / variant ms (above 1: the variant is faster). Results go to the console as a Markdown table and, after every case, to a JSON file.

A feature combination may abort the process while compiling (an ``LLVM ERROR`` inside
Triton cannot be caught). Before timing, every non-default variant therefore
runs once on small shapes with the same head dims and band buckets in its own subprocess
(all in parallel); a variant whose subprocess fails is reported and left out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..bands import PATTERNS
from .kernel import parse_shapes

ENV = "OLMOE_SPATTN_TRITON_FEATURES"
Case = tuple[tuple[int, int, int, int], str]  # ((B, H, T, D), pattern)


@dataclass(frozen=True)
class Variant:
    """Kernel features and an optional forward launch configuration."""

    name: str
    features: tuple[str, ...]
    fwd_config: tuple[int, int, int, int] | None = None


def parse_variants(text: str) -> list[Variant]:
    """``"tma,default,tma+flat@64x64x4x3"`` -> variants (``default`` first, added if missing)."""
    from ..kernels.launch import TRITON_FEATURES

    out: list[Variant] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        feats, _, cfg = part.partition("@")
        names = () if feats in ("", "default") else tuple(feats.split("+"))
        bad = [x for x in names if x not in TRITON_FEATURES]
        if bad:
            raise ValueError(
                f"variant {part!r}: unknown feature(s) {bad}; allowed: default, {', '.join(TRITON_FEATURES)}"
            )
        config = None
        if cfg:
            try:
                config = tuple(int(x) for x in cfg.lower().split("x"))
            except ValueError:
                config = ()
            if len(config) != 4 or min(config) <= 0:
                raise ValueError(
                    f"variant {part!r}: the config after '@' must be BMxBNxWARPSxSTAGES, e.g. 64x64x4x2"
                )
        out.append(Variant(part, names, config))  # type: ignore[arg-type]
    default = [v for v in out if v.name == "default"] or [Variant("default", ())]
    return default + [v for v in out if v.name != "default"]  # the baseline first


def parse_cases(text: str) -> list[Case]:
    """``"8,16,4096,128:dense+spattention;32,16,1024,64:exclusive_bands"`` -> cases, in order."""
    cases: list[Case] = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        shape_text, _, pats = part.partition(":")
        try:
            (shape,) = parse_shapes(shape_text)
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise ValueError(f"case {part!r}: {err}") from None
        patterns = [x for x in (pats or "exclusive_bands").split("+") if x]
        bad = [x for x in patterns if x not in PATTERNS]
        if bad:
            raise ValueError(f"case {part!r}: unknown pattern(s) {bad}; allowed: {', '.join(PATTERNS)}")
        cases.extend((shape, pat) for pat in patterns)
    return cases


@contextmanager
def overridden(env: dict[str, str] | None = None, configs: dict | None = None) -> Iterator[None]:
    """For the duration: the environment variables in ``env`` set, and ``launch.fixed_config``
    returning ``configs[kind]`` (a ``LaunchConfig``) for the kernel kinds it names; both
    restored afterwards. No call replays an earlier call's launches meanwhile
    (:func:`..kernels.replay.suspended`): every call decides its kernels and configurations."""
    from ..kernels import launch, replay

    old_env = {name: os.environ.get(name) for name in env or {}}
    real = launch.fixed_config
    os.environ.update(env or {})
    if configs:
        launch.fixed_config = lambda kind, block_d, extent: configs.get(kind) or real(kind, block_d, extent)
    try:
        with replay.suspended():
            yield
    finally:
        launch.fixed_config = real
        for name, value in old_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def use_variant(variant: Variant) -> AbstractContextManager[None]:
    """Sets the feature variable and the forward config override for the duration."""
    from ..kernels.autotune import LaunchConfig

    configs = None
    if variant.fwd_config is not None:  # the Triton forward's config, or the Gluon one's under gluon_fwd
        configs = {"fwd": LaunchConfig(*variant.fwd_config), "fwd_sm90": LaunchConfig(*variant.fwd_config)}
    return overridden({ENV: ",".join(variant.features)}, configs)


def _calls(case: Case, device: str, dtype):
    """``(fwd, fwd_bwd, outputs)`` closures over fresh inputs for one case."""
    import torch

    from ..kernels import launch
    from ..kernels.op import _problem

    (b, h, t, d), pattern = case
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, g = (torch.randn(b, t, h, d, generator=gen).to(device, dtype) for _ in range(4))  # [B, T, H, D]
    p = _problem(q, k, None, pattern, h, t, 0, 0, -1, d**-0.5)

    def fwd():
        return launch.run_forward(q, k, v, p)

    def fwd_bwd():
        out, lse = launch.run_forward(q, k, v, p)
        return out, *launch.run_backward(g, q, k, v, out, lse, p)

    return fwd, fwd_bwd


def _max_diff(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def preflight(variants: list[Variant], cases: list[Case], timeout_s: float, device: str = "cuda",
              max_len: int = 4096) -> dict[str, str]:
    """Runs each non-default variant on small versions of the cases (``B = 1``, ``T`` at most
    ``max_len``) in its own subprocess, all in parallel; returns ``{variant name: failure
    text}`` for those that failed or ran out of time."""
    small = sorted({((1, h, min(t, max_len), d), pat) for (_b, h, t, d), pat in cases})
    procs = {}
    for var in variants:
        if var.name == "default":
            continue
        code = (
            "from olmoe_spattn.bench.features import _preflight_child, parse_variants;"
            f"_preflight_child(parse_variants({var.name!r})[-1], {small!r}, {device!r})"
        )
        procs[var.name] = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    failed: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failed[name] = f"preflight timed out after {timeout_s:.0f} s"
            continue
        if proc.returncode != 0:
            # the error lines, without the traceback's indented frames (paths of this machine)
            errors = [line for line in out.strip().splitlines() if line.strip() and not line[0].isspace()]
            tail = " / ".join(errors[-2:])
            failed[name] = f"exit {proc.returncode}: {tail[-600:]}"
    return failed


def _preflight_child(variant: Variant, cases: list, device: str = "cuda") -> None:
    """Subprocess body: compile and run ``variant`` on every case (raises on failure)."""
    import torch

    for case in cases:
        with use_variant(variant):
            _, fwd_bwd = _calls(tuple(case), device, torch.bfloat16 if device == "cuda" else torch.float32)
            res = fwd_bwd()
        if device == "cuda":
            torch.cuda.synchronize()
        if not all(torch.isfinite(x).all() for x in res):
            raise RuntimeError(f"non-finite result for {case}")


def run_variants(
    cases: list[Case],
    variants: list[Variant],
    *,
    rep_ms: float,
    rounds: int = 2,
    budget_s: float = 0.0,
    json_path: str | None = None,
    device: str = "cuda",
    dtype=None,
    bench: Callable | None = None,
    do_preflight: bool = True,
) -> list[str]:
    """Times every variant on every case (interleaved rounds); returns the Markdown lines."""
    import torch

    from .modes import _bench

    bench = bench or _bench
    dtype = dtype or torch.bfloat16
    t_start = time.monotonic()
    record: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "autotune": os.environ.get("OLMOE_SPATTN_AUTOTUNE", "1") != "0",
        "variants": [v.name for v in variants],
        "excluded": {},
        "rows": [],
        "skipped_cases": [],
    }
    import triton

    record["triton"] = triton.__version__
    if do_preflight:
        record["excluded"] = preflight(variants, cases, timeout_s=max(budget_s / 2, 60.0) if budget_s else 180.0)
        for name, why in record["excluded"].items():
            print(f"variant {name} left out: {why}", flush=True)
    live = [v for v in variants if v.name not in record["excluded"]]

    def save() -> None:
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(record, indent=1) + "\n")

    lines = ["| B,H,T,D | pattern | variant | fwd ms | x default | fwd+bwd ms | x default | max diff vs default |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for case in cases:
        if budget_s and time.monotonic() - t_start > budget_s:
            record["skipped_cases"].append(f"{case[0]} {case[1]}")
            print(f"budget of {budget_s:.0f} s spent: skipping {case}", flush=True)
            continue
        (b, h, t, d), pattern = case
        fwd, fwd_bwd = _calls(case, device, dtype)
        results: dict[str, dict] = {}
        ref = None
        for var in live:  # compile, warm up, compare with the default
            t0 = time.monotonic()
            try:
                with use_variant(var):
                    res = fwd_bwd()
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - a variant that fails here is listed, not fatal
                results[var.name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                continue
            if ref is None:
                ref = res
            results[var.name] = {"warmup_s": round(time.monotonic() - t0, 2),
                                 "max_diff_vs_default": _max_diff(res, ref), "fwd": [], "fwd_bwd": []}
            del res
        for _ in range(rounds):
            for var in live:
                r = results[var.name]
                if "error" in r:
                    continue
                with use_variant(var):
                    r["fwd"].append(bench(fwd, rep_ms))
                    r["fwd_bwd"].append(bench(fwd_bwd, rep_ms))
        base = results.get("default", {})
        for var in live:
            r = results[var.name]
            row = {"shape": [b, h, t, d], "pattern": pattern, "variant": var.name, **r}
            if "error" not in r:
                row["fwd_ms"] = sorted(r["fwd"])[len(r["fwd"]) // 2]
                row["fwd_bwd_ms"] = sorted(r["fwd_bwd"])[len(r["fwd_bwd"]) // 2]
            record["rows"].append(row)
            if "error" in r:
                lines.append(f"| {b},{h},{t},{d} | {pattern} | {var.name} | error: {r['error'][:80]} | | | | |")
            else:
                bf, bfb = base.get("fwd"), base.get("fwd_bwd")
                x_f = (sorted(bf)[len(bf) // 2] / row["fwd_ms"]) if bf else float("nan")
                x_fb = (sorted(bfb)[len(bfb) // 2] / row["fwd_bwd_ms"]) if bfb else float("nan")
                lines.append(f"| {b},{h},{t},{d} | {pattern} | {var.name} | {row['fwd_ms']:.3f} | {x_f:.2f} | "
                             f"{row['fwd_bwd_ms']:.3f} | {x_fb:.2f} | {r['max_diff_vs_default']:.3g} |")
            print(lines[-1], flush=True)
        record["elapsed_s"] = round(time.monotonic() - t_start, 1)
        save()
        del fwd, fwd_bwd, ref
        if device == "cuda":
            torch.cuda.empty_cache()
    record["elapsed_s"] = round(time.monotonic() - t_start, 1)
    save()
    if json_path:
        print(f"wrote {json_path}", flush=True)
    return lines
