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


def test_dense_layers_mask_documents_through_the_band_backend():
    """OLMo-core's torch SDPA backend cannot mask packed documents, so a dense recipe with
    ``data.document_masking`` runs its layers through the ``dense`` band pattern: a document's
    logits do not depend on the tokens of the document before it."""
    import torch

    from olmoe_spattn.olmo import build_model
    from olmoe_spattn.olmo.train import mask_documents_in_dense_layers

    assert mask_documents_in_dense_layers(None, load_recipe("tiny-dense")) == 0  # no masking: untouched
    assert mask_documents_in_dense_layers(None, load_recipe("tiny", ["data.document_masking=true"])) == 0
    recipe = load_recipe("tiny-dense", ["data.document_masking=true"])
    model = build_model(recipe.model_config(), "cpu")
    assert mask_documents_in_dense_layers(model, recipe) == recipe.model.n_layers
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 500, (1, 64), generator=g)
    other = ids.clone()
    other[0, :20] = torch.randint(2, 500, (20,), generator=g)  # a different first document
    kwargs = {"doc_lens": torch.tensor([[20, 44]]), "max_doc_lens": [44]}
    with torch.no_grad():
        first, second = model(ids, **kwargs), model(other, **kwargs)
    torch.testing.assert_close(first[0, 20:], second[0, 20:], rtol=0, atol=1e-5)  # MoE batching: rounding only
    assert (first[0, :20] - second[0, :20]).abs().max() > 0.1


def test_dense_twin_trains_with_document_masking(tmp_path):
    """The dense twins of the long-context recipes mask documents: `olmoe-spattn train` runs, and the
    checkpoint stays a dense model (converts to Hugging Face as one)."""
    import subprocess
    import sys

    from olmoe_spattn.hf.convert import load_olmo_core_checkpoint
    from olmoe_spattn.olmo import band_spec_of

    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "olmoe_spattn.cli", "train", "tiny-dense", "--set", "data.document_masking=true",
           "--set", "train.max_steps=2", "--set", "train.save_interval=2", "--set", f"train.save_folder={save}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dense attention with document masking" in proc.stderr + proc.stdout
    assert band_spec_of(load_olmo_core_checkpoint(save / "step2").model_config) is None
