"""Long-range retrieval probe: which distances do band heads reach after training?

A synthetic key-value task. Each sequence of length ``T`` is filler tokens with key-value pairs
planted in it (``key`` then its ``value`` on the next position; keys distinct within a
sequence). The last three positions ask for one of them::

    ... filler ... k7 v3 ... filler ... k2 v9 ... filler ... QUERY k7 -> v3

The model is trained (cross-entropy on the answer only) and then scored on fresh sequences:
retrieval accuracy per *distance bucket*, the distance being from the query position back to
the asked value (``[2^i, 2^(i+1))``, the last bucket ending at ``T``). Training samples
distances uniformly over the buckets so each gets the same signal. The same initial weights
are trained once per attention (dense, and band patterns with ``partition_len = T``); the
report also gives, per bucket, the share of (head, distance) pairs inside some head's band
(one layer; a deeper model can relay information between heads across layers).

Examples:
  olmoe-spattn bench retrieval                                   # GPU defaults, ~minutes
  olmoe-spattn bench retrieval --seq-len 4096 --steps 2000 --layers 4
  olmoe-spattn bench retrieval --seq-len 64 --steps 20 --d-model 32 --device cpu   # smoke test

Results go to benchmarks/results/<gpu>/retrieval.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..api import BACKENDS
from ..bands import PATTERNS, BandSpec

if TYPE_CHECKING:  # torch loads when the benchmark runs, not for --help
    import torch

#: token ids: 0 = QUERY marker, then keys, values, filler
QUERY = 0


@dataclass(frozen=True)
class Task:
    """Vocabulary layout and geometry of the retrieval task."""

    seq_len: int
    n_keys: int = 64
    n_values: int = 64
    n_filler: int = 64
    pairs: int = 4  # planted pairs per sequence (one is asked)

    def __post_init__(self) -> None:
        if self.seq_len < 16:
            raise ValueError(f"--seq-len must be >= 16, got {self.seq_len}")
        if not 1 <= self.pairs <= self.n_keys:
            raise ValueError(f"--pairs must be in [1, n_keys={self.n_keys}], got {self.pairs}")
        if 2 * self.pairs + 3 > self.seq_len // 2:
            raise ValueError(f"--pairs={self.pairs} does not fit a sequence of {self.seq_len}")

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_keys + self.n_values + self.n_filler

    def key(self, i: torch.Tensor) -> torch.Tensor:
        return 1 + i

    def value(self, i: torch.Tensor) -> torch.Tensor:
        return 1 + self.n_keys + i

    @property
    def max_distance(self) -> int:
        """Largest query-to-value distance: value at position 1 (key at 0), query at ``T - 2``."""
        return self.seq_len - 3

    def buckets(self) -> list[tuple[int, int]]:
        """``[lo, hi)`` distance buckets: powers of two from 2 up to ``max_distance``."""
        edges = [2]
        while edges[-1] * 2 <= self.max_distance:
            edges.append(edges[-1] * 2)
        edges.append(self.max_distance + 1)
        return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def make_batch(task: Task, batch: int, gen: torch.Generator, distances: torch.Tensor | None = None):
    """``(ids [B, T], answers [B], distances [B])``.

    ``distances`` (query position minus the asked value's position) default to a uniform draw
    over :meth:`Task.buckets` then uniform inside the bucket. Distractor pairs go to random
    free positions before the query.
    """
    import torch

    T = task.seq_len
    ids = task.n_keys + task.n_values + 1 + torch.randint(0, task.n_filler, (batch, T), generator=gen)  # filler
    if distances is None:
        buckets = task.buckets()
        which = torch.randint(0, len(buckets), (batch,), generator=gen)
        lo = torch.tensor([buckets[i][0] for i in which])
        hi = torch.tensor([buckets[i][1] for i in which])
        distances = lo + (torch.rand(batch, generator=gen) * (hi - lo)).long()
    distances = distances.long()
    if int(distances.min()) < 2 or int(distances.max()) > task.max_distance:
        raise ValueError(f"distances must be in [2, {task.max_distance}]")
    answers = torch.empty(batch, dtype=torch.long)
    q = T - 2  # position of the queried key (the model predicts the value there)
    for b in range(batch):
        keys = torch.randperm(task.n_keys, generator=gen)[: task.pairs]
        vals = torch.randint(0, task.n_values, (task.pairs,), generator=gen)
        vpos = q - int(distances[b])  # the asked value's position; its key is one before
        taken = {vpos - 1, vpos}
        positions = [vpos - 1]
        for _ in range(task.pairs - 1):  # distractors on free slots in [0, T-4]
            while True:
                p = int(torch.randint(0, T - 4, (1,), generator=gen))
                if p not in taken and p + 1 not in taken:
                    break
            taken |= {p, p + 1}
            positions.append(p)
        for p, k, v in zip(positions, keys, vals):
            ids[b, p], ids[b, p + 1] = task.key(k), task.value(v)
        ids[b, T - 3], ids[b, T - 2] = QUERY, task.key(keys[0])
        ids[b, T - 1] = task.value(vals[0])
        answers[b] = ids[b, T - 1]
    return ids, answers, distances


def accuracy_by_bucket(predicted: torch.Tensor, answers: torch.Tensor, distances: torch.Tensor,
                       buckets: list[tuple[int, int]]) -> list[dict[str, float]]:
    """Per bucket: ``{"lo", "hi", "n", "accuracy"}`` (accuracy ``nan`` for an empty bucket)."""

    out = []
    for lo, hi in buckets:
        sel = (distances >= lo) & (distances < hi)
        n = int(sel.sum())
        acc = float((predicted[sel] == answers[sel]).float().mean()) if n else float("nan")
        out.append({"lo": lo, "hi": hi, "n": n, "accuracy": acc})
    return out


def band_coverage(spec: BandSpec | None, seq_len: int, buckets: list[tuple[int, int]]) -> list[float]:
    """Share of (head, distance) pairs of each bucket inside a head's band, for the last query."""
    import torch

    if spec is None:
        return [1.0 for _ in buckets]
    allowed = spec.mask(seq_len)[:, seq_len - 2, :]  # [H, T] keys the query position sees
    q = seq_len - 2
    out = []
    for lo, hi in buckets:
        keys = torch.arange(q - hi + 1, q - lo + 1).clamp(min=0)  # positions at distances [lo, hi)
        out.append(float(allowed[:, keys].float().mean()))
    return out


@dataclass
class PatternResult:
    attention: str
    final_loss: float = math.nan
    buckets: list[dict[str, float]] = field(default_factory=list)
    coverage: list[float] = field(default_factory=list)
    overall: float = math.nan
    train_s: float = 0.0


def _model(task: Task, args: argparse.Namespace, attention: str, device: torch.device):
    import torch

    from ..olmo.model import build_model, olmoe_config

    config = olmoe_config(
        vocab_size=task.vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
        num_experts=args.experts, top_k=args.top_k, expert_hidden_size=args.d_model,
        attention=attention, partition_len=None if attention == "dense" else task.seq_len, backend=args.backend,
    )
    torch.manual_seed(args.seed)  # the same initial weights for every attention
    model = build_model(config, device, max_seq_len=task.seq_len)
    if device.type == "cuda":
        from ..olmo.moe_grouped import grouped_mm_available, use_grouped_mm_moe

        if grouped_mm_available(device):
            use_grouped_mm_moe(model)
    return model


def _answer_logits(model, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(ids[:, :-1])  # [B, T-1, V]
    return logits[:, -1].float()  # [B, V]: prediction at the queried key


def train_and_score(task: Task, args: argparse.Namespace, attention: str, device: torch.device) -> PatternResult:
    """Trains one attention variant on the task, then scores it per distance bucket."""
    import torch

    model = _model(task, args, attention, device).train()
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / max(1, args.steps // 10)))
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same data for every attention
    result = PatternResult(attention)
    t0 = time.perf_counter()
    for step in range(args.steps):
        ids, answers, _ = make_batch(task, args.batch, gen)
        loss = torch.nn.functional.cross_entropy(_answer_logits(model, ids.to(device), device), answers.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        post_batch = getattr(model, "post_batch", None)
        if post_batch is not None:
            post_batch()
        result.final_loss = float(loss)
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"  {attention} step {step + 1}/{args.steps} loss {result.final_loss:.3f}", flush=True)
    result.train_s = time.perf_counter() - t0
    model.eval()
    eval_gen = torch.Generator().manual_seed(args.seed + 2)
    buckets = task.buckets()
    preds, golds, dists = [], [], []
    with torch.no_grad():
        for lo, hi in buckets:  # the same number of eval sequences in every bucket
            for _ in range(args.eval_batches):
                d = torch.randint(lo, hi, (args.batch,), generator=eval_gen)
                ids, answers, d = make_batch(task, args.batch, eval_gen, distances=d)
                preds.append(_answer_logits(model, ids.to(device), device).argmax(-1).cpu())
                golds.append(answers)
                dists.append(d)
    predicted, answers, distances = torch.cat(preds), torch.cat(golds), torch.cat(dists)
    result.buckets = accuracy_by_bucket(predicted, answers, distances, buckets)
    result.overall = float((predicted == answers).float().mean())
    spec = None if attention == "dense" else BandSpec(attention, args.heads, task.seq_len)
    result.coverage = band_coverage(spec, task.seq_len, buckets)
    return result


def to_markdown(data: dict) -> str:
    results = data["results"]
    buckets = [(b["lo"], b["hi"]) for b in results[0]["buckets"]] if results else []
    head = " | ".join(f"d {lo}-{hi - 1}" for lo, hi in buckets)
    lines = [
        f"# Long-range retrieval probe ({data['device']})",
        "",
        f"Command: `{data['command']}`. Seq {data['seq_len']}, {data['pairs']} key-value pairs per sequence, "
        f"{data['layers']} layers, d_model {data['d_model']}, {data['heads']} heads, {data['steps']} steps x "
        f"batch {data['batch']}; chance = 1/{data['n_values']}. Accuracy per query-to-value distance "
        "(band coverage of one layer's heads in brackets).",
        "",
        f"| attention | final loss | overall | {head} |",
        "|---|---|---|" + "---|" * len(buckets),
    ]
    for r in results:
        cells = " | ".join(f"{b['accuracy']:.2f} ({c:.0%})" for b, c in zip(r["buckets"], r["coverage"]))
        lines.append(f"| {r['attention']} | {r['final_loss']:.3f} | {r['overall']:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patterns", default="dense,spattention,exclusive_bands",
                        help="comma-separated attentions to train (default dense,spattention,exclusive_bands)")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length = partition length (default 2048)")
    parser.add_argument("--pairs", type=int, default=4, help="key-value pairs planted per sequence (default 4)")
    parser.add_argument("--keys", type=int, default=64, help="distinct keys (default 64)")
    parser.add_argument("--values", type=int, default=64, help="distinct values; chance = 1/values (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="layers (default 2)")
    parser.add_argument("--d-model", type=int, default=256, help="model width (default 256)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    parser.add_argument("--experts", type=int, default=4, help="experts (default 4)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per attention (default 1500)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--eval-batches", type=int, default=4, help="eval batches per distance bucket (default 4)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="band_attention backend (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    parser.add_argument("--log-every", type=int, default=100, help="log the loss every N steps (0: never)")
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results/<gpu>)")
    parser.add_argument("--device", default=None, help="device (default cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    import torch

    from .kernel import device_name
    from .report import gpu_slug

    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    bad = [p for p in patterns if p not in PATTERNS]
    if bad:
        raise ValueError(f"unknown attention(s) {bad}; allowed: {', '.join(PATTERNS)}")
    for name in ("steps", "batch", "eval_batches", "layers", "d_model", "heads", "experts", "top_k"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.d_model % args.heads:
        raise ValueError(f"--d-model={args.d_model} must be divisible by --heads={args.heads}")
    task = Task(args.seq_len, n_keys=args.keys, n_values=args.values, pairs=args.pairs)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(args.out_dir) if args.out_dir else Path("benchmarks/results") / gpu_slug(device_name(device))
    data = {
        "device": device_name(device),
        "command": "olmoe-spattn bench retrieval " + " ".join(
            f"--{k.replace('_', '-')} {getattr(args, k)}" for k in
            ("patterns", "seq_len", "pairs", "layers", "d_model", "heads", "steps", "batch", "lr", "seed")),
        "seq_len": task.seq_len, "pairs": task.pairs, "n_values": task.n_values, "layers": args.layers,
        "d_model": args.d_model, "heads": args.heads, "steps": args.steps, "batch": args.batch,
        "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "results": [],
    }
    for attention in patterns:
        print(f"bench retrieval: training {attention} (seq {task.seq_len}, {args.steps} steps) ...", flush=True)
        result = train_and_score(task, args, attention, device)
        data["results"].append(asdict(result))
        accs = ", ".join(f"{b['lo']}-{b['hi'] - 1}: {b['accuracy']:.2f}" for b in result.buckets)
        print(f"  {attention}: overall {result.overall:.2f} ({accs}) in {result.train_s:.0f}s", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "retrieval.json").write_text(json.dumps(data, indent=2))
        (out_dir / "retrieval.md").write_text(to_markdown(data))
    print(to_markdown(data))
    print(f"wrote {out_dir / 'retrieval.json'} and {out_dir / 'retrieval.md'}")
    return 0
