"""``olmoe-spattn bench quality``: dense vs band attention at equal tokens, on real local text.

Trains the Table 2 model (8 layers, 8 heads, d_model 1024, dense SwiGLU FFN, OLMo-core
blocks) once per attention variant (dense, spattention, exclusive_bands, gapped_bands,
sliding_window) from the same initial weights, on the same batches, for the same number of
tokens, at each sequence length; evaluates held-out loss at fixed intervals on the same
held-out windows. Band variants use partition length = sequence length.

Corpus: by default the Python standard library's source files (code, docstrings, comments:
real text present on every machine, no network); --corpus points it at any files or folders
(.txt, .md, .rst, .py, optionally .gz). A byte-level BPE tokenizer is trained on the
training split (--vocab-size).

Writes to --out: quality.json, quality.md (final held-out loss per variant, the difference
to dense, and the comparison with the ordering of the paper's Table 3), quality_loss.png
(held-out loss curves) and checkpoints/seq<T>-<variant>/ (model.safetensors +
model_config.json, readable by `olmoe-spattn analyze heads`).

Examples:
  olmoe-spattn bench quality --seq-lens 1024,4096 --tokens 20000000
  olmoe-spattn bench quality --tiny --corpus README.md docs/ --out /tmp/q   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from .table2 import int_list, name_list

VARIANTS: tuple[str, ...] = ("dense", "spattention", "exclusive_bands", "gapped_bands", "sliding_window")
#: the paper's Table 3 (OLMoE 0.25B-1.75B, downstream average; higher is better)
PAPER_TABLE3_AVERAGE: dict[str, float] = {
    "spattention": 0.3434, "sliding_window": 0.3376, "gapped_bands": 0.3315, "exclusive_bands": 0.3289,
}
#: the ordering the paper's text claims: (better, worse) pairs
PAPER_CLAIMED_ORDER: tuple[tuple[str, str], ...] = (
    ("spattention", "exclusive_bands"), ("exclusive_bands", "gapped_bands"), ("exclusive_bands", "sliding_window"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``olmoe-spattn bench quality``."""
    parser.add_argument("--corpus", nargs="+", default=None, metavar="PATH",
                        help="text files or folders (default: the Python standard library's source)")
    parser.add_argument("--seq-lens", type=int_list, default=[1024], help="comma-separated sequence lengths (default 1024)")
    parser.add_argument("--variants", type=lambda s: name_list(s, VARIANTS, "variant(s)"), default=list(VARIANTS),
                        help=f"comma-separated attention variants (default {','.join(VARIANTS)})")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per variant (default 20M; --tiny: 3 steps)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="tokens per step (default 32768; --tiny: 2 sequences)")
    parser.add_argument("--lr", type=float, default=6e-4, help="peak learning rate, AdamW (default 6e-4)")
    parser.add_argument("--warmup-fraction", type=float, default=0.05, help="linear warm-up share of the steps (default 0.05)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default: 20 points)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per evaluation (default 262144; --tiny: 2 sequences)")
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 8192; --tiny: 512)")
    parser.add_argument("--heldout-percent", type=float, default=5.0, help="share of files held out (default 5)")
    parser.add_argument("--d-model", type=int, default=None, help="model width (default 1024; --tiny: 64)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default 8; --tiny: 2)")
    parser.add_argument("--heads", type=int, default=None, help="heads (default 8; --tiny: 4)")
    parser.add_argument("--backend", default="auto", help="band_attention backend (default auto: Triton on CUDA)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, seq 32, 3 steps")
    parser.add_argument("--out", default="runs/quality", help="output folder (default runs/quality); runs of other "
                        "lengths or variants already in its quality.json are kept when corpus and model match")
    parser.add_argument("--device", default=None, help="device (default cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and batch order (default 0)")


def _resolve(args: argparse.Namespace) -> None:
    """Fills defaults (``--tiny`` or full size) and validates the numbers."""
    tiny = args.tiny
    if tiny and args.seq_lens == [1024]:
        args.seq_lens = [32]
    defaults = {"vocab_size": (512, 8192), "d_model": (64, 1024), "layers": (2, 8), "heads": (4, 8)}
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    for name in ("d_model", "layers", "heads", "lr"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.warmup_fraction < 1:
        raise ValueError(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}")
    from ..api import BACKENDS

    if args.backend not in BACKENDS:
        raise ValueError(f"--backend {args.backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    for seq_len in args.seq_lens:
        if seq_len < args.heads:
            raise ValueError(f"--seq-lens value {seq_len} is smaller than --heads {args.heads}")


def plan(args: argparse.Namespace, seq_len: int) -> dict[str, int]:
    """Batch size, steps and evaluation schedule for one sequence length."""
    batch = max(1, (args.batch_tokens or (2 * seq_len if args.tiny else 32768)) // seq_len)
    tokens = args.tokens if args.tokens is not None else (3 * batch * seq_len if args.tiny else 20_000_000)
    if tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {tokens}")
    steps = max(1, tokens // (batch * seq_len))
    eval_every = args.eval_every or max(1, steps // 20)
    eval_batches = max(1, (args.eval_tokens or (2 * seq_len if args.tiny else 262144)) // (batch * seq_len))
    return {"batch": batch, "steps": steps, "eval_every": eval_every, "eval_batches": eval_batches}


def _windows(tokens, seq_len: int, n: int, generator):
    """``n`` random windows of ``seq_len + 1`` tokens: int64 ``[n, seq_len + 1]``."""
    import torch

    if tokens.size < seq_len + 2:
        raise ValueError(f"the corpus split has {tokens.size} tokens, fewer than one sequence of {seq_len + 1}")
    starts = torch.randint(0, tokens.size - seq_len - 1, (n,), generator=generator)
    data = torch.from_numpy(tokens)
    return torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()


def train_variant(variant: str, seq_len: int, corpus, args: argparse.Namespace, device, log=print) -> dict:
    """Trains one model; returns its held-out curve and final numbers (and the model)."""
    import torch

    from ..olmo.model import build_model, with_attention
    from .paper_model import ModelShape, table2_config

    p = plan(args, seq_len)
    shape = ModelShape(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, vocab_size=corpus.vocab_size)
    config = with_attention(table2_config(shape), variant, partition_len=seq_len,
                            backend=None if variant == "dense" else args.backend)
    torch.manual_seed(args.seed)  # same initial weights for every variant (same parameters)
    model = build_model(config, device, max_seq_len=seq_len)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                              fused=device.type == "cuda")
    warmup = int(args.warmup_fraction * p["steps"])

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, p["steps"] - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    g_train = torch.Generator().manual_seed(args.seed)
    g_eval = torch.Generator().manual_seed(args.seed + 1)
    eval_batches = [_windows(corpus.heldout, seq_len, p["batch"], g_eval) for _ in range(p["eval_batches"])]
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def loss_of(batch):
        ids = batch.to(device)
        with torch.autocast(**autocast):
            logits = model(ids[:, :-1])  # [B, T, V]
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = sum(float(loss_of(b)) for b in eval_batches) / len(eval_batches)
        model.train()
        return total

    curve: list[dict] = []
    train_losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(p["steps"]):
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_of(_windows(corpus.train, seq_len, p["batch"], g_train))
        if not torch.isfinite(loss):
            raise ValueError(f"{variant} @ seq {seq_len}: training loss is {float(loss)} at step {step} "
                             "(lower --lr?)")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        train_losses.append(float(loss.detach()))
        if (step + 1) % p["eval_every"] == 0 or step + 1 == p["steps"]:
            held = evaluate()
            curve.append({"step": step + 1, "tokens": (step + 1) * p["batch"] * seq_len, "heldout_loss": held,
                          "train_loss": sum(train_losses[-p["eval_every"]:]) / len(train_losses[-p["eval_every"]:])})
            elapsed = time.perf_counter() - t0
            log(f"  {variant:<16} seq {seq_len} step {step + 1}/{p['steps']} held-out loss {held:.4f} "
                f"({elapsed:.0f}s, {(step + 1) * p['batch'] * seq_len / elapsed:,.0f} tokens/s incl. evals)")
    return {"variant": variant, "seq_len": seq_len, **p, "shape": shape.to_dict(), "curve": curve,
            "final_heldout_loss": curve[-1]["heldout_loss"], "seconds": time.perf_counter() - t0, "model": model}


# ---------------------------------------------------------------- report
def ordering_report(final: dict[str, float]) -> list[str]:
    """Plain statements comparing final held-out losses (lower is better) with dense and with
    the paper's Table 3 ordering."""
    lines = []
    dense = final.get("dense")
    for v, loss in sorted(final.items(), key=lambda kv: kv[1]):
        if v == "dense" or dense is None:
            continue
        diff = loss - dense
        verdict = "loses to dense" if diff > 0 else "matches or beats dense"
        lines.append(f"- `{v}` {verdict}: {diff:+.4f} nats held-out loss ({math.exp(diff) - 1:+.1%} perplexity).")
    for better, worse in PAPER_CLAIMED_ORDER:
        if better in final and worse in final:
            holds = final[better] <= final[worse]
            lines.append(f"- paper's claimed order `{better}` >= `{worse}`: "
                         f"{'holds' if holds else 'does NOT hold'} here ({final[better]:.4f} vs {final[worse]:.4f}).")
    ours = [v for v in sorted(final, key=final.get) if v in PAPER_TABLE3_AVERAGE]
    paper = sorted(PAPER_TABLE3_AVERAGE, key=PAPER_TABLE3_AVERAGE.get, reverse=True)
    paper = [v for v in paper if v in final]
    if len(ours) >= 2:
        lines.append(f"- band variants, best to worst here: {' > '.join(ours)}; in the paper's Table 3 "
                     f"(downstream average): {' > '.join(paper)}.")
    return lines


def to_markdown(data: dict) -> str:
    """Final held-out loss per variant and sequence length, and the ordering statements."""
    c = data["corpus"]
    shape = data["runs"][0]["shape"] if data["runs"] else {}
    lines = [
        f"# Quality at equal tokens: held-out loss ({data['device']})",
        "",
        f"Corpus: {c['n_files']} files under {', '.join(c['roots'])} ({c['train_tokens']:,} training tokens, "
        f"{c['heldout_tokens']:,} held-out tokens from {c['n_heldout_files']} held-out files); byte-level BPE, "
        f"vocab {c['vocab_size']}, trained on the training split.",
        f"Model: {shape.get('n_layers')} layers, {shape.get('n_heads')} heads, d_model {shape.get('d_model')} "
        "(OLMo-core blocks, dense SwiGLU FFN); same initial weights and batches for every variant; "
        f"AdamW, peak lr {data['lr']}, cosine schedule. Band partition length = sequence length.",
        "",
        f"Command: `{data['command']}`",
    ]
    for seq_len in sorted({r["seq_len"] for r in data["runs"]}):
        runs = [r for r in data["runs"] if r["seq_len"] == seq_len]
        final = {r["variant"]: r["final_heldout_loss"] for r in runs}
        r0 = runs[0]
        lines += [
            "",
            f"## seq {seq_len}: {r0['steps']} steps x {r0['batch']} sequences = "
            f"{r0['steps'] * r0['batch'] * seq_len:,} tokens per variant",
            "",
            "| attention | held-out loss | perplexity | vs dense | train loss (last interval) | time s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(runs, key=lambda r: r["final_heldout_loss"]):
            d = final.get("dense")
            vs = "-" if d is None or r["variant"] == "dense" else f"{r['final_heldout_loss'] - d:+.4f}"
            lines.append(f"| {r['variant']} | {r['final_heldout_loss']:.4f} | {math.exp(r['final_heldout_loss']):.2f} | "
                         f"{vs} | {r['curve'][-1]['train_loss']:.4f} | {r['seconds']:.0f} |")
        lines += ["", *ordering_report(final)]
    lines += ["", "The paper's Table 3 reports downstream accuracy after pre-training an OLMoE 0.25B-1.75B "
              "model, not held-out loss; the orderings are compared, not the numbers."]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> Path:
    """Held-out loss against training tokens, one panel per sequence length."""
    from ..plots import pyplot, save

    plt = pyplot()

    lengths = sorted({r["seq_len"] for r in data["runs"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.6), squeeze=False)
    for ax, seq_len in zip(axes[0], lengths):
        for r in data["runs"]:
            if r["seq_len"] == seq_len:
                xs = [p["tokens"] / 1e6 for p in r["curve"]]
                ax.plot(xs, [p["heldout_loss"] for p in r["curve"]], marker=".", label=r["variant"],
                        ls="--" if r["variant"] == "dense" else "-", color="black" if r["variant"] == "dense" else None)
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("held-out loss")
        ax.set_title(f"seq {seq_len}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def write_outputs(data: dict, out: Path) -> None:
    """quality.json, quality.md and quality_loss.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(data, indent=2))
    (out / "quality.md").write_text(to_markdown(data))
    plot(data, out / "quality_loss.png")


def _earlier_runs(path: Path, data: dict, args: argparse.Namespace) -> list[dict]:
    """Runs in an existing ``quality.json`` with the same corpus, model and learning rate that
    this invocation does not redo (so lengths can be trained in separate invocations)."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    shape = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads}
    same = old.get("corpus") == data["corpus"] and old.get("lr") == data["lr"] and all(
        {k: r["shape"][k] for k in shape} == shape for r in old.get("runs", []))
    if not same:
        return []
    redo = {(s, v) for s in args.seq_lens for v in args.variants}
    return [r for r in old.get("runs", []) if (r["seq_len"], r["variant"]) not in redo]


def run(args: argparse.Namespace) -> int:
    """Prepares the corpus, trains every (sequence length, variant), writes results as it goes."""
    import sys

    import torch

    from .paper_model import ModelShape, save_small_model
    from .quality_data import prepare_corpus
    from .report import command_line

    _resolve(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    corpus = prepare_corpus(args.corpus, out, vocab_size=args.vocab_size, heldout_percent=args.heldout_percent,
                            log=lambda m: print(m, flush=True))
    data = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "command": command_line(sys.argv, "quality"),
        "lr": args.lr,
        "backend": args.backend,
        "corpus": {k: v for k, v in corpus.description.items() if k != "fingerprint"},
        "tokenizer": str(corpus.tokenizer_dir),
        "runs": [],
    }
    data["runs"] = _earlier_runs(out / "quality.json", data, args)
    for seq_len in args.seq_lens:
        p = plan(args, seq_len)
        print(f"bench quality: seq {seq_len}: {p['steps']} steps x batch {p['batch']} per variant", flush=True)
        for variant in args.variants:
            result = train_variant(variant, seq_len, corpus, args, device, log=lambda m: print(m, flush=True))
            model = result.pop("model")
            ckpt = out / "checkpoints" / f"seq{seq_len}-{variant}"
            save_small_model(ckpt, model, ModelShape(**result["shape"]), variant, seq_len,
                             extra={"tokenizer": str(corpus.tokenizer_dir.resolve()), "final_heldout_loss":
                                    result["final_heldout_loss"]})
            result["checkpoint"] = str(ckpt)
            data["runs"].append(result)
            write_outputs(data, out)  # after every run, so a cut-off study keeps what it trained
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(to_markdown(data))
    print(f"wrote {out / 'quality.md'}, {out / 'quality.json'}, {out / 'quality_loss.png'} and checkpoints under "
          f"{out / 'checkpoints'}")
    return 0
