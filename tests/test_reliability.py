"""Bad input is refused early with a clear error: recipe ranges (what ``--dry-run`` checks),
recipe paths, ``toggle``'s save folder, ``convert`` onto its own input, ``eval`` task names and
comparisons."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from olmoe_spattn.cli import main
from olmoe_spattn.olmo.recipe import RECIPES_DIR, load_recipe

RANGE_CASES = [
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0 is out of range; allowed: a finite number > 0.0, or null"),
    ("train.max_grad_norm=0", "train.max_grad_norm=0.0 is out of range"),
    ("model.lb_loss_weight=-0.01", "model.lb_loss_weight=-0.01 is out of range; allowed: a finite number >= 0.0"),
    ("model.z_loss_weight=.nan", "model.z_loss_weight=nan is out of range"),
    ("train.eps=-1e-8", "train.eps=-1e-08 is out of range; allowed: a finite number > 0.0"),
    ("train.eps=0", "train.eps=0.0 is out of range"),
    ("train.num_workers=-1", "train.num_workers=-1 is out of range; allowed: an integer >= 0"),
    ("train.weight_decay=.nan", "train.weight_decay=nan is out of range; allowed: a finite number >= 0.0"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 is out of range"),
    ("train.weight_decay=.inf", "train.weight_decay=inf is out of range"),
    ("train.ephemeral_save_interval=0", "train.ephemeral_save_interval=0 is out of range; allowed: an integer >= 1, or null"),
    ("train.save_interval=0", "train.save_interval=0 is out of range; allowed: a positive integer"),
    ("train.lr=.inf", "train.lr=inf is out of range; allowed: a finite number > 0.0"),
    ("train.lr=0", "train.lr=0.0 is out of range"),
    ("train.decay_fraction=1.5", "train.decay_fraction=1.5 is out of range; allowed: a finite number >= 0.0 and <= 1.0"),
    ("train.min_lr_ratio=.nan", "train.min_lr_ratio=nan is out of range"),
    ("train.betas=[0.9, 1.0]", r"train.betas\[1\]=1.0 is out of range; allowed: a finite number >= 0.0 and < 1.0"),
    ("train.warmup_steps=-5", "train.warmup_steps=-5 is out of range; allowed: an integer >= 0"),
    ("train.seed=-1", "train.seed=-1 is out of range"),
    ("data.synthetic_tokens=0", "data.synthetic_tokens=0 is out of range"),
    ("data.tokenizer.bos_token_id=-3", "data.tokenizer.bos_token_id=-3 is outside"),
]


@pytest.mark.parametrize("override, message", RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_dry_run_checks_every_numeric_range(override, message, capsys):
    assert main(["train", "tiny", "--dry-run", "--set", override]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_null_max_grad_norm_means_no_clipping():
    assert load_recipe("tiny", ["train.max_grad_norm=null"]).train.max_grad_norm is None


def test_recipe_path_that_is_a_directory(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--dry-run"]) == 2
    assert f"recipe '{tmp_path}' is not a file" in capsys.readouterr().err


def test_toggle_writes_to_a_new_save_folder_by_default(tmp_path):
    out = tmp_path / "dense.yaml"
    assert main(["toggle", str(RECIPES_DIR / "tiny.yaml"), "--attention", "dense", "-o", str(out)]) == 0
    assert load_recipe(out).train.save_folder == "runs/tiny-dense"
    back = tmp_path / "band.yaml"
    assert main(["toggle", str(out), "--attention", "exclusive_bands", "-o", str(back)]) == 0
    assert load_recipe(back).train.save_folder == "runs/tiny-exclusive-bands"
    kept = tmp_path / "kept.yaml"
    assert main(["toggle", str(RECIPES_DIR / "tiny.yaml"), "--attention", "dense", "--keep-save-folder",
                 "-o", str(kept)]) == 0  # fmt: skip
    assert load_recipe(kept).train.save_folder == "runs/tiny"
    assert yaml.safe_load(kept.read_text())["attention"] == "dense"


# ---------------------------------------------------------------------- convert onto itself
@pytest.fixture(scope="module")
def olmo_ckpt(tmp_path_factory):
    pytest.importorskip("olmoe_spattn.olmo")
    import hf_helpers as H

    root = tmp_path_factory.mktemp("ckpt")
    config = H.model_config("spattention")
    return H.save_unsharded(H.build_olmo_model(config, seed=3), config, root / "olmo")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "inside"])
def test_convert_to_hf_refuses_to_write_into_its_input(olmo_ckpt, tmp_path, where, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(olmo_ckpt, ckpt)
    before = _snapshot(ckpt)
    out = ckpt if where == "same" else ckpt / "hf"
    assert main(["convert", "to-hf", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    assert "overlaps the input" in err and str(ckpt) in err
    assert _snapshot(ckpt) == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_convert_from_hf_refuses_to_write_into_its_input(olmo_ckpt, tmp_path, where, capsys):
    from olmoe_spattn.hf.convert import convert_to_hf

    hf = convert_to_hf(olmo_ckpt, tmp_path / "hf")
    before = _snapshot(hf)
    out = hf if where == "same" else hf / "olmo"
    assert main(["convert", "from-hf", str(hf), str(out)]) == 2
    err = capsys.readouterr().err
    assert "overlaps the input" in err and str(hf) in err
    assert _snapshot(hf) == before


# ---------------------------------------------------------------------- eval
class _NoModel:
    """Stands in for lm-eval: knows one task and fails if a model would be loaded."""

    all_tasks = ["spattn_offline", "paper", "paper_mmlu"]

    def __init__(self, *args, **kwargs) -> None:
        pass


def test_eval_unknown_task_is_refused_before_loading_the_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    import lm_eval
    import lm_eval.tasks

    def no_model(**kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", _NoModel)
    monkeypatch.setattr(lm_eval, "simple_evaluate", no_model)
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "olmoe_spattn"}')
    (model / "model.safetensors").write_bytes(b"not loaded")
    assert main(["eval", str(model), "--tasks", "spattn_offline,no_such_task", "--device", "cpu"]) == 2
    assert "unknown lm-eval task(s) no_such_task" in capsys.readouterr().err


def _run(path: Path, tasks: str, limit, shots=(None,)) -> str:
    record = {"name": path.stem, "tasks": tasks, "limit": limit, "scores": {"copa": {"acc": 0.5}},
              "passes": [{"tasks": tasks.split(","), "num_fewshot": s} for s in shots]}
    path.write_text(json.dumps(record))
    return str(path)


@pytest.mark.parametrize(
    "other, field",
    [(("copa,piqa", 10), "tasks"), (("copa", None), "limit"), (("copa", 10, (5,)), "num_fewshot")],
)
def test_eval_compare_refuses_runs_evaluated_differently(tmp_path, capsys, other, field):
    a = _run(tmp_path / "a.json", "copa", 10)
    b = _run(tmp_path / "b.json", *other)
    assert main(["eval", "--compare", a, b]) == 2
    err = capsys.readouterr().err
    assert f"{field}:" in err and "not comparable" in err and "--allow-mismatch" in err
    assert main(["eval", "--compare", a, b, "--allow-mismatch"]) == 0
    assert "warning: runs were evaluated differently" in capsys.readouterr().out
    assert main(["eval", "--compare", a, _run(tmp_path / "c.json", "copa", 10)]) == 0


# ---------------------------------------------------------------------- band_attention input
def _qkv(b=1, t=8, h=4, h_kv=4, d=16):
    return torch.randn(b, t, h, d), torch.randn(b, t, h_kv, d), torch.randn(b, t, h_kv, d)


@pytest.mark.parametrize("backend", ["torch", "flex"])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"h_kv": 0}, "at least one head, got 4 query heads and 0 kv heads"),
        ({"head_offset": "1"}, r"head_offset must be an integer, got '1' \(str\)"),
        ({"cu_seqlens": [0, 8]}, "cu_seqlens must be a 1-D integer torch.Tensor .n_docs \\+ 1., got list"),
        ({"q_offset": -1}, r"q_offset=-1 is out of range.*allowed: an integer in \[0, 0\]"),
        ({"q_offset": 3}, r"q_offset=3 is out of range.*allowed: an integer in \[0, 0\]"),
        ({"q_offset": 1.5}, "q_offset=1.5 is out of range"),
    ],
)
def test_band_attention_bad_arguments_are_clear_errors(backend, kwargs, message):
    from olmoe_spattn import BandSpec, band_attention

    kwargs = dict(kwargs)
    q, k, v = _qkv(h_kv=kwargs.pop("h_kv", 4))
    with pytest.raises(ValueError, match=message):
        band_attention(q, k, v, BandSpec("spattention", 4, 8), backend, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_flex_and_torch_agree_on_query_offsets(backend):
    from olmoe_spattn import BandSpec, band_attention

    q, k, v = _qkv(t=12)
    q = q[:, :5]
    spec = BandSpec("exclusive_bands", 4, 8)
    with pytest.raises(ValueError, match=r"q_offset=8 is out of range.*\[0, 7\]"):
        band_attention(q, k, v, spec, backend, q_offset=8)
    ref = band_attention(q, k, v, spec, "torch", q_offset=7)
    torch.testing.assert_close(band_attention(q, k, v, spec, backend, q_offset=7), ref)


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_empty_batch_gives_an_empty_result(backend):
    from olmoe_spattn import BandSpec, band_attention

    q, k, v = _qkv(b=0)
    out = band_attention(q, k, v, BandSpec("spattention", 4, 8), backend)
    assert out.shape == (0, 8, 4, 16)


# ---------------------------------------------------------------------- prepare-data
@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory) -> Path:
    from olmoe_spattn.data.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400)


def _jsonl(path: Path, n: int, broken_at: int | None = None) -> Path:
    lines = [json.dumps({"text": f"band attention document {i} " * 5}) for i in range(n)]
    if broken_at is not None:
        lines[broken_at] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    return path


def _prepare(inp: Path, out: Path, tok: Path, *extra: str) -> int:
    return main(["prepare-data", str(inp), "--tokenizer", str(tok), "--out", str(out),
                 "--max-tokens-per-file", "200", "--batch-size", "4", *extra])  # fmt: skip


def _manifest_matches(out: Path) -> None:
    from olmoe_spattn.data.prepare import MANIFEST_NAME

    listed = {Path(p).name for p in json.loads((out / MANIFEST_NAME).read_text())["files"]}
    assert listed == {p.name for p in out.glob("*.npy")} and len(listed) > 1


def test_prepare_data_overwrite_keeps_old_dataset_when_new_input_fails(tmp_path, tiny_tok, capsys):
    out = tmp_path / "tokens"
    assert _prepare(_jsonl(tmp_path / "a.jsonl", 40), out, tiny_tok) == 0
    before = _snapshot(out)
    _manifest_matches(out)
    assert _prepare(_jsonl(tmp_path / "b.jsonl", 40, broken_at=30), out, tiny_tok, "--overwrite") == 2
    assert "b.jsonl:31: not valid JSON" in capsys.readouterr().err
    assert _snapshot(out) == before  # the old dataset is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    assert _prepare(_jsonl(tmp_path / "c.jsonl", 25), out, tiny_tok, "--overwrite") == 0
    _manifest_matches(out)
    assert _snapshot(out) != before


def test_prepare_data_failure_midway_leaves_no_part_files(tmp_path, tiny_tok):
    out = tmp_path / "tokens"
    assert _prepare(_jsonl(tmp_path / "a.jsonl", 60, broken_at=50), out, tiny_tok) == 2
    assert not out.exists()
    assert list(tmp_path.glob(".*")) == []
