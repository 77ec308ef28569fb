"""OLMo-core <-> Hugging Face conversion: weights, config, logits, bad checkpoints (CPU)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import hf_helpers as H
import pytest
import torch

from olmoe_spattn.bands import PATTERNS
from olmoe_spattn.hf import OlmoeSpattnForCausalLM
from olmoe_spattn.hf.checkpoint_io import CheckpointError
from olmoe_spattn.hf.convert import convert_from_hf, convert_to_hf

CASES = [(p, H.PARTITION_LEN) for p in PATTERNS] + [("spattention", "dynamic")]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return H.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=CASES, ids=[f"{p}-{n}" for p, n in CASES])
def converted(request, tmp_path_factory, tokenizer_dir):
    """(pattern, partition_len, OLMo-core config, model, checkpoint dir, HF dir)."""
    pattern, n = request.param
    root = tmp_path_factory.mktemp(f"{pattern}-{n}")
    config = H.model_config(pattern, n)
    model = H.build_olmo_model(config)
    ckpt = H.save_unsharded(model, config, root / "olmo", tokenizer_dir)
    hf_dir = convert_to_hf(ckpt, root / "hf")
    return pattern, n, config, model, ckpt, hf_dir


def test_hf_config_carries_band_fields(converted):
    pattern, n, _, _, _, hf_dir = converted
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "olmoe_spattn"
    assert cfg["architectures"] == ["OlmoeSpattnForCausalLM"]
    assert cfg["attention_pattern"] == pattern
    assert cfg["band_n_heads"] == H.N_HEADS == cfg["num_attention_heads"]
    if pattern != "dense":
        assert cfg["partition_len"] == n
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "model.safetensors").is_file()
    assert cfg["eos_token_id"] == 0 and cfg["pad_token_id"] == 1
    assert cfg["max_position_embeddings"] == 4 * H.PARTITION_LEN  # the experiment's sequence_length


def test_round_trip_weights_identical(converted, tmp_path):
    from safetensors.torch import load_file

    from olmoe_spattn.hf.convert import load_olmo_core_checkpoint
    from olmoe_spattn.olmo import band_spec_of

    pattern, n, config, _, ckpt, hf_dir = converted
    back = convert_from_hf(hf_dir, tmp_path / "back")
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    again = load_olmo_core_checkpoint(back)
    assert band_spec_of(again.model_config) == band_spec_of(config)
    assert (back / "tokenizer" / "tokenizer.json").is_file()
    # and to HF once more: the same HF weights
    hf2 = convert_to_hf(back, tmp_path / "hf2")
    x, y = load_file(str(hf_dir / "model.safetensors")), load_file(str(hf2 / "model.safetensors"))
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_logits_match_olmo_core(converted):
    """fp32 CPU, sequence longer than the partition (pairs with d >= N occur)."""
    _, _, _, model, _, hf_dir = converted
    hf_model = OlmoeSpattnForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, H.VOCAB, (2, 3 * H.PARTITION_LEN - 5), generator=torch.Generator().manual_seed(3))
    expected = H.olmo_logits(model, ids)
    got = H.hf_logits(hf_model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_band_logits_differ_from_dense_weights(converted, tmp_path):
    """Guard: the converted band model really runs its band (not dense); a converted dense
    model is exactly the dense model."""
    pattern, _, _, _, _, hf_dir = converted
    band = OlmoeSpattnForCausalLM.from_pretrained(hf_dir).eval()
    cfg = band.config
    cfg_dense = type(cfg).from_dict({**cfg.to_dict(), "attention_pattern": "dense"})
    dense = OlmoeSpattnForCausalLM(cfg_dense).eval()
    dense.load_state_dict(band.state_dict())
    ids = torch.randint(0, H.VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
    gap = (H.hf_logits(band, ids) - H.hf_logits(dense, ids)).abs().max()
    if pattern == "dense":
        assert gap == 0
    else:
        assert gap > 1e-2


def test_distributed_checkpoint_converts_like_unsharded(tmp_path):
    from safetensors.torch import load_file

    config = H.model_config("exclusive_bands")
    model = H.build_olmo_model(config, seed=1)
    a = convert_to_hf(H.save_unsharded(model, config, tmp_path / "u"), tmp_path / "hf_u")
    b = convert_to_hf(H.save_distributed(model, config, tmp_path / "step10"), tmp_path / "hf_d")
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    # the model_and_optim/ folder itself works too (config.json one level up)
    c = convert_to_hf(tmp_path / "step10" / "model_and_optim", tmp_path / "hf_d2")
    assert torch.equal(load_file(str(c / "model.safetensors"))["lm_head.weight"], x["lm_head.weight"])


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    config = H.model_config("spattention")
    model = H.build_olmo_model(config, seed=2)
    return config, model, H.save_unsharded(model, config, root / "olmo")


def test_truncated_safetensors_gives_clear_error(small_ckpt, tmp_path):
    import shutil

    _, _, ckpt = small_ckpt
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_to_hf(bad, tmp_path / "hf")
    from olmoe_spattn.cli import main

    assert main(["convert", "to-hf", str(bad), str(tmp_path / "hf2")]) == 2


def test_truncated_hf_weights_give_clear_error(small_ckpt, tmp_path):
    _, _, ckpt = small_ckpt
    hf_dir = convert_to_hf(ckpt, tmp_path / "hf")
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        convert_from_hf(hf_dir, tmp_path / "back")


def test_missing_weight_is_named(small_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, ckpt = small_ckpt
    bad = tmp_path / "bad"
    bad.mkdir()
    state = load_file(str(ckpt / "model.safetensors"))
    del state["blocks.1.attention.w_k.weight"]
    save_file(state, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(ValueError, match="blocks.1.attention.w_k.weight"):
        convert_to_hf(bad, tmp_path / "hf")


class _Boom:
    """Pickles to a call of os.system: must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_distributed_metadata_is_refused(small_ckpt, tmp_path):
    config, model, _ = small_ckpt
    step = H.save_distributed(model, config, tmp_path / "step1")
    marker = tmp_path / "pwned"
    (step / "model_and_optim" / ".metadata").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(CheckpointError, match="refusing"):
        convert_to_hf(step, tmp_path / "hf")
    assert not marker.exists()


def test_truncated_distributed_metadata(small_ckpt, tmp_path):
    config, model, _ = small_ckpt
    step = H.save_distributed(model, config, tmp_path / "step1")
    meta = step / "model_and_optim" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_to_hf(step, tmp_path / "hf")


def test_torch_file_with_pickled_code_is_refused(small_ckpt, tmp_path):
    _, _, ckpt = small_ckpt
    bad = tmp_path / "pt"
    bad.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"x": _Boom(marker)}, bad / "model.pt")
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_to_hf(bad, tmp_path / "hf")
    assert not marker.exists()


def test_weights_only_torch_file_converts(small_ckpt, tmp_path):
    from safetensors.torch import load_file

    _, model, ckpt = small_ckpt
    d = tmp_path / "pt"
    d.mkdir()
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, d / "model.pt")
    (d / "config.json").write_text((ckpt / "config.json").read_text())
    a = load_file(str(convert_to_hf(d, tmp_path / "a") / "model.safetensors"))
    b = load_file(str(convert_to_hf(ckpt, tmp_path / "b") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


_BLOCK_PACKAGE = """
import importlib.abc, sys
class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "olmoe_spattn":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Missing())
"""


def _load_without_package(hf_dir: Path, extra: str) -> subprocess.CompletedProcess:
    code = _BLOCK_PACKAGE + (
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}{extra})\n"
        "print('LOADED')\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(hf_dir.parent / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_band_checkpoint_without_package_fails_loudly(small_ckpt, tmp_path):
    _, _, ckpt = small_ckpt
    hf_dir = convert_to_hf(ckpt, tmp_path / "hf")
    plain = _load_without_package(hf_dir, "")
    assert plain.returncode != 0 and "LOADED" not in plain.stdout
    assert "trust_remote_code" in plain.stderr
    remote = _load_without_package(hf_dir, ", trust_remote_code=True")
    assert remote.returncode != 0 and "LOADED" not in remote.stdout
    assert "pip install olmoe-spattn" in remote.stderr


def test_dense_attention_request_on_band_model_is_refused(small_ckpt, tmp_path):
    _, _, ckpt = small_ckpt
    hf_dir = convert_to_hf(ckpt, tmp_path / "hf")
    with pytest.raises(ValueError, match="dense"):
        OlmoeSpattnForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa")


def test_auto_classes_load_band_model(small_ckpt, tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, ckpt = small_ckpt
    hf_dir = convert_to_hf(ckpt, tmp_path / "hf", tokenizer=tokenizer_dir / "tokenizer.json")
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert isinstance(model, OlmoeSpattnForCausalLM)
    assert model.config._attn_implementation == "olmoe_spattn"
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(tok("the quick brown fox")["input_ids"]) > 0
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1


def test_hf_config_agrees_with_olmo_core_get_hf_config(converted):
    """OLMo-core's own HF exporter (FlexOlmo) as an oracle for the architecture fields."""
    from olmo_core.nn.hf import get_hf_config

    _, _, _, model, _, hf_dir = converted
    theirs = get_hf_config(model)
    ours = json.loads((hf_dir / "config.json").read_text())
    assert type(theirs).__name__ == "FlexOlmoConfig"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "num_experts_per_tok", "num_experts",
                  "tie_word_embeddings", "norm_topk_prob"):  # fmt: skip
        assert ours[field] == getattr(theirs, field), field
    assert ours["rope_parameters"]["rope_theta"] == theirs.rope_parameters["rope_theta"]


def test_sharded_hf_weights_round_trip(small_ckpt, tmp_path):
    """Large models are written as several safetensors shards plus an index."""
    from safetensors.torch import load_file

    from olmoe_spattn.hf.convert import read_hf_dir, write_hf_dir

    _, _, ckpt = small_ckpt
    one = convert_to_hf(ckpt, tmp_path / "one")
    config, state = read_hf_dir(one)
    sharded = write_hf_dir(tmp_path / "sharded", config, state, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    _, again = read_hf_dir(sharded)
    ref = load_file(str(one / "model.safetensors"))
    assert set(again) == set(ref) and all(torch.equal(again[k], ref[k]) for k in ref)
    model = OlmoeSpattnForCausalLM.from_pretrained(sharded)
    assert torch.equal(model.lm_head.weight, ref["lm_head.weight"])


def test_checkpoint_of_the_train_command_converts(tmp_path, tokenizer_dir):
    """`olmoe-spattn train` (tiny recipe, 2 steps, CPU) -> `convert to-hf` -> same logits."""
    from olmoe_spattn.hf.convert import load_olmo_core_checkpoint
    from olmoe_spattn.olmo import build_model

    repo = Path(__file__).resolve().parents[1]
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "olmoe_spattn.cli", "train", str(repo / "configs" / "tiny.yaml"),
           "--set", "train.max_steps=2", "--set", "train.save_interval=2", "--set", f"train.save_folder={save}",
           "--set", f"data.paths=[{tmp_path / 'tokens.npy'}]", "--set", "data.synthetic_tokens=20000",
           "--set", "attention=exclusive_bands", "--set", "partition_len=32"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = save / "step2"
    hf_dir = convert_to_hf(step, tmp_path / "hf", tokenizer=tokenizer_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert (cfg["attention_pattern"], cfg["partition_len"], cfg["max_position_embeddings"]) == ("exclusive_bands", 32, 64)
    assert cfg["eos_token_id"] == 0 and cfg["pad_token_id"] == 1
    ckpt = load_olmo_core_checkpoint(step)
    model = build_model(ckpt.model_config, "cpu", init_weights=False)
    model.load_state_dict(ckpt.state)
    ids = torch.randint(2, 512, (2, 64), generator=torch.Generator().manual_seed(7))
    hf_model = OlmoeSpattnForCausalLM.from_pretrained(hf_dir).eval()
    torch.testing.assert_close(H.hf_logits(hf_model, ids), H.olmo_logits(model.eval(), ids), rtol=1e-5, atol=1e-5)
