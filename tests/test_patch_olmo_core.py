"""``patches/``: the upstream-style diff that adds the band backend to OLMo-core 3.0.0 itself.

The INSTALLED ``olmo_core`` package is copied to a temp dir, patched with ``patches/apply.sh``,
and imported in a subprocess (``PYTHONPATH`` = the copy). There a small dense-FFN OLMo2-style
model is built with ``band_pattern`` set; every band attention call is captured and compared with
``olmoe_spattn.reference.reference_attention`` (float64, ``BandSpec.mask`` semantics).
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPLY = ROOT / "patches" / "apply.sh"
PATCH = ROOT / "patches" / "olmo-core-3.0.0-band-attention.patch"

TOOLS = [t for t in ("patch", "git") if shutil.which(t)]
pytestmark = pytest.mark.skipif(not TOOLS, reason="needs GNU patch or git")

# Runs inside the patched copy; prints one JSON line of measurements for the tests below.
CHECK_SCRIPT = r'''
import dataclasses, json, sys, warnings
import torch
import olmo_core
from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.attention import AttentionBackendName, AttentionConfig
from olmo_core.nn.attention.band import BandAttentionBackend, band_mask
from olmo_core.nn.transformer import TransformerConfig
from olmoe_spattn import BandSpec
from olmoe_spattn.reference import reference_attention

torch.manual_seed(0)
res = {"olmo_core_file": olmo_core.__file__}
H, T, B, V, N = 4, 24, 2, 64, 16  # partition_len < T: pairs with d >= N are in no band

def model_for(pattern, kernel, n_kv_heads=None, partition_len=N):
    cfg = TransformerConfig.olmo2_1M(vocab_size=V, n_layers=2, n_heads=H, n_kv_heads=n_kv_heads)
    mixer = cfg.block.sequence_mixer
    if pattern is not None:
        mixer = dataclasses.replace(mixer, band_pattern=pattern, band_partition_len=partition_len,
                                    band_kernel=kernel)
    cfg.block = dataclasses.replace(cfg.block, sequence_mixer=mixer)
    torch.manual_seed(1)
    model = cfg.build(init_device="cpu")
    model.init_weights(device=torch.device("cpu"))
    return model

def captured_errors(model, spec, ids, **fwd):
    calls = []
    def hook(mod, args, kwargs, out):
        q, k, v = args[0]
        calls.append((q.detach(), k.detach(), v.detach(), kwargs.get("cu_doc_lens"), out.detach()))
    hs = [blk.attention.backend.register_forward_hook(hook, with_kwargs=True) for blk in model.blocks.values()]
    logits = model(ids, **fwd)
    for h in hs:
        h.remove()
    errs = []
    for q, k, v, cu, out in calls:
        if cu is None:
            ref = reference_attention(q, k, v, spec)[0]
        else:
            b, t = q.shape[:2]
            flat = [x.reshape(1, b * t, *x.shape[2:]) for x in (q, k, v)]
            ref = reference_attention(*flat, spec, cu_seqlens=cu)[0].view(out.shape)
        errs.append((out.double() - ref).abs().max().item())
    return logits, errs, len(calls)

ids = torch.randint(0, V, (B, T))
for pattern in ("spattention", "exclusive_bands", "gapped_bands", "sliding_window", "dense"):
    for kernel in ("native", "auto"):
        model = model_for(pattern, kernel)
        backend = model.blocks["0"].attention.backend
        assert isinstance(backend, BandAttentionBackend), type(backend)
        logits, errs, n = captured_errors(model, BandSpec(pattern, H, N), ids)
        res[f"{pattern}/{kernel}"] = {"max_err": max(errs), "calls": n, "kernel": backend.band_kernel,
                                      "finite": bool(torch.isfinite(logits).all())}

# GQA + partition_len 'dynamic' + packed documents (intra-document masking)
model = model_for("exclusive_bands", "native", n_kv_heads=2, partition_len="dynamic")
doc_lens = torch.tensor([[10, 14], [5, 19]])
from olmo_core.data.utils import get_cumulative_document_lengths
cu = get_cumulative_document_lengths(doc_lens)
logits, errs, n = captured_errors(model, BandSpec("exclusive_bands", H, "dynamic"), ids,
                                  doc_lens=doc_lens, max_doc_lens=[14, 19])
res["gqa_dynamic_docs"] = {"max_err": max(errs), "calls": n}

# backward: finite gradients, and empty rows (exclusive_bands, i < S_h) give no NaN
model = model_for("exclusive_bands", "native")
loss = model(ids).float().logsumexp(-1).mean()
loss.backward()
res["grads_finite"] = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)

# band_pattern='dense' equals OLMo-core's own dense attention with the same weights
dense = model_for(None, None)
band_dense = model_for("dense", "native")
band_dense.load_state_dict(dense.state_dict())
exclusive = model_for("exclusive_bands", "native")
exclusive.load_state_dict(dense.state_dict())
with torch.no_grad():
    ref_logits = dense(ids)
    res["dense_vs_torch_backend"] = (band_dense(ids) - ref_logits).abs().max().item()
    res["exclusive_vs_dense"] = (exclusive(ids) - ref_logits).abs().max().item()
res["dense_default_backend"] = type(dense.blocks["0"].attention.backend).__name__

# the band options survive OLMo-core's config serialisation (JSON round trip) and rebuild the backend
cfg = TransformerConfig.olmo2_1M(vocab_size=V, n_heads=H)
cfg.block = dataclasses.replace(cfg.block, sequence_mixer=dataclasses.replace(
    cfg.block.sequence_mixer, band_pattern="gapped_bands", band_partition_len="dynamic"))
cfg2 = TransformerConfig.from_dict(json.loads(json.dumps(cfg.as_config_dict())))
rebuilt = cfg2.build(init_device="cpu").blocks["0"].attention.backend
res["roundtrip"] = [type(rebuilt).__name__, rebuilt.band_pattern, rebuilt.band_partition_len]

# the native mask equals BandSpec.mask
ok = True
for pattern in ("spattention", "exclusive_bands", "gapped_bands", "sliding_window", "dense"):
    for n_heads, pl, tq, tk in ((4, 16, 24, 24), (3, 10, 7, 12), (5, "dynamic", 9, 9)):
        ok &= torch.equal(band_mask(pattern, n_heads, pl, tq, tk),
                          BandSpec(pattern, n_heads, pl).mask(tk, q_len=tq))
res["masks_equal"] = bool(ok)

# clear configuration errors
errors = {}
def err(name, fn):
    try:
        fn()
        errors[name] = None
    except (OLMoConfigurationError, RuntimeError) as e:
        errors[name] = str(e)
err("small_partition", lambda: AttentionConfig(n_heads=4, band_pattern="spattention", band_partition_len=2)
    .build(16, layer_idx=0, n_layers=1))
err("bad_pattern", lambda: AttentionConfig(n_heads=4, band_pattern="diagonal", band_partition_len=8)
    .build(16, layer_idx=0, n_layers=1))
err("no_pattern", lambda: AttentionConfig(n_heads=4, backend=AttentionBackendName.band)
    .build(16, layer_idx=0, n_layers=1))
err("no_partition", lambda: AttentionConfig(n_heads=4, band_pattern="spattention")
    .build(16, layer_idx=0, n_layers=1))
err("other_backend", lambda: AttentionConfig(n_heads=4, backend="torch", band_pattern="spattention",
    band_partition_len=8).build(16, layer_idx=0, n_layers=1))
err("fused_v2", lambda: AttentionConfig(name="fused_v2", n_heads=4, band_pattern="spattention",
    band_partition_len=8).build(16, layer_idx=0, n_layers=1))
err("bad_kernel", lambda: AttentionConfig(n_heads=4, band_pattern="spattention", band_partition_len=8,
    band_kernel="cuda").build(16, layer_idx=0, n_layers=1))
res["errors"] = errors
print(json.dumps(res))
'''


def _copy_installed_olmo_core(dest: Path) -> Path:
    import olmo_core

    src = Path(olmo_core.__file__).resolve().parent
    shutil.copytree(src, dest / "olmo_core", ignore=shutil.ignore_patterns("__pycache__"))
    return dest / "olmo_core"


def _apply(*args: str, tool: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PATCH_TOOL", None)
    if tool:
        env["PATCH_TOOL"] = tool
    return subprocess.run(["bash", str(APPLY), *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def patched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("olmo_core_copy")
    pkg = _copy_installed_olmo_core(root)
    proc = _apply(str(root))
    assert proc.returncode == 0, proc.stderr
    assert (pkg / "nn" / "attention" / "band.py").is_file()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(ROOT)]), CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT], capture_output=True, text=True, timeout=240, env=env, cwd=root
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root, json.loads(run.stdout.strip().splitlines()[-1])


def test_patched_copy_is_what_was_imported(patched) -> None:
    root, res = patched
    assert Path(res["olmo_core_file"]).resolve().is_relative_to(root.resolve())
    import olmo_core  # the installed package itself stays unpatched

    assert not (Path(olmo_core.__file__).parent / "nn" / "attention" / "band.py").exists()


@pytest.mark.parametrize("pattern", ["spattention", "exclusive_bands", "gapped_bands", "sliding_window", "dense"])
@pytest.mark.parametrize("kernel", ["native", "auto"])
def test_band_model_matches_float64_reference(patched, pattern: str, kernel: str) -> None:
    _, res = patched
    r = res[f"{pattern}/{kernel}"]
    assert r["calls"] == 2  # one per layer
    assert r["finite"]
    assert r["max_err"] < 1e-5, r
    # 'auto' delegates to the installed olmoe_spattn; 'native' is the patch's own masked SDPA
    assert r["kernel"] == kernel


def test_gqa_dynamic_partition_and_documents(patched) -> None:
    r = patched[1]["gqa_dynamic_docs"]
    assert r["calls"] == 2 and r["max_err"] < 1e-5, r


def test_backward_finite_and_dense_twin(patched) -> None:
    res = patched[1]
    assert res["grads_finite"]
    assert res["dense_default_backend"] == "TorchAttentionBackend"
    assert res["dense_vs_torch_backend"] < 1e-5  # band_pattern='dense' == OLMo-core's causal SDPA
    assert res["exclusive_vs_dense"] > 1e-3  # and a real band pattern changes the model's output
    assert res["masks_equal"]


def test_config_roundtrip(patched) -> None:
    assert patched[1]["roundtrip"] == ["BandAttentionBackend", "gapped_bands", "dynamic"]


def test_configuration_errors(patched) -> None:
    e = patched[1]["errors"]
    assert "band_partition_len=2 is smaller than n_heads=4" in e["small_partition"]
    assert "unknown band_pattern 'diagonal'" in e["bad_pattern"]
    assert "needs 'band_pattern'" in e["no_pattern"]
    assert "needs 'band_partition_len'" in e["no_partition"]
    assert "need the 'band' attention backend (got 'torch')" in e["other_backend"]
    assert "only supported by default attention" in e["fused_v2"]
    assert "unknown band_kernel 'cuda'" in e["bad_kernel"]


@pytest.mark.parametrize("tool", TOOLS)
def test_apply_is_idempotent_and_reversible(tmp_path: Path, tool: str) -> None:
    pkg = _copy_installed_olmo_core(tmp_path)
    pristine = tmp_path / "pristine"
    shutil.copytree(pkg, pristine)
    assert _apply("--check", str(pkg), tool=tool).returncode == 0  # the package dir itself: -p3
    assert not (pkg / "nn" / "attention" / "band.py").exists()
    first = _apply(str(pkg), tool=tool)
    assert first.returncode == 0 and first.stdout.startswith(f"+ {tool} ") and "-p3" in first.stdout
    assert (pkg / "nn" / "attention" / "band.py").is_file()
    second = _apply(str(tmp_path), tool=tool)
    assert second.returncode == 0 and "already applied" in second.stdout
    assert _apply("--reverse", str(tmp_path), tool=tool).returncode == 0
    assert not (pkg / "nn" / "attention" / "band.py").exists()
    for name in ("__init__.py", "backend.py"):
        assert filecmp.cmp(pkg / "nn" / "attention" / name, pristine / "nn" / "attention" / name, shallow=False)


@pytest.mark.parametrize("tool", TOOLS)
def test_upstream_layout_and_bad_trees(tmp_path: Path, tool: str) -> None:
    (tmp_path / "repo" / "src").mkdir(parents=True)
    _copy_installed_olmo_core(tmp_path / "repo" / "src")
    proc = _apply("--check", str(tmp_path / "repo"), tool=tool)  # a git checkout: src/olmo_core, -p1
    assert proc.returncode == 0 and "applies cleanly" in proc.stdout
    proc = _apply("--check", str(tmp_path / "repo"), tool="svn")
    assert proc.returncode == 2 and "PATCH_TOOL must be 'patch' or 'git', got 'svn'" in proc.stderr

    proc = _apply(str(tmp_path / "missing"))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _apply(str(tmp_path / "empty"))
    assert proc.returncode == 2 and "does not look like an OLMo-core tree" in proc.stderr
    proc = _apply("--frobnicate", str(tmp_path / "repo"))
    assert proc.returncode == 2 and "unknown option '--frobnicate'" in proc.stderr

    # a tree whose attention code differs: the patch is refused, nothing is half-applied
    backend = tmp_path / "repo" / "src" / "olmo_core" / "nn" / "attention" / "backend.py"
    text = backend.read_text()
    assert "Transformer Engine attention. Supports Hopper" in text  # a context line of the patch
    backend.write_text(text.replace("Transformer Engine attention. Supports Hopper", "TE attention. Hopper"))
    proc = _apply(str(tmp_path / "repo"), tool=tool)
    assert proc.returncode == 1 and "does not apply cleanly" in proc.stderr
    assert not (backend.parent / "band.py").exists()


def test_patch_is_a_git_style_diff() -> None:
    text = PATCH.read_text()
    assert "diff --git a/src/olmo_core/nn/attention/band.py b/src/olmo_core/nn/attention/band.py" in text
    assert "new file mode" in text
