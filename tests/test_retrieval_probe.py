"""``bench retrieval``: the synthetic key-value task is well-formed and solvable, scoring per
distance bucket is right (oracle and constant predictors), band coverage matches the band
geometry, and the command runs end to end at tiny scale on a CPU."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("olmo_core")

from olmoe_spattn.bands import BandSpec  # noqa: E402
from olmoe_spattn.bench.retrieval import (  # noqa: E402
    QUERY,
    Task,
    accuracy_by_bucket,
    band_coverage,
    make_batch,
)
from olmoe_spattn.cli import main  # noqa: E402


def _oracle(ids: torch.Tensor) -> torch.Tensor:
    """Looks the queried key up in the sequence and answers the token after it."""
    T = ids.shape[1]
    out = []
    for row in ids:
        (pos,) = (row[: T - 3] == row[T - 2]).nonzero(as_tuple=True)
        assert pos.numel() == 1  # the queried key occurs exactly once before the query
        out.append(row[pos[0] + 1])
    return torch.stack(out)


def test_batches_are_well_formed():
    task = Task(128, pairs=5)
    ids, answers, dist = make_batch(task, 64, torch.Generator().manual_seed(0))
    T = task.seq_len
    assert ids.shape == (64, T) and bool((ids[:, T - 3] == QUERY).all())
    assert bool((ids[:, T - 1] == answers).all())
    rows = torch.arange(64)
    assert bool((ids[rows, T - 2 - dist] == answers).all())  # value at the stated distance
    assert bool((ids[rows, T - 3 - dist] == ids[:, T - 2]).all())  # its key right before it
    keys = (ids[:, : T - 3] >= 1) & (ids[:, : T - 3] <= task.n_keys)
    assert bool((keys.sum(1) == task.pairs).all())  # all pairs planted, none overwritten
    assert int(ids.max()) < task.vocab_size
    buckets = task.buckets()
    assert buckets[0][0] == 2 and buckets[-1][1] == task.max_distance + 1
    hit = {i for i, (lo, hi) in enumerate(buckets) for d in dist.tolist() if lo <= d < hi}
    assert len(hit) == len(buckets)  # training draws reach every bucket
    with pytest.raises(ValueError, match="distances"):
        make_batch(task, 1, torch.Generator(), distances=torch.tensor([T]))


def test_scoring_with_oracle_and_constant_predictors():
    task = Task(64)
    buckets = task.buckets()
    gen = torch.Generator().manual_seed(1)
    d = torch.cat([torch.randint(lo, hi, (20,), generator=gen) for lo, hi in buckets])
    ids, answers, d = make_batch(task, len(d), gen, distances=d)
    for row in accuracy_by_bucket(_oracle(ids), answers, d, buckets):
        assert row["n"] == 20 and row["accuracy"] == 1.0
    const = torch.full_like(answers, int(answers[0]))
    got = accuracy_by_bucket(const, answers, d, buckets)
    for row, (lo, hi) in zip(got, buckets):
        sel = (d >= lo) & (d < hi)
        assert row["accuracy"] == pytest.approx(float((answers[sel] == answers[0]).float().mean()))


def test_band_coverage_follows_the_band_geometry():
    task = Task(256)
    buckets = task.buckets()
    assert band_coverage(None, 256, buckets) == [1.0] * len(buckets)
    # exclusive bands: every distance belongs to exactly one of the 8 heads
    assert band_coverage(BandSpec("exclusive_bands", 8, 256), 256, buckets) == pytest.approx([1 / 8] * len(buckets))
    spec = BandSpec("spattention", 8, 256)
    cov = band_coverage(spec, 256, buckets)
    mask = spec.mask(256)[:, 254]  # [H, T] for the query position
    lo, hi = buckets[-1]
    assert cov[-1] == pytest.approx(float(mask[:, 254 - hi + 1: 254 - lo + 1].float().mean()))


def test_bench_retrieval_runs_at_tiny_scale(tmp_path):
    argv = ["bench", "retrieval", "--patterns", "dense,exclusive_bands", "--seq-len", "32", "--steps", "2",
            "--batch", "4", "--eval-batches", "1", "--d-model", "16", "--heads", "2", "--layers", "1",
            "--backend", "torch", "--device", "cpu", "--log-every", "0", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "retrieval.json").read_text())
    assert [r["attention"] for r in data["results"]] == ["dense", "exclusive_bands"]
    n_buckets = len(Task(32).buckets())
    for r in data["results"]:
        assert len(r["buckets"]) == n_buckets and all(b["n"] == 4 for b in r["buckets"])
        assert all(0.0 <= b["accuracy"] <= 1.0 for b in r["buckets"]) and r["final_loss"] > 0
    assert data["results"][1]["coverage"] == pytest.approx([0.5] * n_buckets)
    assert "| exclusive_bands |" in (tmp_path / "retrieval.md").read_text()
    assert main(argv[:2] + ["--patterns", "dense,bands", "--device", "cpu"]) == 2
