"""Per-layer, per-head attention statistics of a trained model, as in the paper's head analysis.

For one text window, every attention layer's q, k, v and output are recorded while the
model runs its own attention implementation; the attention probabilities are then
recomputed in float64 under the layer's mask (the band spec's :meth:`BandSpec.mask`, or
the causal mask for dense layers). Per head:

- **entropy**: ``-sum_j p_ij log p_ij``, averaged over queries that have at least one
  allowed key (nats); ``entropy_max`` is the same average of ``log(#allowed keys)``, the
  bound a uniform head would reach (the paper's ``log(N/H)`` vs ``log(i+1)``);
- **mean distance**: ``sum_j p_ij (i - j)``, averaged over those queries (tokens).

Per layer, **diversity** of the head outputs (the paper's standard deviation across heads):
each head's output vector at each token is scaled to unit length, the standard deviation
across heads is taken per token and channel, and averaged. Identical heads give 0; the
paper's text does not give its exact formula (its Appendix A is not part of the text), so
this definition is ours and is the one the numbers here follow.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


# ---------------------------------------------------------------- metrics
def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention weights in float64 for one head: ``q [Tq, D]``, ``k [Tk, D]``, bool
    ``mask [Tq, Tk]`` -> ``[Tq, Tk]``; rows with no allowed key are all zero."""
    scores = (q.double() @ k.double().T) * scale  # [Tq, Tk]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # empty rows: softmax of all -inf is NaN


def _live_rows(probs: torch.Tensor) -> torch.Tensor:
    return probs.sum(-1) > 0.5  # [..., Tq]: rows that attended somewhere


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) over non-empty rows: ``probs [..., Tq, Tk]`` -> ``[...]``."""
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-300).log(), torch.zeros_like(probs))
    ent = -plogp.sum(-1)  # [..., Tq]
    live = _live_rows(probs)
    return (ent * live).sum(-1) / live.sum(-1).clamp_min(1)


def max_entropy(mask: torch.Tensor) -> torch.Tensor:
    """Mean ``log(#allowed keys)`` over non-empty rows: bool ``mask [..., Tq, Tk]`` -> ``[...]``
    (``q_offset`` 0: query ``i`` is key position ``i``)."""
    counts = mask.sum(-1).double()  # [..., Tq]
    live = counts > 0
    return (counts.clamp_min(1).log() * live).sum(-1) / live.sum(-1).clamp_min(1)


def mean_distance(probs: torch.Tensor) -> torch.Tensor:
    """Mean attended distance ``sum_j p_ij (i - j)`` over non-empty rows (queries and keys are
    the same positions): ``probs [..., T, T]`` -> ``[...]``."""
    t = probs.shape[-1]
    dist = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).to(probs)  # [T, T]
    per_row = (probs * dist).sum(-1)  # [..., T]
    live = _live_rows(probs)
    return (per_row * live).sum(-1) / live.sum(-1).clamp_min(1)


def head_diversity(outputs: torch.Tensor) -> float:
    """Standard deviation across heads of unit-length head outputs, averaged over tokens and
    channels: ``outputs [T, H, D]`` -> float (0 when all heads agree).

    Tokens where a head outputs all zeros (an empty row) keep a zero vector.
    """
    if outputs.dim() != 3 or outputs.shape[1] < 2:
        raise ValueError(f"outputs must be [T, H >= 2, D], got {tuple(outputs.shape)}")
    x = outputs.double()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [T, H, D]
    return float(x.std(dim=1, unbiased=False).mean())


# ---------------------------------------------------------------- capture
def _layer_mask(layer, seq_len: int) -> torch.Tensor:
    """Bool ``[H, T, T]`` mask of one OLMo-core attention layer (band spec or causal)."""
    spec = getattr(layer.backend, "spec", None)
    if spec is not None:
        return spec.mask(seq_len)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return causal.expand(layer.n_heads, seq_len, seq_len)


@torch.no_grad()
def analyze_model(model: torch.nn.Module, ids: torch.Tensor) -> list[dict]:
    """Runs ``ids`` (int ``[1, T]``) through ``model`` and returns one dict per attention
    layer: ``entropy``, ``entropy_max``, ``mean_distance`` (lists over heads), ``diversity``,
    and ``recompute_error``: the largest difference between the layer's own output and the
    float64 probabilities times ``v`` (small when the statistics describe what the layer did)."""
    from ..bench.paper_model import attention_layers

    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be [1, T], got {tuple(ids.shape)}")
    layers = attention_layers(model)
    if not layers:
        raise ValueError("the model has no OLMo-core attention layers")
    records: dict[int, tuple] = {}
    originals = [lay.backend.forward for lay in layers]

    def recorder(i: int, inner):
        def forward(qkv, *args, **kwargs):
            out = inner(qkv, *args, **kwargs)
            q, k, v = qkv
            records[i] = tuple(x[0].detach().float().cpu() for x in (q, k, v, out))
            return out

        return forward

    try:
        for i, lay in enumerate(layers):
            lay.backend.forward = recorder(i, originals[i])
        model(ids)
    finally:
        for lay in layers:
            if "forward" in vars(lay.backend):
                del lay.backend.forward  # back to the class's own forward
    seq_len = ids.shape[1]
    results = []
    for i, lay in enumerate(layers):
        q, k, v, out = records[i]  # [T, H, D], [T, Hkv, D], [T, Hkv, D], [T, H, D]
        n_heads, group = q.shape[1], q.shape[1] // k.shape[1]
        scale = lay.backend.scale if lay.backend.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        mask = _layer_mask(lay, seq_len)  # [H, T, T]
        ent, ent_max, dist, err = [], [], [], 0.0
        for h in range(n_heads):
            probs = attention_probs(q[:, h], k[:, h // group], mask[h], scale)  # [T, T]
            ent.append(float(attention_entropy(probs)))
            ent_max.append(float(max_entropy(mask[h])))
            dist.append(float(mean_distance(probs)))
            recomputed = probs @ v[:, h // group].double()  # [T, D]
            err = max(err, float((recomputed - out[:, h].double()).abs().max()))
        results.append({"layer": i, "entropy": ent, "entropy_max": ent_max, "mean_distance": dist,
                        "diversity": head_diversity(out), "recompute_error": err})
    return results


def summarize(layers: list[dict]) -> dict[str, float]:
    """Means over layers and heads of entropy, its bound and distance; mean layer diversity."""
    def mean(key: str) -> float:
        values = [x for lay in layers for x in lay[key]]
        return sum(values) / len(values)

    return {"entropy": mean("entropy"), "entropy_max": mean("entropy_max"),
            "mean_distance": mean("mean_distance"),
            "diversity": sum(lay["diversity"] for lay in layers) / len(layers),
            "recompute_error": max(lay.get("recompute_error", 0.0) for lay in layers)}


def plot_heads(layers: list[dict], path: str | Path, title: str) -> Path:
    """Heat maps (layer x head) of entropy and mean distance, and diversity per layer."""
    from ..plots import pyplot, save

    plt = pyplot()

    ent = [lay["entropy"] for lay in layers]
    dist = [lay["mean_distance"] for lay in layers]
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.35 * len(layers) + 2.4),
                             gridspec_kw={"width_ratios": [1, 1, 0.6]})
    for ax, values, name, cmap in ((axes[0], ent, "attention entropy (nats)", "viridis"),
                                   (axes[1], dist, "mean attended distance (tokens)", "magma")):
        im = ax.imshow(values, aspect="auto", cmap=cmap)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(values[0])))
        ax.set_yticks(range(len(values)))
        fig.colorbar(im, ax=ax, fraction=0.046)
    axes[2].barh(range(len(layers)), [lay["diversity"] for lay in layers], color="#2b6cb0")
    axes[2].invert_yaxis()
    axes[2].set_yticks(range(len(layers)))
    axes[2].set_xlabel("std across heads")
    axes[2].set_title("head-output diversity", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)
