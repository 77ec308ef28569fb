"""``olmoe-spattn bench table2``: the paper's Table 2 throughput, against the strongest dense baseline.

Trains the paper's Table 2 model (8 layers, 8 heads, d_model 1024, dense SwiGLU FFN; built
from OLMo-core blocks) for a few steps with each attention variant and reports training
tokens/s (forward, backward and AdamW step). Variants are ``<method>@<impl>``:

  dense@cudnn, dense@flash, dense@sdpa   PyTorch SDPA (cuDNN / FlashAttention-2 / default)
  dense@flex                             causal FlexAttention (the paper's dense baseline)
  longformer@flex, bigbird@flex, reformer@flex   the paper's sparse baselines (FlexAttention)
  <pattern>@triton | @fa4 | @flex | @torch       band patterns spattention, exclusive_bands,
                                         sliding_window, gapped_bands (our Triton kernel,
                                         FlashAttention-4 where installed, Flex, masked SDPA)

All variants run in one process on one model (same weights) and the same batch, timed in
interleaved rounds; a variant that cannot run here is listed as unavailable with the reason.
Writes table2.json, table2.md (the paper's numbers beside ours, ratios to dense for both)
and table2.png to --out (default benchmarks/results/<gpu>/table2); results of other sequence
lengths already in table2.json are kept, so lengths can be measured in separate runs. Every
row also gets the share of causal (query, key) pairs its method's mask allows (averaged over
heads; computed from the masks, not timed), the attention work behind its tokens/s.
--render JSON re-renders a saved table2.json (the Markdown, the chart and the derived columns)
without measuring anything; it needs no GPU.

Examples:
  olmoe-spattn bench table2 --seq-lens 1024,4096,16384
  olmoe-spattn bench table2 --tiny --device cpu --out /tmp/t2     # CPU smoke run
  olmoe-spattn bench table2 --render benchmarks/results/nvidia-h200/table2/table2.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .table2_report import all_variants, parse_variant

CUDA_DEFAULT_VARIANTS: tuple[str, ...] = (
    "dense@cudnn", "dense@flash", "dense@flex",
    "longformer@flex", "bigbird@flex", "reformer@flex",
    "spattention@flex", "spattention@triton", "spattention@fa4",
    "exclusive_bands@triton", "exclusive_bands@fa4",
    "sliding_window@triton", "gapped_bands@triton",
)
CPU_DEFAULT_VARIANTS: tuple[str, ...] = (
    "dense@sdpa", "dense@flex", "longformer@flex",
    "spattention@torch", "exclusive_bands@torch", "sliding_window@torch", "gapped_bands@torch",
)
DEFAULT_BATCH_TOKENS = 16384


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers (``1024,4096``)."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def name_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """Comma-separated names, each one of ``allowed`` (argparse ``type=``)."""
    items = [x for x in text.replace(" ", "").split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; allowed: {', '.join(allowed)}")
    return items


def _variants(text: str) -> list[str]:
    items = [x for x in text.replace(" ", "").split(",") if x]
    try:
        for item in items:
            parse_variant(item)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not items:
        raise argparse.ArgumentTypeError("--variants needs at least one method@impl")
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``olmoe-spattn bench table2``."""
    parser.add_argument("--seq-lens", type=int_list, default=[1024],
                        help="comma-separated sequence lengths (default 1024; the paper's is 1024)")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                        help=f"tokens per step; batch = max(1, batch_tokens // seq_len) (default {DEFAULT_BATCH_TOKENS})")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (overrides --batch-tokens)")
    parser.add_argument("--variants", type=_variants, default=None,
                        help="comma-separated method@impl list (default: all that make sense on the device); "
                        "one of: " + ", ".join(all_variants()))
    parser.add_argument("--d-model", type=int, default=None, help="model width (default 1024; --tiny: 64)")
    parser.add_argument("--layers", type=int, default=None, help="number of layers (default 8; --tiny: 2)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 8; --tiny: 4)")
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default 50304; --tiny: 512)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke configuration for CPUs: d_model 64, 2 layers, 4 heads, seq 64, batch 2, "
                        "1 warm-up step, 2 rounds of 2 steps")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (default 5)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu>/table2)")
    parser.add_argument("--fresh", action="store_true", help="do not keep earlier rows found in --out/table2.json")
    parser.add_argument("--device", default=None, help="device (default cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and batch (default 0)")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="measure nothing: re-render this saved table2.json (Markdown, chart, derived "
                        "columns) into its own folder, or into --out; measurement options are ignored")


def resolve(args: argparse.Namespace):
    """Fills defaults (``--tiny`` or the paper's) and validates; returns (device, shape, variants)."""
    import torch

    from .paper_model import TINY_SHAPE, ModelShape

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = TINY_SHAPE if args.tiny else ModelShape()
    shape = ModelShape(
        d_model=args.d_model or base.d_model,
        n_layers=args.layers or base.n_layers,
        n_heads=args.heads or base.n_heads,
        vocab_size=args.vocab_size or base.vocab_size,
    )
    if args.tiny:
        if args.seq_lens == [1024]:
            args.seq_lens = [64]
        if args.batch is None and args.batch_tokens == DEFAULT_BATCH_TOKENS:
            args.batch = 2
    for name, tiny_default, default in (("warmup", 1, 3), ("steps", 2, 5), ("rounds", 2, 3)):
        if getattr(args, name) is None:
            setattr(args, name, tiny_default if args.tiny else default)
    for name in ("steps", "rounds", "batch_tokens"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.batch is not None and args.batch <= 0:
        raise ValueError(f"--batch must be positive, got {args.batch}")
    for seq_len in args.seq_lens:
        if seq_len < shape.n_heads:
            raise ValueError(f"--seq-lens value {seq_len} is smaller than the number of heads {shape.n_heads}")
    variants = args.variants or list(CUDA_DEFAULT_VARIANTS if device.type == "cuda" else CPU_DEFAULT_VARIANTS)
    return device, shape, variants


def _dense_sdpa(impl: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}.get(impl)

    def fn(q, k, v):  # [B, T, H, D] -> [B, T, H, D]
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, T, D]
        if pinned is None:
            return F.scaled_dot_product_attention(*args, is_causal=True).transpose(1, 2)
        with sdpa_kernel(pinned):
            return F.scaled_dot_product_attention(*args, is_causal=True).transpose(1, 2)

    return fn


def attention_fn(variant: str, n_heads: int, seq_len: int, device):
    """``(fn, "")`` computing ``variant``'s attention core on ``[B, T, H, D]``, or
    ``(None, why)`` when it cannot run on ``device`` (checked before any timing)."""
    from ..api import BACKENDS, band_attention, triton_available
    from ..bands import BandSpec

    method, impl = parse_variant(variant)
    if impl in ("cudnn", "flash") and device.type != "cuda":
        return None, f"SDPA {impl} needs CUDA"
    if impl == "flex" and device.type != "cuda":
        return None, "torch's FlexAttention has no CPU backward"
    if impl == "triton" and not triton_available(device):
        return None, "the Triton kernel needs CUDA (or TRITON_INTERPRET=1)"
    if impl == "fa4" and "fa4" not in BACKENDS:
        return None, "band_attention has no 'fa4' backend in this installation"
    if method == "dense":
        if impl == "flex":
            spec = BandSpec("dense", n_heads, seq_len)
            return (lambda q, k, v: band_attention(q, k, v, spec, "flex")), ""
        return _dense_sdpa(impl), ""
    if impl == "flex" and method in ("longformer", "bigbird", "reformer"):
        from ..flex import flex_baseline_attention

        return (lambda q, k, v: flex_baseline_attention(q, k, v, method)), ""
    spec = BandSpec(method, n_heads, seq_len)
    return (lambda q, k, v: band_attention(q, k, v, spec, impl)), ""


def measure_length(seq_len: int, batch: int, shape, variants: list[str], args, device) -> list[dict]:
    """Times every variant at one sequence length; one row dict per variant."""
    import torch

    from .paper_model import CallableAttentionBackend, attention_layers, table2_config
    from .timing import measure_interleaved

    torch.manual_seed(args.seed)
    from ..olmo.model import build_model

    model = build_model(table2_config(shape), device, max_seq_len=seq_len)
    model.train()
    layers = attention_layers(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    ids = torch.randint(0, shape.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]  # [B, T]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(inputs)  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    rows: dict[str, dict] = {}
    fns = {}
    for variant in variants:
        row = {"seq_len": seq_len, "batch": batch, "variant": variant, "status": "ok", "note": ""}
        rows[variant] = row
        fn, why = attention_fn(variant, shape.n_heads, seq_len, device)
        if fn is None:
            row.update(status="unavailable", note=why)
            continue
        backends = [CallableAttentionBackend(fn, head_dim=lay.backend.head_dim, n_heads=lay.backend.n_heads,
                                             n_kv_heads=lay.backend.n_kv_heads, scale=lay.backend.scale)
                    for lay in layers]

        def run(backends=backends) -> None:
            for lay, backend in zip(layers, backends):
                lay.backend = backend
            step()

        fns[variant] = run
    timings = measure_interleaved(fns, device=device, warmup=args.warmup, iters=args.steps, rounds=args.rounds)
    tokens = batch * seq_len
    for variant, timing in timings.items():
        row = rows[variant]
        if timing.error or not timing.samples_ms:
            impl = parse_variant(variant)[1]
            row.update(status="unavailable" if impl == "fa4" else "failed", note=timing.error or "no samples")
            continue
        row.update(
            step_ms=timing.median_ms,
            tokens_per_s=tokens / (timing.median_ms / 1e3),
            spread=timing.spread,
            samples_ms=[round(x, 4) for x in timing.samples_ms],
        )
    return [rows[v] for v in variants]  # the model and optimizer are freed on return


def add_pair_fractions(rows: list[dict], n_heads: int) -> list[dict]:
    """Sets every row's ``causal_pair_fraction``: the share of causal (query, key) pairs its
    method allows at its length, averaged over ``n_heads`` heads (the same for every
    implementation of a method). Returns the same rows (modified in place)."""
    from ..flex import causal_pair_fraction

    cache: dict[tuple[str, int], float] = {}
    for row in rows:
        key = (parse_variant(row["variant"])[0], int(row["seq_len"]))
        if key not in cache:
            cache[key] = causal_pair_fraction(key[0], n_heads, key[1])
        row["causal_pair_fraction"] = cache[key]
    return rows


def render(path: Path, out: Path | None) -> int:
    """Re-renders a saved table2.json into ``out`` (default: its folder) without measuring:
    the measured numbers and the recorded command stay; the derived columns are recomputed."""
    from .table2_report import to_markdown

    if not path.is_file():
        raise ValueError(f"--render: {path} is not a file")
    data = json.loads(path.read_text())
    missing = [k for k in ("shape", "rows") if k not in data]
    if missing:
        raise ValueError(f"--render: {path} is not a bench table2 result (no {', '.join(missing)})")
    data["rendered"] = f"olmoe-spattn bench table2 --render {path.name} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
    out = out or path.parent
    write_outputs(data, out)
    print(to_markdown(data))
    print(f"wrote {out / 'table2.json'}, {out / 'table2.md'}, {out / 'table2.png'}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Measures every sequence length, writing results after each one (or, with
    ``--render``, only re-renders a saved result)."""
    if args.render:
        return render(Path(args.render), Path(args.out) if args.out else None)
    import torch

    from .kernel import device_name
    from .report import command_line, gpu_slug
    from .table2_report import merge_rows, to_markdown
    from .timing import warm_up_device

    device, shape, variants = resolve(args)
    out = Path(args.out) if args.out else Path("benchmarks/results") / gpu_slug(device_name(device)) / "table2"
    json_path = out / "table2.json"
    old_rows: list[dict] = []
    if json_path.is_file() and not args.fresh:
        old = json.loads(json_path.read_text())
        if old.get("shape") == shape.to_dict():
            old_rows = old.get("rows", [])
        else:
            print(f"bench table2: {json_path} holds another model shape; starting fresh", flush=True)
    data = {
        "device": device_name(device),
        "command": command_line(sys.argv, "table2"),
        "shape": shape.to_dict(),
        "dtype": "bf16 autocast, fp32 weights, fused AdamW" if device.type == "cuda" else "fp32",
        "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
        "torch": torch.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "rows": old_rows,
    }
    warm_up_device(device)
    for seq_len in args.seq_lens:
        batch = args.batch or max(1, args.batch_tokens // seq_len)
        t0 = time.perf_counter()
        print(f"bench table2: seq {seq_len} batch {batch}, {len(variants)} variants ...", flush=True)
        rows = measure_length(seq_len, batch, shape, variants, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for r in rows:
            what = f"{r['tokens_per_s']:,.0f} tokens/s (spread {r['spread'] or 0:.1%})" if r["status"] == "ok" \
                else f"{r['status']}: {r['note']}"
            print(f"  {r['variant']:<24} {what}", flush=True)
        print(f"  seq {seq_len} done in {time.perf_counter() - t0:.0f}s", flush=True)
        data["rows"] = merge_rows(data["rows"], rows)
        write_outputs(data, out)  # after every length, so a cut-off run keeps what it measured
    print(to_markdown(data))
    print(f"wrote {out / 'table2.json'}, {out / 'table2.md'}, {out / 'table2.png'}")
    return 0


def write_outputs(data: dict, out: Path) -> list[Path]:
    """Writes table2.json, table2.md and table2.png under ``out``."""
    from .table2_report import add_ratios, plot, to_markdown

    out.mkdir(parents=True, exist_ok=True)
    add_ratios(data["rows"])
    add_pair_fractions(data["rows"], int(data["shape"]["n_heads"]))
    (out / "table2.json").write_text(json.dumps(data, indent=2))
    (out / "table2.md").write_text(to_markdown(data))
    plot(data, out / "table2.png")
    return [out / "table2.json", out / "table2.md", out / "table2.png"]
