"""OLMo-core integration: registration, config round trips, the dense <-> band toggle, and the
band layer against the float64 reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.attention import Attention, AttentionConfig, SlidingWindowAttentionConfig
from olmo_core.nn.attention.base import SequenceMixerConfig
from olmo_core.nn.transformer import TransformerConfig

from olmoe_spattn import BandSpec
from olmoe_spattn.olmo import (
    BandAttention,
    BandAttentionBackend,
    BandAttentionConfig,
    band_config_fields,
    band_spec_of,
    band_specs_by_layer,
    build_model,
    tiny_model_config,
    with_attention,
)
from olmoe_spattn.reference import reference_attention

VOCAB = 128


def _tokens(batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _roundtrip_json(config: TransformerConfig) -> TransformerConfig:
    return TransformerConfig.from_dict(json.loads(json.dumps(config.as_config_dict())))


# ---------------------------------------------------------------------- registration
def test_registered_in_olmo_core_registry():
    assert "band_attention" in SequenceMixerConfig.get_registered_names()
    assert SequenceMixerConfig.get_registered_class("band_attention") is BandAttentionConfig
    assert set(band_config_fields) <= {f for f in BandAttentionConfig.__dataclass_fields__}


def test_import_is_lazy_and_registers_on_olmo_core_import():
    code = (
        "import sys, olmoe_spattn\n"
        "assert 'olmo_core' not in sys.modules, 'olmoe_spattn imported olmo_core eagerly'\n"
        "from olmo_core.nn.attention.base import SequenceMixerConfig\n"
        "assert 'band_attention' in SequenceMixerConfig.get_registered_names()\n"
        "cls = SequenceMixerConfig.get_registered_class('band_attention')\n"
        "cfg = cls(n_heads=4, band_pattern='exclusive_bands', partition_len=16)\n"
        "print(cfg.band_spec().pattern)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("exclusive_bands")


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("partition_len", [64, "dynamic"])
def test_config_roundtrip_dict_json_yaml(partition_len):
    config = tiny_model_config("exclusive_bands", VOCAB, partition_len=partition_len, backend="torch")
    as_json = _roundtrip_json(config)
    plain = json.loads(json.dumps(config.as_dict(include_registered_name=True, json_safe=True)))
    as_yaml = TransformerConfig.from_dict(yaml.safe_load(yaml.safe_dump(plain)))  # "type" only
    for restored in (as_json, as_yaml):
        assert restored == config
        mixer = restored.block.sequence_mixer
        assert isinstance(mixer, BandAttentionConfig)
        assert (mixer.band_pattern, mixer.partition_len, mixer.band_backend) == (
            "exclusive_bands",
            partition_len,
            "torch",
        )
    assert band_spec_of(as_json) == BandSpec("exclusive_bands", 4, partition_len)


def test_yaml_file_roundtrip(tmp_path):
    config = tiny_model_config("spattention", VOCAB, partition_len=48)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(config.as_config_dict()))))
    assert TransformerConfig.from_yaml(path) == config


def test_olmoe_1b_7b_toggle_there_and_back():
    base = TransformerConfig.olmoe_1B_7B(vocab_size=50304)
    band = with_attention(base, "spattention", partition_len=4096)
    assert band_spec_of(base) is None
    assert band_spec_of(band) == BandSpec("spattention", 16, 4096)
    assert band.num_params == base.num_params and band.num_active_params == base.num_active_params
    back = with_attention(band, "dense")
    assert back == base  # exactly OLMo-core's original config again
    assert type(back.block.sequence_mixer) is AttentionConfig


def test_one_field_toggle_through_dotlist():
    band = tiny_model_config("spattention", VOCAB)
    dense = band.merge(["block.sequence_mixer.band_pattern=dense"])
    assert band_spec_of(dense) is None
    model = build_model(dense)
    assert type(model.blocks["0"].attention) is Attention
    again = dense.merge(["block.sequence_mixer.band_pattern=gapped_bands"])
    assert band_spec_of(again) == BandSpec("gapped_bands", 4, 64)


# ---------------------------------------------------------------------- parameters
def test_toggle_keeps_parameters_and_state_dict_loads_both_ways():
    torch.manual_seed(0)
    band_model = build_model(tiny_model_config("spattention", VOCAB))
    dense_model = build_model(tiny_model_config("dense", VOCAB))
    band_sd, dense_sd = band_model.state_dict(), dense_model.state_dict()
    assert {k: v.shape for k, v in band_sd.items()} == {k: v.shape for k, v in dense_sd.items()}
    dense_model.load_state_dict(band_sd, strict=True)
    band_model.load_state_dict(dense_model.state_dict(), strict=True)
    x = _tokens()
    with torch.no_grad():
        out_band, out_dense = band_model(x), dense_model(x)
    # same weights, different attention: outputs must differ (the band is really in effect)
    assert (out_band - out_dense).abs().max() > 1e-3
    # ... except for the first W_0 positions, where every head's band covers all keys
    # (spattention with N=64, H=4: W=16, head 0 sees d <= 16) -- only the token at position 0:
    torch.testing.assert_close(out_band[:, 0], out_dense[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["spattention", "exclusive_bands", "gapped_bands", "sliding_window"])
def test_band_layer_matches_float64_reference(pattern):
    torch.manual_seed(1)
    model = build_model(tiny_model_config(pattern, VOCAB, partition_len=24, backend="torch"))
    layer = model.blocks["0"].attention
    assert isinstance(layer, BandAttention) and isinstance(layer.backend, BandAttentionBackend)
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        got = layer(x)
        q, k, v = layer._prepare_qkv(x)
        ref, _ = reference_attention(q.double(), k.double(), v.double(), BandSpec(pattern, 4, 24))
        want = layer.w_out(ref.float().reshape(2, 40, -1))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_cu_doc_lens_become_cu_seqlens():
    torch.manual_seed(2)
    spec = BandSpec("spattention", 4, 16)
    backend = BandAttentionBackend(spec=spec, band_backend="torch", head_dim=8, n_heads=4)
    q, k, v = (torch.randn(2, 20, 4, 8) for _ in range(3))
    cu = torch.tensor([0, 7, 20, 31, 40], dtype=torch.int32)  # docs cross the batch-row boundary
    got = backend((q, k, v), cu_doc_lens=cu, max_doc_len=13)
    ref, _ = reference_attention(
        q.reshape(1, 40, 4, 8).double(), k.reshape(1, 40, 4, 8).double(), v.reshape(1, 40, 4, 8).double(),
        spec, cu_seqlens=cu,
    )
    torch.testing.assert_close(got, ref.reshape(2, 20, 4, 8).float(), atol=1e-5, rtol=1e-5)


def test_head_offset_selects_global_heads():
    """A tensor-parallel shard holding heads 2..3 computes exactly those heads' bands."""
    torch.manual_seed(3)
    spec = BandSpec("exclusive_bands", 4, 32)
    q, k, v = (torch.randn(1, 32, 4, 8) for _ in range(3))
    full, _ = reference_attention(q.double(), k.double(), v.double(), spec)
    shard = BandAttentionBackend(spec=spec, band_backend="torch", head_dim=8, n_heads=4)
    shard.head_offset = 2
    got = shard((q[:, :, 2:], k[:, :, 2:], v[:, :, 2:]))
    torch.testing.assert_close(got, full[:, :, 2:].float(), atol=1e-5, rtol=1e-5)


def test_band_layer_counts_fewer_flops():
    dense = build_model(tiny_model_config("dense", VOCAB)).blocks["0"].attention
    band = build_model(tiny_model_config("exclusive_bands", VOCAB)).blocks["0"].attention
    assert band.num_flops_per_token(64) < dense.num_flops_per_token(64)


def test_backward_runs_through_band_model():
    model = build_model(tiny_model_config("spattention", VOCAB, backend="torch"))
    logits = model(_tokens())
    logits.float().logsumexp(-1).mean().backward()
    grad = model.blocks["0"].attention.w_q.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------------- clear errors
def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown attention 'banded'"):
        with_attention(tiny_model_config("dense", VOCAB), "banded")
    with pytest.raises(ValueError, match="needs partition_len"):
        with_attention(TransformerConfig.olmoe_1B_7B(vocab_size=256), "spattention")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with_attention(tiny_model_config("dense", VOCAB), "spattention", 64, backend="cuda")
    with pytest.raises(OLMoConfigurationError, match="partition_len=2 is smaller than n_heads=4"):
        BandAttentionConfig(n_heads=4, band_pattern="spattention", partition_len=2)
    with pytest.raises(OLMoConfigurationError, match="unknown band_pattern 'diagonal'"):
        BandAttentionConfig(n_heads=4, band_pattern="diagonal", partition_len=16)
    with pytest.raises(OLMoConfigurationError, match="sliding_window"):
        BandAttentionConfig.from_attention_config(
            AttentionConfig(n_heads=4, sliding_window=SlidingWindowAttentionConfig(pattern=[16])),
            band_pattern="spattention",
            partition_len=64,
        )


def test_context_parallel_and_kv_cache_fail_clearly():
    layer = build_model(tiny_model_config("spattention", VOCAB)).blocks["0"].attention
    with pytest.raises(OLMoConfigurationError, match="context parallelism is not supported"):
        layer.apply_cp(cp_mesh=None)
    with pytest.raises(OLMoConfigurationError, match="KV-cache"):
        layer.init_kv_cache_manager(1, 64)


def test_per_layer_specs_with_block_overrides():
    config = tiny_model_config("spattention", VOCAB)
    dense_block = with_attention(config, "dense").block
    config.block_overrides = {1: dense_block}
    assert band_specs_by_layer(config) == [BandSpec("spattention", 4, 64), None]
    with pytest.raises(ValueError, match="different attention settings"):
        band_spec_of(config)
    model = build_model(config)
    assert isinstance(model.blocks["0"].attention, BandAttention)
    assert type(model.blocks["1"].attention) is Attention


def test_in_place_switch_keeps_parameters():
    from olmoe_spattn.olmo.attention import set_model_attention

    torch.manual_seed(4)
    model = build_model(tiny_model_config("dense", VOCAB, backend="torch"))
    reference = build_model(tiny_model_config("exclusive_bands", VOCAB, backend="torch"))
    reference.load_state_dict(model.state_dict())
    x = _tokens()
    with torch.no_grad():
        dense = model(x)
        assert set_model_attention(model, BandSpec("exclusive_bands", 4, 64), "torch") == 2
        torch.testing.assert_close(model(x), reference(x))
        set_model_attention(model, None)
        torch.testing.assert_close(model(x), dense)
    assert type(model.blocks["0"].attention) is Attention


def test_model_with_doc_lens_equals_documents_run_separately():
    """OLMo-core's ``doc_lens`` -> ``cu_doc_lens`` -> band varlen: a packed row gives each
    document exactly what it gets alone (RoPE positions restart per document too)."""
    torch.manual_seed(5)
    model = build_model(tiny_model_config("exclusive_bands", VOCAB, partition_len=16, backend="torch"))
    x = _tokens(batch=1, seq=40)
    doc_lens = torch.tensor([[13, 27]])
    with torch.no_grad():
        packed = model(x, doc_lens=doc_lens, max_doc_lens=[27])
        first, second = model(x[:, :13]), model(x[:, 13:])
    torch.testing.assert_close(packed[:, :13], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 13:], second, atol=1e-5, rtol=1e-5)


def test_band_layers_do_not_need_the_dense_backend_package():
    """A config asking OLMo-core for flash-attn still builds band layers where flash-attn is absent."""
    from olmo_core.nn.attention import AttentionBackendName

    base = TransformerConfig.olmoe_1B_7B(vocab_size=VOCAB, d_model=64, n_layers=1, n_heads=4)
    base.block.sequence_mixer.backend = AttentionBackendName.flash_2
    config = with_attention(base, "spattention", 32)
    assert config.block.sequence_mixer.backend == "flash_2"  # kept for the way back to dense
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = config.block.sequence_mixer.build(64, layer_idx=0, n_layers=1, init_device="meta")
    assert isinstance(layer, BandAttention)
    assert not [w for w in caught if "flash_2" in str(w.message)]  # flash_2 was never attempted
    assert with_attention(config, "dense").block.sequence_mixer.backend == "flash_2"
