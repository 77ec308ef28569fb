"""``toggle`` on OLMo-core's own configs (a trained checkpoint's config.json, an experiment
config in JSON and YAML, a bare TransformerConfig dict) and structured recipe editing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("olmo_core")

from olmo_core.nn.transformer import TransformerConfig  # noqa: E402

from olmoe_spattn.cli import main  # noqa: E402
from olmoe_spattn.commands.toggle import set_yaml_value, toggle_olmo_core_config  # noqa: E402
from olmoe_spattn.olmo import band_spec_of  # noqa: E402
from olmoe_spattn.olmo.recipe import RECIPES_DIR  # noqa: E402

IGNORED = ("compile", "dp_config", "tp_config", "float8_config")


def _model(data: dict) -> TransformerConfig:
    model = data["model"] if "model" in data and isinstance(data["model"], dict) else data
    return TransformerConfig.from_dict({k: v for k, v in model.items() if k not in IGNORED})


def _without_mixers(data: dict) -> dict:
    """``data`` with every ``sequence_mixer`` entry removed (what toggle must keep as is)."""
    if isinstance(data, dict):
        return {k: _without_mixers(v) for k, v in data.items() if k != "sequence_mixer"}
    if isinstance(data, list):
        return [_without_mixers(v) for v in data]
    return data


@pytest.fixture(scope="module")
def checkpoint_config(tmp_path_factory) -> Path:
    """config.json of a real step folder written by `olmoe-spattn train` (2 tiny steps)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cmd = [sys.executable, "-m", "olmoe_spattn.cli", "train", "tiny",
           "--set", f"train.save_folder={tmp / 'run'}", "--set", f"data.paths=[{tmp / 'tokens.npy'}]",
           "--set", "data.synthetic_tokens=20000", "--set", "train.max_steps=2", "--set", "train.save_interval=2",
           "--set", "train.sequence_length=32", "--set", "partition_len=32"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    path = tmp / "run" / "step2" / "config.json"
    assert path.is_file()
    return path


def test_checkpoint_config_json_toggles_to_dense_and_back(checkpoint_config, tmp_path):
    original = json.loads(checkpoint_config.read_text())
    assert band_spec_of(_model(original)).pattern == "spattention"
    out = tmp_path / "dense.json"
    assert main(["toggle", str(checkpoint_config), "--attention", "dense", "-o", str(out)]) == 0
    dense = json.loads(out.read_text())
    assert band_spec_of(_model(dense)) is None
    # a new save folder, so the toggled run never resumes the band run's checkpoints
    old_folder = original["trainer"]["save_folder"].rstrip("/")
    assert dense["trainer"]["save_folder"] == f"{old_folder}-dense"
    assert dense["recipe"]["train"]["save_folder"] == f"{old_folder}-dense"
    trainer = {**original["trainer"], "save_folder": dense["trainer"]["save_folder"]}
    assert _without_mixers(dense) == _without_mixers({**original, "recipe": dense["recipe"], "trainer": trainer})
    assert dense["recipe"]["attention"] == "dense"
    assert {k: v for k, v in dense["recipe"].items() if k not in ("attention", "train")} == \
        {k: v for k, v in original["recipe"].items() if k not in ("attention", "train")}
    # back to band: the dense config records no partition, the experiment's sequence length is used
    back = tmp_path / "band.json"
    assert main(["toggle", str(out), "--attention", "exclusive_bands", "-o", str(back)]) == 0
    spec = band_spec_of(_model(json.loads(back.read_text())))
    assert (spec.pattern, spec.partition_len) == ("exclusive_bands", 32)
    # the toggled config converts like any checkpoint config (OLMo-core reads it back)
    from olmoe_spattn.hf.convert import model_config_from_experiment

    assert band_spec_of(model_config_from_experiment(json.loads(back.read_text()), back)) == spec


@pytest.mark.parametrize("fmt", ["json", "yaml"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["experiment", "bare"])
def test_olmo_core_olmoe_config_toggles(tmp_path, fmt, wrapped):
    # OLMo-core's own config; JSON round trip = plain types (its str enums), as any file holds them
    model = json.loads(json.dumps(TransformerConfig.olmoe_1B_7B(vocab_size=50304).as_config_dict()))
    data = {"run_name": "olmoe", "model": model, "dataset": {"sequence_length": 4096},
            "trainer": {"save_folder": "/ckpt/olmoe"}} if wrapped else model
    src = tmp_path / f"cfg.{fmt}"
    src.write_text(json.dumps(data, indent=2) if fmt == "json" else yaml.safe_dump(data, sort_keys=False))
    argv = ["toggle", str(src), "--attention", "spattention"]
    if not wrapped:
        argv += ["--partition-len", "2048"]
    assert main(argv) == 0  # in place
    text = src.read_text()
    new = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    spec = band_spec_of(_model(new))
    assert (spec.pattern, spec.partition_len) == ("spattention", 4096 if wrapped else 2048)
    assert spec.n_heads == 16
    if wrapped:  # the toggled experiment trains into its own folder
        assert new["trainer"]["save_folder"] == "/ckpt/olmoe-spattention"
        data = {**data, "trainer": {"save_folder": "/ckpt/olmoe-spattention"}}
    assert _without_mixers(new) == _without_mixers(data)
    mixer = (new["model"] if wrapped else new)["block"]["sequence_mixer"]
    old = model["block"]["sequence_mixer"]
    assert {k: v for k, v in mixer.items() if k in old and k not in ("_CLASS_", "type")} == \
        {k: v for k, v in old.items() if k not in ("_CLASS_", "type")}  # rope, qk-norm, heads kept


def test_dense_olmo_core_config_without_length_needs_partition_len():
    model = TransformerConfig.olmoe_1B_7B(vocab_size=50304).as_config_dict()
    with pytest.raises(ValueError, match="--partition-len"):
        toggle_olmo_core_config(model, "spattention")
    with pytest.raises(ValueError, match="not an OLMo-core config"):
        toggle_olmo_core_config({"model": {"d_model": 3}}, "dense")


def test_json_that_is_not_an_olmo_core_config_is_refused(tmp_path, capsys):
    src = tmp_path / "x.json"
    src.write_text(json.dumps({"attention": "dense"}))
    assert main(["toggle", str(src), "--attention", "dense"]) == 2
    assert "OLMo-core config" in capsys.readouterr().err


def test_recipe_edit_is_structured_and_keeps_comments():
    text = (RECIPES_DIR / "olmoe-1b-7b-32k.yaml").read_text()
    out = set_yaml_value(text, ("train", "save_folder"), "runs/x # not a comment")
    assert yaml.safe_load(out)["train"]["save_folder"] == "runs/x # not a comment"
    assert out.count("\n") == text.count("\n")
    # only that value's characters changed
    changed = [(a, b) for a, b in zip(text.splitlines(), out.splitlines()) if a != b]
    assert len(changed) == 1 and changed[0][0].startswith("  save_folder: runs/olmoe-1b-7b-32k")
    # a key that is missing is added to its section
    added = set_yaml_value("a: 1\ntrain:\n  x: 2  # c\n", ("train", "save_folder"), "r")
    assert added == "a: 1\ntrain:\n  x: 2  # c\n  save_folder: r\n"
    # a top-level key holding a comment with a colon is still found by the parser
    assert set_yaml_value("attention: spattention  # dense: no bands\nx: 1\n", ("attention",), "dense") == \
        "attention: dense  # dense: no bands\nx: 1\n"
