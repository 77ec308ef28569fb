"""Training-step throughput of an OLMoE model, dense vs band attention, on one device.

One model (OLMo-core's OLMoE blocks, optionally at reduced depth) is built once; its attention
layers are switched in place between dense (OLMo-core's SDPA backend) and each band pattern, and
full training steps (forward, backward, fused AdamW) are timed side by side, in interleaved
rounds. Alongside, the attention core alone (fwd+bwd of SDPA vs ``band_attention`` on the same
q/k/v shapes, times the number of layers) gives the attention share ``s`` of the dense step and
the Amdahl bound ``1 / (1 - s + s * t_band / t_dense)`` each pattern could reach if nothing but
attention changed; ``ideal`` uses the pattern's share of causal (query, key) pairs instead.

``--compile`` applies OLMo-core's ``Transformer.apply_compile`` (``torch.compile`` per block,
as ``train.compile: true`` trains) after ``--activation-checkpointing`` (OLMo-core's
``apply_activation_checkpointing``). Switching the attention in place makes each compiled block
compile once per variant (the untimed warm-up steps absorb it).

``--docs N`` packs N documents of uneven lengths (in proportion 1 : 2 : ... : N) into every
sequence and masks them, as training with ``data.document_masking`` does: the model gets OLMo-core's
``doc_lens``, the band patterns keep the sequence-length partition, and dense attention runs
this package's ``dense`` pattern within each document (OLMo-core's SDPA backend cannot mask
documents); the attention core and the ideal bound count pairs within documents.

Depth extrapolation (``--extrapolate-to L``, and ``--preset long`` when the full model does not
fit one GPU by :mod:`olmoe_spattn.olmo.memory`'s estimate): the setting runs at two depths
``a < b`` (``--layers`` and twice that), per-layer time = ``(step_b - step_a) / (b - a)``, the
rest (embedding, LM head, loss, their optimizer work) is fixed, and the ``L``-layer row is
``fixed + L * per-layer``; its attention share and Amdahl bound use ``L`` layers of the
measured attention core.

Examples:
  olmoe-spattn bench train --model olmoe-1b-7b --layers 2 --seq-len 4096 --batch 4
  olmoe-spattn bench train --model olmoe-0.25b-1.75b --seq-len 16384 --batch 1
  olmoe-spattn bench train --preset paper      # the three settings of the README table
  olmoe-spattn bench train --preset long --compile   # OLMoE-1B-7B at 16k / 32k / 64k, compiled

Results go to benchmarks/results/<gpu>/train_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..api import BACKENDS
from ..bands import PATTERNS, BandSpec
from .report import fmt

if TYPE_CHECKING:  # torch loads when a benchmark runs, not for --help
    import torch

MODELS = ("olmoe-1b-7b", "olmoe-0.25b-1.75b", "tiny")
#: --preset paper: (model, layers, seq_len, batch)
PAPER_SETTINGS = (
    ("olmoe-1b-7b", 2, 4096, 4),
    ("olmoe-0.25b-1.75b", 16, 1024, 16),
    ("olmoe-0.25b-1.75b", 16, 16384, 1),
)
#: --preset long: OLMoE-1B-7B, batch 1, at these sequence lengths; full depth where one GPU holds
#: it (by the memory estimate), else measured at LONG_DEPTHS layers and extrapolated.
LONG_SEQ_LENS = (16384, 32768, 65536)
LONG_DEPTHS = (2, 4)
AC_CHOICES = ("none", "attention", "selected_ops")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=MODELS, default="olmoe-1b-7b", help="architecture (bundled recipe)")
    parser.add_argument("--layers", type=int, default=None, help="number of layers (default: the recipe's)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the recipe's)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument(
        "--patterns", default="exclusive_bands,spattention",
        help="comma-separated band patterns compared with dense (default exclusive_bands,spattention)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="band_attention backend (default auto)")
    parser.add_argument("--moe", choices=("grouped_mm", "olmo-core"), default="grouped_mm",
                        help="expert matmuls: torch grouped_mm (bf16) or OLMo-core's default (loop without grouped_gemm)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per variant (default 3)")
    parser.add_argument("--preset", choices=("paper", "long"), default=None,
                        help="paper: 1B-7B 2 layers @4096, 0.25B-1.75B @1024 and @16384; long: 1B-7B batch 1 "
                        "@16384/32768/65536, full 16 layers where one GPU holds them, else extrapolated "
                        "from 2 and 4 layers")
    parser.add_argument("--compile", action="store_true",
                        help="OLMo-core's apply_compile (torch.compile per block), as training with compile")
    parser.add_argument("--activation-checkpointing", choices=AC_CHOICES, default=None,
                        help="OLMo-core activation checkpointing (attention: every attention module; "
                        "default: none, or selected_ops for --preset long)")
    parser.add_argument("--extrapolate-to", type=int, default=None, metavar="L",
                        help="also measure at 2x --layers and extrapolate the step time to L layers")
    parser.add_argument("--docs", type=int, default=0,
                        help="pack this many documents into each sequence and mask them, as training with "
                             "data.document_masking (default 0: one document per sequence)")
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results/<gpu>)")
    parser.add_argument("--device", default=None, help="device (default cuda if available, else cpu)")


@dataclass
class Setting:
    model: str
    layers: int
    seq_len: int
    batch: int
    n_heads: int = 0
    head_dim: int = 0
    step_ms: dict[str, float] = field(default_factory=dict)
    tokens_per_s: dict[str, float] = field(default_factory=dict)
    attn_ms: dict[str, float] = field(default_factory=dict)  # fwd+bwd of the core, all layers
    speedup: dict[str, float] = field(default_factory=dict)
    amdahl_bound: dict[str, float] = field(default_factory=dict)
    ideal_bound: dict[str, float] = field(default_factory=dict)
    attention_share: float | None = None
    errors: dict[str, str] = field(default_factory=dict)
    compile: bool = False
    activation_checkpointing: str = "none"
    extrapolated_from: list[int] = field(default_factory=list)  # depths measured (empty: measured row)
    docs: int = 0  # packed documents per sequence (0: none)

    def doc_lengths(self) -> list[int]:
        """Each sequence's document lengths (one document when ``docs`` is 0)."""
        from .backward import document_lengths

        return document_lengths(self.seq_len, self.docs) if self.docs else [self.seq_len]


def _recipe(model: str, layers: int | None, seq_len: int | None, batch: int):
    from ..olmo.recipe import load_recipe

    overrides = [f"train.rank_microbatch_size={batch}", f"train.global_batch_size={batch}"]
    if layers is not None:
        overrides.append(f"model.n_layers={layers}")
    if seq_len is not None:
        overrides.append(f"train.sequence_length={seq_len}")
    return load_recipe(model, overrides + ["attention=dense"])


def _train_step_fn(model, optim, ids: torch.Tensor, labels: torch.Tensor, device: torch.device,
                   doc_kwargs: dict | None = None):
    import torch

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(ids, **(doc_kwargs or {}))  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()  # MoE load-balancing / z losses ride along through attach_auxiliary_loss
        optim.step()
        optim.zero_grad(set_to_none=True)
        post_batch = getattr(model, "post_batch", None)  # OLMo-core's per-batch MoE bookkeeping
        if post_batch is not None:
            post_batch()

    return step


def _attention_core_fns(setting: Setting, patterns: list[str], backend: str, device: torch.device):
    import torch

    from ..api import band_attention

    B, T, H, D = setting.batch, setting.seq_len, setting.n_heads, setting.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    packed = {}
    if setting.docs:  # one packed row of B x T tokens, as OLMo-core hands documents to attention
        from .backward import packed_rows

        cu, max_seqlen = packed_rows(B, T, setting.docs, device)
        packed = {"cu_seqlens": cu, "max_seqlen": max_seqlen}
        B, T = 1, B * T
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, T, H, D, device=device, dtype=dtype)
    fns = {}

    def dense() -> None:
        if packed:  # within documents: the dense pattern, as the model's dense layers run it
            band_attention(q, k, v, BandSpec("dense", H, setting.seq_len), backend, **packed).backward(dout)
            return
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        out.backward(dout.transpose(1, 2))

    fns["dense"] = dense
    for p in patterns:
        spec = BandSpec(p, H, setting.seq_len)

        def band(spec: BandSpec = spec) -> None:
            band_attention(q, k, v, spec, backend, **packed).backward(dout)

        fns[p] = band
    return fns


def _time_training_steps(config, setting: Setting, patterns: list[str], args: argparse.Namespace,
                         device: torch.device, vocab_size: int):
    """Medians of full training steps with each attention variant, one model switched in place."""
    import torch

    from ..olmo.attention import set_model_attention
    from ..olmo.model import build_model
    from .timing import measure_interleaved

    torch.manual_seed(0)
    model = build_model(config, device, max_seq_len=setting.seq_len)
    if args.moe == "grouped_mm" and device.type == "cuda":
        from ..olmo.moe_grouped import grouped_mm_available, use_grouped_mm_moe

        if grouped_mm_available(device):
            use_grouped_mm_moe(model)
    prepare_model(model, setting.activation_checkpointing, setting.compile)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab_size, (setting.batch, setting.seq_len + 1), generator=g).to(device)
    doc_kwargs = None
    if setting.docs:  # OLMo-core's doc_lens: [B, documents] per sequence, and the longest per sequence
        lengths = setting.doc_lengths()
        doc_kwargs = {"doc_lens": torch.tensor([lengths] * setting.batch, device=device),
                      "max_doc_lens": [max(lengths)] * setting.batch}
    step = _train_step_fn(model, optim, ids[:, :-1], ids[:, 1:], device, doc_kwargs)

    def variant(name: str):
        spec = None if name == "dense" else BandSpec(name, setting.n_heads, setting.seq_len)
        if spec is None and setting.docs:  # OLMo-core's SDPA cannot mask documents: the dense pattern
            spec = BandSpec("dense", setting.n_heads, setting.seq_len)

        def run() -> None:
            set_model_attention(model, spec, args.backend)
            step()

        return run

    names = ["dense", *patterns]
    return measure_interleaved(
        {n: variant(n) for n in names}, device=device, warmup=args.warmup, iters=args.steps, rounds=args.rounds
    )


def prepare_model(model, activation_checkpointing: str, compile: bool) -> None:
    """OLMo-core's activation checkpointing then ``apply_compile``, in the order training uses."""
    from olmo_core.nn.transformer.config import TransformerActivationCheckpointingMode as Mode

    if activation_checkpointing == "attention":
        model.apply_activation_checkpointing(Mode.selected_modules, modules=["blocks.*.attention"])
    elif activation_checkpointing == "selected_ops":
        model.apply_activation_checkpointing(Mode.selected_ops)
    if compile:
        model.apply_compile()


def fits_one_device(model: str, layers: int | None, seq_len: int, batch: int, activation_checkpointing: str,
                    device: torch.device) -> bool:
    """Whether :mod:`olmoe_spattn.olmo.memory` estimates the (unsharded) setting fits ``device``."""
    if device.type != "cuda":
        return True
    import torch

    from ..olmo.memory import estimate

    recipe = _recipe(model, layers, seq_len, batch)
    recipe.train.data_parallel = "ddp"
    recipe.train.activation_checkpointing = None if activation_checkpointing == "none" else activation_checkpointing
    return estimate(recipe, 1).total <= torch.cuda.get_device_properties(device).total_memory


def extrapolate(a: Setting, b: Setting, layers: int, patterns: list[str]) -> Setting:
    """The ``layers``-deep row from rows measured at two depths (see the module doc)."""
    if a.layers >= b.layers:
        raise ValueError(f"extrapolation needs two depths a < b, got {a.layers} and {b.layers}")
    out = Setting(a.model, layers, a.seq_len, a.batch, a.n_heads, a.head_dim, compile=a.compile,
                  activation_checkpointing=a.activation_checkpointing, extrapolated_from=[a.layers, b.layers],
                  docs=a.docs)
    out.errors = {**a.errors, **b.errors}
    tokens = a.batch * a.seq_len
    for name in ["dense", *patterns]:
        if name not in a.step_ms or name not in b.step_ms:
            continue
        per_layer = (b.step_ms[name] - a.step_ms[name]) / (b.layers - a.layers)
        fixed = a.step_ms[name] - a.layers * per_layer
        out.step_ms[name] = fixed + layers * per_layer
        out.tokens_per_s[name] = tokens / (out.step_ms[name] / 1e3)
        if name in b.attn_ms:
            out.attn_ms[name] = b.attn_ms[name] / b.layers * layers
    _bounds(out, patterns)
    return out


def _bounds(setting: Setting, patterns: list[str]) -> None:
    """Speedups, attention share and Amdahl bounds from ``step_ms`` and ``attn_ms``."""
    dense_step, dense_attn = setting.step_ms.get("dense"), setting.attn_ms.get("dense")
    for p in patterns:
        if dense_step and p in setting.step_ms:
            setting.speedup[p] = dense_step / setting.step_ms[p]
    if not (dense_step and dense_attn):
        return
    s = min(dense_attn / dense_step, 1.0)
    setting.attention_share = s
    T = setting.seq_len
    lengths = setting.doc_lengths()
    causal = sum(n * (n + 1) / 2 for n in lengths)  # pairs within each document
    for p in patterns:
        if p in setting.attn_ms:
            setting.amdahl_bound[p] = 1 / (1 - s + s * setting.attn_ms[p] / dense_attn)
        spec = BandSpec(p, setting.n_heads, T)
        frac = sum(sum(spec.covered_pairs(n)) for n in lengths) / (setting.n_heads * causal)
        setting.ideal_bound[p] = 1 / (1 - s + s * frac)


def bench_setting(setting: Setting, patterns: list[str], args: argparse.Namespace, device: torch.device) -> Setting:
    import torch

    from .timing import measure_interleaved

    recipe = _recipe(setting.model, setting.layers, setting.seq_len, setting.batch)
    config = recipe.model_config()
    setting.layers, setting.seq_len = config.n_layers, recipe.train.sequence_length
    setting.n_heads = config.block.sequence_mixer.n_heads
    setting.head_dim = config.d_model // setting.n_heads
    timings = _time_training_steps(config, setting, patterns, args, device, recipe.data.tokenizer.vocab_size)
    tokens = setting.batch * setting.seq_len
    for n, t in timings.items():
        if t.error:
            setting.errors[n] = t.error
        elif t.median_ms:
            setting.step_ms[n] = t.median_ms
            setting.tokens_per_s[n] = tokens / (t.median_ms / 1e3)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    core = measure_interleaved(
        _attention_core_fns(setting, patterns, args.backend, device),
        device=device, warmup=args.warmup, iters=max(args.steps, 5), rounds=args.rounds,
    )
    for n, t in core.items():
        if t.median_ms:
            setting.attn_ms[n] = t.median_ms * setting.layers
        elif t.error:
            setting.errors[f"core:{n}"] = t.error
    _bounds(setting, patterns)
    return setting


def to_markdown(data: dict) -> str:
    lines = [
        f"# Training throughput, dense vs band attention ({data['device']})",
        "",
        f"Command: `{data['command']}`; backend `{data['backend']}`, MoE `{data['moe']}`, "
        f"bf16 autocast, fused AdamW; medians of {data['rounds']} interleaved rounds x {data['steps']} steps. "
        "Rows marked `L (a,b)` are extrapolated to L layers from the rows measured at a and b layers; "
        "`T (N docs)`: N packed documents per sequence, masked (dense within documents: this package's "
        "dense pattern).",
        "",
        "| model | layers | seq | batch | compile | AC | attention | step ms | tokens/s | speedup | attn share (dense) "
        "| Amdahl bound (measured kernels) | bound (ideal work) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in data["settings"]:
        extra = s.get("extrapolated_from") or []
        layers = f"{s['layers']} ({','.join(map(str, extra))})" if extra else str(s["layers"])
        for name in ["dense", *data["patterns"]]:
            seq = f"{s['seq_len']} ({s['docs']} docs)" if s.get("docs") else str(s["seq_len"])
            lines.append(
                f"| {s['model']} | {layers} | {seq} | {s['batch']} | "
                f"{'yes' if s.get('compile') else 'no'} | {s.get('activation_checkpointing', 'none')} | {name} | "
                f"{fmt(s['step_ms'].get(name), '.1f')} | {fmt(s['tokens_per_s'].get(name), ',.0f')} | "
                f"{fmt(s['speedup'].get(name), '.2f') if name != 'dense' else '1.00'} | "
                f"{fmt(s['attention_share'], '.1%') if name == 'dense' else ''} | "
                f"{fmt(s['amdahl_bound'].get(name), '.2f') if name != 'dense' else ''} | "
                f"{fmt(s['ideal_bound'].get(name), '.2f') if name != 'dense' else ''} |"
            )
        for k, v in s["errors"].items():
            lines.append(f"\n{s['model']} @ {s['seq_len']}: `{k}` failed: {v}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import torch

    from .kernel import device_name
    from .report import gpu_slug

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    bad = [p for p in patterns if p not in PATTERNS or p == "dense"]
    if bad:
        raise ValueError(f"unknown band pattern(s) {bad}; allowed: {', '.join(p for p in PATTERNS if p != 'dense')}")
    for name in ("batch", "steps", "rounds"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.docs < 0:
        raise ValueError(f"--docs {args.docs}: the documents per sequence, 0 (none) or more")
    if args.extrapolate_to is not None and (args.layers is None or args.extrapolate_to <= args.layers):
        raise ValueError("--extrapolate-to needs --layers smaller than it")
    plan = _plan(args, device)
    out_dir = Path(args.out_dir) if args.out_dir else Path("benchmarks/results") / gpu_slug(device_name(device))
    data = {
        "device": device_name(device),
        "command": "olmoe-spattn bench train " + " ".join(_argv_echo(args)),
        "backend": args.backend,
        "moe": args.moe,
        "steps": args.steps,
        "rounds": args.rounds,
        "patterns": patterns,
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": [],
    }
    for model, layers, seq, batch, ac, target in plan:
        depths = [layers, 2 * layers] if target else [layers]
        measured = []
        for depth in depths:
            t0 = time.perf_counter()
            print(f"bench train: {model} layers={depth or 'recipe'} seq={seq or 'recipe'} batch={batch} "
                  f"compile={args.compile} ac={ac} ...", flush=True)
            s = Setting(model, depth or None, seq or None, batch, compile=args.compile,  # type: ignore[arg-type]
                        activation_checkpointing=ac, docs=args.docs)
            s = bench_setting(s, patterns, args, device)
            measured.append(s)
            data["settings"].append(asdict(s))
            print(_summary_line(s) + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
            _write(data, out_dir)  # after every setting, so a cut-off run keeps what it measured
        if target:
            row = extrapolate(measured[0], measured[1], target, patterns)
            data["settings"].append(asdict(row))
            print(_summary_line(row) + f" (extrapolated from {row.extrapolated_from} layers)", flush=True)
            _write(data, out_dir)
    print(to_markdown(data))
    print(f"wrote {out_dir / 'train_bench.json'} and {out_dir / 'train_bench.md'}")
    return 0


def _plan(args: argparse.Namespace, device: torch.device) -> list[tuple[str, int, int, int, str, int | None]]:
    """``(model, layers, seq_len, batch, activation_checkpointing, extrapolate_to)`` per setting
    (0 = the recipe's value)."""
    ac = args.activation_checkpointing
    if args.preset == "paper":
        return [(m, layers, seq, batch, ac or "none", None) for m, layers, seq, batch in PAPER_SETTINGS]
    if args.preset == "long":
        plan = []
        for seq in LONG_SEQ_LENS:
            modes = [ac] if ac else list(AC_CHOICES)
            fit = next((m for m in modes if fits_one_device("olmoe-1b-7b", None, seq, 1, m, device)), None)
            if fit is not None:
                plan.append(("olmoe-1b-7b", 0, seq, 1, fit, None))
            else:
                plan.append(("olmoe-1b-7b", LONG_DEPTHS[0], seq, 1, ac or "none", 16))
        return plan
    return [(args.model, args.layers or 0, args.seq_len or 0, args.batch, ac or "none", args.extrapolate_to)]


def _write(data: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_bench.json").write_text(json.dumps(data, indent=2))
    (out_dir / "train_bench.md").write_text(to_markdown(data))


def _summary_line(s: Setting) -> str:
    docs = f" docs={s.docs}" if s.docs else ""
    parts = [f"{s.model} L={s.layers} T={s.seq_len} B={s.batch}{docs}:"]
    for name, tps in s.tokens_per_s.items():
        extra = f" x{s.speedup[name]:.2f} (bound {s.amdahl_bound.get(name, float('nan')):.2f})" if name in s.speedup else ""
        parts.append(f"{name} {tps:,.0f} tok/s{extra}")
    if s.attention_share is not None:
        parts.append(f"attention share {s.attention_share:.1%}")
    if s.errors:
        parts.append(f"errors: {s.errors}")
    return " ".join(parts)


def _argv_echo(args: argparse.Namespace) -> list[str]:
    out = []
    keys = ("model", "layers", "seq_len", "batch", "extrapolate_to") if args.preset is None else ("preset",)
    for key in (*keys, "patterns", "backend", "moe", "steps", "rounds", "warmup", "activation_checkpointing",
                "docs"):
        value = getattr(args, key, None)
        if value is not None and not (key == "docs" and not value):
            out.append(f"--{key.replace('_', '-')} {value}")
    if getattr(args, "compile", False):
        out.append("--compile")
    return out

