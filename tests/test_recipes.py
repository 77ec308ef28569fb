"""YAML recipes: every bundled recipe validates, twins differ only in attention, bad recipes give
clear errors, overrides and the toggle command work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from olmoe_spattn.cli import main
from olmoe_spattn.commands.toggle import toggle_recipe_text
from olmoe_spattn.olmo.recipe import RECIPES_DIR, load_recipe, recipe_from_dict

BUNDLED = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
TWIN_KEYS = {"name", "description", "attention"}


def _raw(name: str) -> dict:
    return yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())


def test_expected_recipes_are_bundled():
    for name in [
        "tiny", "tiny-dense",
        "olmoe-0.25b-1.75b", "olmoe-0.25b-1.75b-dense", "olmoe-0.25b-1.75b-exclusive-bands",
        "olmoe-0.25b-1.75b-gapped-bands", "olmoe-0.25b-1.75b-sliding-window",
        "olmoe-1b-7b", "olmoe-1b-7b-dense",
    ]:
        assert name in BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.train.context_parallel_degree == 1


@pytest.mark.parametrize(
    "twin, base, attention",
    [
        ("tiny-dense", "tiny", "dense"),
        ("olmoe-1b-7b-dense", "olmoe-1b-7b", "dense"),
        ("olmoe-0.25b-1.75b-dense", "olmoe-0.25b-1.75b", "dense"),
        ("olmoe-0.25b-1.75b-exclusive-bands", "olmoe-0.25b-1.75b", "exclusive_bands"),
        ("olmoe-0.25b-1.75b-gapped-bands", "olmoe-0.25b-1.75b", "gapped_bands"),
        ("olmoe-0.25b-1.75b-sliding-window", "olmoe-0.25b-1.75b", "sliding_window"),
    ],
)
def test_twins_differ_only_in_attention(twin, base, attention):
    a, b = _raw(twin), _raw(base)
    assert a["attention"] == attention and b["attention"] == "spattention"
    assert a["train"].pop("save_folder") != b["train"].pop("save_folder")
    assert {k: v for k, v in a.items() if k not in TWIN_KEYS} == {k: v for k, v in b.items() if k not in TWIN_KEYS}


def test_olmoe_1b_7b_is_olmo_core_architecture():
    from olmo_core.nn.transformer import TransformerConfig

    from olmoe_spattn.olmo import with_attention

    recipe = load_recipe("olmoe-1b-7b")
    ours = recipe.model_config()
    theirs = with_attention(TransformerConfig.olmoe_1B_7B(vocab_size=50304), "spattention", 4096, "auto")
    assert ours == theirs
    assert (ours.n_layers, ours.d_model, ours.block.sequence_mixer.n_heads) == (16, 2048, 16)
    assert ours.block.feed_forward_moe.num_experts == 64 and ours.block.feed_forward_moe.router.top_k == 8


def test_small_model_size():
    from olmoe_spattn.olmo.train import parameter_counts

    counts = parameter_counts(load_recipe("olmoe-0.25b-1.75b"))
    assert 1.6e9 < counts["total"] < 1.9e9
    assert 0.2e9 < counts["active_non_embedding"] < 0.3e9


def test_dry_run_prints_counts_and_patterns(capsys):
    assert main(["train", "olmoe-1b-7b", "--dry-run", "--set", "model.n_layers=2"]) == 0
    out = capsys.readouterr().out
    assert "n_layers: 2" in out
    assert "total:" in out and "active:" in out
    assert "layer  1: spattention N=4096 widths=[256, 256, 256, 256, ..., 256]" in out


def test_overrides_are_parsed_as_yaml():
    recipe = load_recipe("tiny", ["train.max_steps=7", "attention=exclusive_bands", "partition_len=dynamic"])
    assert recipe.train.max_steps == 7 and recipe.attention == "exclusive_bands"
    assert recipe.resolved_partition_len == "dynamic"
    assert load_recipe("tiny").resolved_partition_len == 64


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_stepz=3"], r"unknown key\(s\) \['max_stepz'\] in train"),
        (["model.d_model=sixty"], r"model.d_model='sixty' has the wrong type; expected int"),
        (["attention=banded"], r"attention='banded' is not allowed; choose one of: spattention"),
        (["partition_len=2"], r"partition_len=2 must be null, 'dynamic' or an int >= model.n_heads=4"),
        (["train.context_parallel_degree=2"], r"context parallelism is not supported with band attention"),
        (["train.global_batch_size=12"], r"global_batch_size=12 must be a multiple of"),
        (["model.top_k=9"], r"model.top_k=9 exceeds model.num_experts=4"),
        (["train.scheduler=linear"], r"train.scheduler='linear' is not allowed"),
        (["data.dtype=int8"], r"data.dtype='int8' is not allowed; choose one of: null, uint8, uint16"),
        (["train.autocast=float16"], r"train.autocast='float16' is not allowed; choose one of: null, bfloat16"),
        (["data.tokenizer.eos_token_id=999"], r"eos_token_id=999 is outside"),
        (["train"], r"must look like key.path=value"),
        (["model=3"], r"model must be a mapping, got int"),
        (["model.n_layers=true"], r"model.n_layers=True has the wrong type; expected int"),
        (["train.max_grad_norm=false"], r"train.max_grad_norm=False has the wrong type; expected Optional\[float\]"),
        (["train.betas=[0.9, x]"], r"train.betas=\[0.9, 'x'\] has the wrong type; expected list\[float\]"),
        (["train.lr.x=1"], r"train.lr=\{'x': 1\} has the wrong type; expected float"),
        (["source=x.yaml"], r"unknown key\(s\) \['source'\] in the recipe; allowed: name, "),
        (["_CLASS_=subprocess.run"], r"unknown key\(s\) \['_CLASS_'\] in the recipe"),
        (["train.activation_checkpointing=full"], r"cannot checkpoint whole MoE blocks; use 'attention'"),
    ],
)
def test_bad_recipes_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("tiny", overrides)


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="recipe 'nope' not found; bundled recipes: .*tiny"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="the recipe must be a mapping"):
        recipe_from_dict([1, 2])  # type: ignore[arg-type]


def test_recipe_file_keys_are_checked_before_decoding(tmp_path):
    """A recipe cannot name a class for the decoder to import and call (OLMo-core's ``_CLASS_``)."""
    marker = tmp_path / "ran"
    payload = {"_CLASS_": "subprocess.run", "args": ["touch", str(marker)]}
    for data, message in [
        ({"data": {"paths": ["x.npy"]}, "train": {"lr": payload}}, r"train.lr=\{'_CLASS_'.* has the wrong type"),
        ({"data": {"paths": ["x.npy"]}, "train": payload}, r"unknown key\(s\) \['_CLASS_', 'args'\] in train"),
        ({**payload, "data": {"paths": ["x.npy"]}}, r"unknown key\(s\) \['_CLASS_', 'args'\] in the recipe"),
    ]:
        with pytest.raises(ValueError, match=message):
            recipe_from_dict(data)
    assert not marker.exists()


def test_overrides_fill_sections_the_yaml_leaves_out():
    recipe = recipe_from_dict({"data": {"paths": ["x.npy"]}}, ["model.n_layers=2", "train.lr=3e-4"])
    assert (recipe.model.n_layers, recipe.model.d_model, recipe.train.lr) == (2, 2048, 3e-4)
    assert isinstance(recipe.train.lr, float) and recipe.as_dict()["data"]["paths"] == ["x.npy"]
    assert "source" not in recipe.as_dict()
    assert load_recipe("tiny", ["train.max_steps=3", "train.max_steps=5"]).train.max_steps == 5  # last wins


def test_tokenizer_section_is_olmo_core_tokenizer_config():
    from olmo_core.data import TokenizerConfig

    assert load_recipe("tiny").data.tokenizer == TokenizerConfig(512, 0, 1, identifier="runs/data/tiny-tokenizer")
    assert recipe_from_dict({"data": {"paths": ["x.npy"]}}).data.tokenizer == TokenizerConfig.gpt_neox_olmo_dolma_v1_5()
    partial = {"data": {"paths": ["x.npy"], "tokenizer": {"vocab_size": 512, "identifier": "t"}}}
    with pytest.raises(ValueError, match=r"data.tokenizer is missing key\(s\) \['eos_token_id', 'pad_token_id'\]"):
        recipe_from_dict(partial)


def test_cli_reports_bad_recipe_without_traceback(capsys):
    assert main(["train", "tiny", "--dry-run", "--set", "attention=nope"]) == 2
    assert "error: attention='nope' is not allowed" in capsys.readouterr().err


def test_toggle_keeps_comments_and_round_trips():
    text = (RECIPES_DIR / "tiny.yaml").read_text()
    dense = toggle_recipe_text(text, "dense")
    assert yaml.safe_load(dense)["attention"] == "dense"
    assert dense.count("#") == text.count("#")
    assert toggle_recipe_text(dense, "spattention") == text
    with pytest.raises(ValueError, match="unknown attention 'sparse'"):
        toggle_recipe_text(text, "sparse")


def test_toggle_command_writes_a_valid_recipe(tmp_path: Path):
    out = tmp_path / "x.yaml"
    argv = ["toggle", str(RECIPES_DIR / "olmoe-1b-7b.yaml"), "--attention", "exclusive_bands",
            "--partition-len", "2048", "--name", "x", "--save-folder", "runs/x", "-o", str(out)]
    assert main(argv) == 0
    recipe = load_recipe(out)
    assert (recipe.attention, recipe.partition_len, recipe.name) == ("exclusive_bands", 2048, "x")
    assert recipe.train.save_folder == "runs/x"
    assert main(["toggle", str(out), "--attention", "dense"]) == 0  # in place
    assert load_recipe(out).attention == "dense"


def test_expert_parallelism_requires_hsdp_with_a_clear_error():
    import torch

    from olmoe_spattn.olmo.train import _check_parallelism

    recipe = load_recipe("olmoe-0.25b-1.75b", ["train.expert_parallel_degree=2"])
    with pytest.raises(ValueError, match=r"expert_parallel_degree=2 needs train.data_parallel=hsdp.*'fsdp'"):
        _check_parallelism(recipe, torch.device("cuda"))
    hsdp = load_recipe("olmoe-0.25b-1.75b", ["train.expert_parallel_degree=2", "train.data_parallel=hsdp"])
    _check_parallelism(hsdp, torch.device("cuda"))  # accepted (no process group: world size 1)
