"""Released-OLMoE path: a random transformers ``OlmoeForCausalLM`` (stock ``olmoe`` directory)
converts into OLMo-core with OLMo-core's converter and gives transformers' logits (dense, fp32),
trains a few steps with band attention from ``train.load_path``, converts back to the band HF
format with matching logits; a dense one converts back to stock ``olmoe`` that plain
transformers loads with equal logits and identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hf_helpers as H
import pytest
import torch

pytest.importorskip("olmoe_spattn.olmo")

from olmoe_spattn.hf.checkpoint_io import CheckpointError  # noqa: E402
from olmoe_spattn.hf.convert import convert_from_hf, convert_to_hf, load_olmo_core_checkpoint  # noqa: E402

VOCAB, D, LAYERS, HEADS, EXPERTS, TOPK, HIDDEN = H.VOCAB, 32, 2, 4, 4, 2, 16
N = 16  # band partition length


def _olmo_model(ckpt_dir: Path) -> torch.nn.Module:
    from olmoe_spattn.olmo import build_model

    ckpt = load_olmo_core_checkpoint(ckpt_dir)
    model = build_model(ckpt.model_config, "cpu", init_weights=False)
    model.load_state_dict(ckpt.state)
    return model.eval()


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    root = tmp_path_factory.mktemp("olmoe")
    cfg = OlmoeConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, num_experts=EXPERTS,
        num_experts_per_tok=TOPK, max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        eos_token_id=0, pad_token_id=1, bos_token_id=None, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = OlmoeForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than HF init so attention and routing matter
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "hf")
    H.build_tokenizer(root / "hf")
    return root / "hf", model


def _ids(seed: int, length: int = 3 * N - 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def test_stock_olmoe_converts_with_transformers_logits(stock, tmp_path):
    hf_dir, hf_model = stock
    out = convert_from_hf(hf_dir, tmp_path / "oc")
    experiment = json.loads((out / "config.json").read_text())
    assert experiment["model"]["block"]["name"] == "moe"  # pre-norm, as released OLMoE
    assert (out / "model_and_optim" / ".metadata").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    ids = _ids(1)
    torch.testing.assert_close(H.olmo_logits(_olmo_model(out), ids), H.hf_logits(hf_model, ids), rtol=1e-5, atol=1e-5)


def test_dense_round_trip_to_stock_olmoe(stock, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf_dir, hf_model = stock
    back = convert_to_hf(convert_from_hf(hf_dir, tmp_path / "oc"), tmp_path / "hf", fmt="olmoe")
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["model_type"] == "olmoe" and "auto_map" not in cfg
    a, b = load_file(str(hf_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # plain transformers, in a process that never imports olmoe_spattn
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM as A; "
        "m = A.from_pretrained(sys.argv[1]).eval(); ids = torch.load(sys.argv[2]); "
        "torch.save(m(ids).logits, sys.argv[3]); print(type(m).__name__, 'olmoe_spattn' in sys.modules)"
    )
    ids = _ids(2)
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code, str(back), str(tmp_path / "ids.pt"), str(tmp_path / "lg.pt")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["OlmoeForCausalLM", "False"]
    torch.testing.assert_close(torch.load(tmp_path / "lg.pt"), H.hf_logits(hf_model, ids), rtol=1e-5, atol=1e-5)
    assert isinstance(AutoModelForCausalLM.from_pretrained(back), type(hf_model))


def test_band_model_refuses_stock_format(stock, tmp_path):
    hf_dir, _ = stock
    band = convert_from_hf(hf_dir, tmp_path / "oc", attention="spattention", partition_len=N)
    with pytest.raises(ValueError, match="dense attention only"):
        convert_to_hf(band, tmp_path / "hf", fmt="olmoe")
    with pytest.raises(ValueError, match="--format olmoe"):
        convert_to_hf(convert_from_hf(hf_dir, tmp_path / "d"), tmp_path / "hf2", fmt="flex_olmo")
    with pytest.raises(ValueError, match="partition"):
        convert_from_hf(hf_dir, tmp_path / "x", attention="spattention")


def test_unknown_model_type_is_refused(stock, tmp_path):
    import shutil

    hf_dir, _ = stock
    bad = tmp_path / "llama"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        convert_from_hf(bad, tmp_path / "out")


def _train(tmp: Path, load_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "olmoe_spattn.cli", "train", "tiny",
        "--set", f"train.save_folder={tmp / 'run'}", "--set", f"data.paths=[{tmp / 'tokens.npy'}]",
        "--set", "data.synthetic_tokens=20000", "--set", f"data.tokenizer.vocab_size={VOCAB}",
        "--set", f"model.vocab_size={VOCAB}", "--set", f"model.d_model={D}", "--set", f"model.n_heads={HEADS}",
        "--set", f"model.expert_hidden_size={HIDDEN}", "--set", "model.block=moe",
        "--set", "model.rope_theta=10000", "--set", "attention=exclusive_bands", "--set", f"partition_len={N}",
        "--set", "train.sequence_length=32", "--set", "train.global_batch_size=4", "--set", "train.rank_microbatch_size=4",
        "--set", "train.max_steps=3", "--set", "train.save_interval=3", "--set", "train.warmup_steps=0",
        "--set", f"train.load_path={load_path}", *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_recipe_must_match_the_load_path_architecture(stock, tmp_path):
    from olmoe_spattn.olmo.recipe import load_recipe
    from olmoe_spattn.olmo.train import check_load_path_architecture, resolve_load_path

    hf_dir, _ = stock
    start = resolve_load_path(str(convert_from_hf(hf_dir, tmp_path / "oc")))
    sets = [f"model.vocab_size={VOCAB}", f"data.tokenizer.vocab_size={VOCAB}", f"model.d_model={D}",
            f"model.n_heads={HEADS}", f"model.expert_hidden_size={HIDDEN}", "model.layer_norm_eps=1e-5"]
    check_load_path_architecture(load_recipe("tiny", [*sets, "model.block=moe"]), start)
    with pytest.raises(ValueError, match="--set model.block=moe"):  # pre-norm weights into reordered-norm blocks
        check_load_path_architecture(load_recipe("tiny", sets), start)
    with pytest.raises(ValueError, match="--set model.layer_norm_eps=1e-05"):
        check_load_path_architecture(load_recipe("tiny", [*sets[:-1], "model.block=moe"]), start)


@pytest.mark.slow
def test_band_training_from_converted_checkpoint_and_back(stock, tmp_path):
    hf_dir, _ = stock
    start = convert_from_hf(hf_dir, tmp_path / "oc", attention="exclusive_bands", partition_len=N)
    run = _train(tmp_path, start, "--set", "model.layer_norm_eps=1e-5")
    assert run.returncode == 0, run.stderr[-3000:]
    step = tmp_path / "run" / "step3"
    trained = load_olmo_core_checkpoint(step).state
    initial = load_olmo_core_checkpoint(start).state
    gap = max((trained[k] - initial[k]).abs().max().item() for k in initial)
    assert 0 < gap < 0.05  # started from the converted weights (random init differs by ~0.2) and trained
    hf_back = convert_to_hf(step, tmp_path / "hf_band")
    cfg = json.loads((hf_back / "config.json").read_text())
    assert cfg["model_type"] == "olmoe_spattn_prenorm" and cfg["attention_pattern"] == "exclusive_bands"
    from olmoe_spattn.hf import OlmoeSpattnPrenormForCausalLM

    band = OlmoeSpattnPrenormForCausalLM.from_pretrained(hf_back).eval()
    ids = _ids(3)
    torch.testing.assert_close(H.hf_logits(band, ids), H.olmo_logits(_olmo_model(step), ids), rtol=1e-5, atol=1e-5)
    # and back into OLMo-core: bit-identical weights
    again = load_olmo_core_checkpoint(convert_from_hf(hf_back, tmp_path / "again")).state
    assert set(again) == set(trained) and all(torch.equal(again[k], trained[k]) for k in trained)


def test_cli_format_choices_match_the_converter():
    from olmoe_spattn.commands.convert import HF_FORMATS as CLI
    from olmoe_spattn.hf.config_map import HF_FORMATS

    assert CLI == HF_FORMATS
