"""``olmoe-spattn prepare-data`` and the tiny tokenizer: what lands on disk is exactly the
documents' token ids with an EOS after each, and OLMo-core's own dataset classes read it."""

from __future__ import annotations

import gzip
import json
import os
import random
import shlex
from pathlib import Path

import numpy as np
import pytest

from olmoe_spattn.cli import main as cli_main
from olmoe_spattn.data.prepare import MANIFEST_NAME, choose_dtype, prepare_data
from olmoe_spattn.data.tiny_tokenizer import EOS_TOKEN, MIN_VOCAB_SIZE, PAD_TOKEN, build_tiny_tokenizer

WORDS = "sparse band attention head expert token routing münchen 東京 emoji🙂 the of and".split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def hf_tok(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 60))) for _ in range(n)]


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n")
    return path


def _expected(hf_tok, docs: list[str]) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        if d.strip():
            ids += hf_tok(d, add_special_tokens=False)["input_ids"] + [hf_tok.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


def _read_all(out: Path, dtype: str) -> tuple[np.ndarray, list[np.ndarray]]:
    parts = [np.memmap(p, dtype=dtype, mode="r") for p in sorted(out.glob("part-*.npy"))]
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]), parts


# ----------------------------------------------------------------------------- tokenizer
def test_tiny_tokenizer_roundtrip(hf_tok) -> None:
    assert hf_tok.eos_token == EOS_TOKEN and hf_tok.eos_token_id == 0
    assert hf_tok.pad_token == PAD_TOKEN and hf_tok.pad_token_id == 1
    assert MIN_VOCAB_SIZE <= len(hf_tok) <= 400
    text = "Grüße aus 東京 🙂 — sparse attention!"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert hf_tok.eos_token_id not in ids
    assert hf_tok.decode(ids) == text  # byte-level: any string round-trips


def test_tiny_tokenizer_rejects_small_vocab(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 258"):
        build_tiny_tokenizer(tmp_path, vocab_size=100)


# ------------------------------------------------------------------------------- format
def test_jsonl_tokens_match_tokenizer_and_olmo_core_reads_them(tmp_path: Path, tok_dir: Path, hf_tok, capsys) -> None:
    docs = _docs(300) + ["", "   "]  # two empty docs are skipped
    inp = _write_jsonl(tmp_path / "a.jsonl", docs)
    out = tmp_path / "out"
    rc = cli_main(
        ["prepare-data", str(inp), "--tokenizer", str(tok_dir), "--out", str(out),
         "--max-tokens-per-file", "2000", "--batch-size", "16", "--progress-every", "0"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "  dtype: uint16" in printed and "data.dtype=uint16" in printed

    expected = _expected(hf_tok, docs)
    got, parts = _read_all(out, "uint16")
    np.testing.assert_array_equal(got, expected)
    assert len(parts) > 1 and all(p.size <= 2000 for p in parts)
    assert all(int(p[-1]) == hf_tok.eos_token_id for p in parts)  # no document spans two files

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["n_documents"] == 300 and manifest["n_skipped_empty"] == 2
    assert manifest["n_tokens"] == expected.size and manifest["dtype"] == "uint16"
    assert manifest["eos_token_id"] == 0 and manifest["vocab_size"] == len(hf_tok)

    # Dolma-style metadata: one "start,end" per document, matching the EOS positions.
    from olmo_core.data.utils import iter_document_indices

    n_docs = 0
    for part in sorted(out.glob("part-*.npy")):
        with gzip.open(part.with_suffix(".csv.gz"), "rt") as f:
            rows = [tuple(map(int, line.split(","))) for line in f]
        from_array = list(iter_document_indices(part, eos_token_id=0, dtype=np.uint16))
        from_meta = list(iter_document_indices(part, use_array_if_local=False, dtype=np.uint16))
        assert rows == from_array == from_meta
        n_docs += len(rows)
    assert n_docs == 300

    # OLMo-core's config-built fixed-sequence-length dataset (dtype inferred from the vocab).
    from olmo_core.data import NumpyFSLDatasetConfig, TokenizerConfig

    tok_cfg = TokenizerConfig(vocab_size=len(hf_tok), eos_token_id=0, pad_token_id=1)
    ds = NumpyFSLDatasetConfig(
        paths=[str(out / "part-*.npy")], expand_glob=True, sequence_length=64, tokenizer=tok_cfg, work_dir=str(tmp_path / "work")
    ).build()
    ds.prepare()
    assert ds.dtype == np.uint16
    per_file = [p.size // 64 for p in parts]
    assert len(ds) == sum(per_file)
    first = ds[0]["input_ids"].numpy()
    np.testing.assert_array_equal(first, np.asarray(parts[0][:64], dtype=np.int64))
    last_file_start = int(sum(p.size for p in parts[:-1]))
    last = ds[len(ds) - 1]["input_ids"].numpy()
    k = per_file[-1] - 1
    np.testing.assert_array_equal(last, expected[last_file_start + 64 * k : last_file_start + 64 * (k + 1)])


def test_parquet_other_field_directory_and_limit(tmp_path: Path, tok_dir: Path, hf_tok) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(50, seed=1)
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"content": docs[:30], "n": list(range(30))}), src / "a.parquet", row_group_size=7)
    _write_jsonl(src / "b.jsonl", docs[30:], field="content")
    (src / "notes.txt").write_text("ignored: not an input type")
    result = prepare_data(
        [src], tmp_path / "out", str(tok_dir), text_field="content", max_documents=40, log=lambda _: None
    )
    assert result.n_documents == 40
    got, _ = _read_all(tmp_path / "out", result.dtype)
    np.testing.assert_array_equal(got, _expected(hf_tok, docs[:40]))


def test_dtype_choice() -> None:
    assert choose_dtype(50280) == np.uint16  # gpt-neox-olmo-dolma-v1_5
    assert choose_dtype(65536) == np.uint16
    assert choose_dtype(65537) == np.uint32
    assert choose_dtype(100278) == np.uint32  # dolma2
    assert choose_dtype(200, "uint8") == np.uint8
    # one rule with synthetic data and OLMo-core's inference (a recipe without data.dtype)
    from olmoe_spattn.data.synthetic import synthetic_tokens

    assert choose_dtype(256) == np.uint8 and choose_dtype(257) == np.uint16
    assert synthetic_tokens(64, 256, eos_token_id=0).dtype == choose_dtype(256)
    assert synthetic_tokens(64, 257, eos_token_id=0).dtype == choose_dtype(257)
    with pytest.raises(ValueError, match="dtype uint8 cannot hold token ids up to 511"):
        choose_dtype(512, "uint8")
    with pytest.raises(ValueError, match="unknown dtype 'int16'"):
        choose_dtype(512, "int16")


def test_explicit_uint32(tmp_path: Path, tok_dir: Path, hf_tok) -> None:
    docs = _docs(20, seed=2)
    res = prepare_data([_write_jsonl(tmp_path / "a.jsonl", docs)], tmp_path / "o", str(tok_dir), dtype="uint32",
                       log=lambda _: None)
    assert res.dtype == "uint32"
    assert (tmp_path / "o" / "part-00000.npy").stat().st_size == 4 * res.n_tokens
    np.testing.assert_array_equal(_read_all(tmp_path / "o", "uint32")[0], _expected(hf_tok, docs))


# ------------------------------------------------------------------------------- errors
def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = cli_main(["prepare-data", *args])
    return rc, capsys.readouterr().err


def test_clear_errors(tmp_path: Path, tok_dir: Path, capsys) -> None:
    tok = ["--tokenizer", str(tok_dir), "--out", str(tmp_path / "out")]

    rc, err = _run_cli([str(tmp_path / "missing.jsonl"), *tok], capsys)
    assert rc == 2 and "missing.jsonl' does not exist" in err

    bad_field = tmp_path / "f.jsonl"
    bad_field.write_text('{"text": "ok"}\n{"body": "no text here", "id": 3}\n')
    rc, err = _run_cli([str(bad_field), *tok], capsys)
    assert rc == 2 and "f.jsonl:2: no field 'text' (fields present: body, id)" in err

    bad_json = tmp_path / "j.jsonl"
    bad_json.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    rc, err = _run_cli([str(bad_json), *tok], capsys)
    assert rc == 2 and "j.jsonl:3: not valid JSON" in err

    not_str = tmp_path / "n.jsonl"
    not_str.write_text('{"text": 42}\n')
    rc, err = _run_cli([str(not_str), *tok], capsys)
    assert rc == 2 and "field 'text' must be a string, got int" in err

    array = tmp_path / "arr.json"
    array.write_text('[{"text": "a"}, {"text": "b"}]\n')
    rc, err = _run_cli([str(array), *tok], capsys)
    assert rc == 2 and "arr.json:1: expected a JSON object" in err and "one object per line" in err

    wrong_type = tmp_path / "x.csv"
    wrong_type.write_text("text\nhello\n")
    rc, err = _run_cli([str(wrong_type), *tok], capsys)
    assert rc == 2 and "unsupported type" in err

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "p.parquet")
    rc, err = _run_cli([str(tmp_path / "p.parquet"), *tok], capsys)
    assert rc == 2 and "no column 'text' (columns present: body)" in err

    good = _write_jsonl(tmp_path / "g.jsonl", ["hello world"])
    rc, err = _run_cli([str(good), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "cannot load tokenizer" in err and "does not hold a loadable tokenizer" in err

    rc, err = _run_cli([str(good), *tok, "--dtype", "uint8"], capsys)
    assert rc == 2 and "dtype uint8 cannot hold token ids" in err

    assert _run_cli([str(good), *tok], capsys)[0] == 0
    rc, err = _run_cli([str(good), *tok], capsys)
    assert rc == 2 and "already holds .npy files; pass --overwrite" in err
    assert _run_cli([str(good), *tok, "--overwrite"], capsys)[0] == 0

    empty = _write_jsonl(tmp_path / "e.jsonl", ["", " "])
    rc, err = _run_cli([str(empty), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o3")], capsys)
    assert rc == 2 and "no non-empty documents" in err

    with pytest.raises(SystemExit) as exc:
        cli_main(["prepare-data", str(good), *tok, "--max-tokens-per-file", "0"])
    assert exc.value.code == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_help(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["prepare-data", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--tokenizer", "--out", "--text-field", "--dtype", "--max-tokens-per-file", "Examples:"):
        assert flag in text


# ----------------------------------------------------------------------- prepare -> train
def test_prepared_tokens_train_the_tiny_recipe(tmp_path: Path) -> None:
    """The printed ``--set`` options feed ``olmoe-spattn train`` directly (tiny recipe, 3 steps)."""
    import subprocess
    import sys

    tok = build_tiny_tokenizer(tmp_path / "tok", vocab_size=512)  # the tiny recipe's vocab: 512, eos 0, pad 1
    inp = _write_jsonl(tmp_path / "corpus.jsonl", _docs(400, seed=3))
    out = tmp_path / "tokens"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    prep = subprocess.run(
        [sys.executable, "-m", "olmoe_spattn.cli", "prepare-data", str(inp), "--tokenizer", str(tok), "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert prep.returncode == 0, prep.stderr
    assert "tokenizer: {vocab_size: 512, eos_token_id: 0, pad_token_id: 1" in prep.stdout
    cli_line = next(line for line in prep.stdout.splitlines() if line.startswith("or on the command line:"))
    sets = shlex.split(cli_line.split(":", 1)[1])
    save = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, "-m", "olmoe_spattn.cli", "train", "tiny", *sets,
         "--set", "train.max_steps=3", "--set", "train.log_interval=1", "--set", "train.save_interval=1000",
         "--set", f"train.save_folder={save}"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # no synthetic data was generated
    steps = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/CE loss"] for r in steps if "train/CE loss" in r]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
