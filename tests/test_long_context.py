"""Long-context recipes: twins, continued-pretraining settings, the dry-run memory estimate
(checked against hand arithmetic) and train.load_path resolution."""

from __future__ import annotations

import pytest
import yaml

from olmoe_spattn.olmo import memory
from olmoe_spattn.olmo.recipe import RECIPES_DIR, load_recipe
from olmoe_spattn.olmo.train import resolve_load_path

LONG = {"olmoe-1b-7b-32k": 32768, "olmoe-1b-7b-64k": 65536, "olmoe-0.25b-1.75b-16k": 16384}


@pytest.mark.parametrize("name, seq", sorted(LONG.items()))
def test_long_recipes_and_dense_twins(name, seq):
    band, dense = load_recipe(name), load_recipe(f"{name}-dense")
    assert band.attention == "spattention" and dense.attention == "dense"
    t = band.train
    assert t.sequence_length == seq and band.resolved_partition_len == seq
    assert band.data.document_masking and band.model.rope_theta == 8_000_000
    assert t.load_path and t.scheduler == "wsd" and t.data_parallel == "fsdp"
    assert t.activation_checkpointing in ("attention", "selected_ops")
    a = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    b = yaml.safe_load((RECIPES_DIR / f"{name}-dense.yaml").read_text())
    assert a["train"].pop("save_folder") != b["train"].pop("save_folder")
    keys = {"name", "description", "attention"}
    assert {k: v for k, v in a.items() if k not in keys} == {k: v for k, v in b.items() if k not in keys}
    # the rope theta reaches the OLMo-core model config
    assert band.model_config().block.sequence_mixer.rope.theta == 8_000_000


def _small():
    return load_recipe("tiny", [
        "train.sequence_length=128", "train.rank_microbatch_size=2", "train.global_batch_size=8",
        "train.data_parallel=fsdp",
    ])


def test_param_count_matches_hand_arithmetic():
    r = _small()  # V=512, D=64, L=2, E=4, I=64
    per_block = 4 * 64 * 64 + 2 * 64 + 2 * 64 + 4 * 64 + 3 * 4 * 64 * 64  # attn, qk-norm, norms, router, experts
    assert memory.block_params(r) == per_block == 66048
    total = 2 * 512 * 64 + 64 + 2 * per_block  # embeddings + LM head, final norm, blocks
    assert r.model_config().num_params == total == 197696


@pytest.mark.parametrize("mode, per_token_layer", [
    (None, 2 * (9 * 64 + 2 * 64 + 2 * 2 * 64 + 4 * 2 * 64) + 4 * 4),        # 2832
    ("attention", 2 * (1 * 64 + 2 * 64 + 2 * 2 * 64 + 4 * 2 * 64) + 4 * 4),  # 1808
    ("selected_ops", 2 * 3 * 64 + 4 * 4),                                   # 400
])
def test_estimate_matches_hand_arithmetic(mode, per_token_layer):
    r = _small()
    r.train.activation_checkpointing = mode
    assert memory.activation_bytes_per_token_per_layer(r, mode) == per_token_layer
    e = memory.estimate(r, 4)
    tokens = 2 * 128
    assert e.model_states == 197696 * 16 // 4
    assert e.gathered_params == 2 * 2 * 66048
    assert e.activations == tokens * 2 * per_token_layer
    assert e.logits == tokens * 512 * 6
    subtotal = e.model_states + e.gathered_params + e.activations + e.logits
    assert e.total == int(subtotal * 1.1) + 3 * 1024**3
    # one GPU: nothing to gather, whole model states
    assert memory.estimate(r, 1).model_states == 197696 * 16 and memory.estimate(r, 1).gathered_params == 0


def test_gpus_needed_grows_with_model_states_and_reports_impossible():
    r = load_recipe("olmoe-1b-7b-64k")
    n_params = r.model_config().num_params
    one = memory.estimate(r, 1)
    assert one.model_states == n_params * 16
    assert memory.gpus_needed(r, 10**15) == 1
    need = memory.gpus_needed(r, 141 * 10**9)
    assert need is not None and need > 1
    assert memory.estimate(r, need).total <= 141 * 10**9 < memory.estimate(r, need // 2).total
    # no FSDP degree helps when one micro-batch's activations exceed the GPU
    r.train.activation_checkpointing = None
    assert memory.gpus_needed(r, 80 * 10**9) is None
    text = "\n".join(memory.report(r))
    assert "does not fit 80 GB" in text


def test_dry_run_prints_memory_and_gpus(capsys):
    from olmoe_spattn.cli import main

    assert main(["train", "olmoe-1b-7b-64k", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# memory estimate" in out and "x 141 GB (H200)" in out and "x 80 GB" in out


def test_load_path_resolution(tmp_path):
    assert resolve_load_path(None) is None
    with pytest.raises(ValueError, match="train.load_path"):
        resolve_load_path(str(tmp_path / "missing"))
    conv = tmp_path / "from_hf"
    (conv / "model_and_optim").mkdir(parents=True)
    (conv / "model_and_optim" / ".metadata").write_bytes(b"")
    assert resolve_load_path(str(conv)) == str(conv / "model_and_optim")
    step = tmp_path / "run" / "step100"
    (step / "train").mkdir(parents=True)
    assert resolve_load_path(str(step)) == str(step)
    assert resolve_load_path(str(tmp_path / "run")) == str(tmp_path / "run")
