"""Checkpoint files are data, never code; a save folder is resumed only by the run it belongs to.

A tiny training run (2 steps, CPU) gives a real OLMo-core save folder. Tests plant a pickle
payload (a ``__reduce__`` that creates a marker file) in each kind of file OLMo-core unpickles
(trainer state ``train/rank0.pt``, the DCP index ``.metadata``, a tensor item and an object
item of a ``__*_*.distcp`` file) and check that resuming and ``convert to-hf`` refuse it, name
the file and never run it; and that damaged, unreadable or foreign save folders are refused
instead of silently resumed or overwritten.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("olmo_core")

from olmoe_spattn.hf.checkpoint_io import CheckpointError, check_dcp_metadata  # noqa: E402
from olmoe_spattn.olmo.recipe import load_recipe  # noqa: E402
from olmoe_spattn.olmo.resume import RUN_RECORD, prepare_save_folder  # noqa: E402


class Boom:
    """Unpickles to a call of ``os.system("touch MARKER")``: must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "olmoe_spattn.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _overrides(tmp: Path, folder: Path) -> list[str]:
    return [f"train.save_folder={folder}", f"data.paths=[{tmp / 'tokens.npy'}]", "data.synthetic_tokens=20000",
            "train.max_steps=2", "train.save_interval=2"]


def _train_args(tmp: Path, folder: Path, *extra: str) -> list[str]:
    args = ["train", "tiny"]
    for o in _overrides(tmp, folder):
        args += ["--set", o]
    return args + list(extra)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny spattention run with checkpoints at step 0 and step 2."""
    tmp = tmp_path_factory.mktemp("run")
    proc = _cli(*_train_args(tmp, tmp / "run"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp / "run" / "step2" / "train" / "rank0.pt").is_file()
    return tmp / "run"


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.copy(run_dir.parent / "tokens.npy", tmp_path / "tokens.npy")
    return tmp_path / "run"


def _recipe(folder: Path, *extra: str):
    return load_recipe("tiny", [*_overrides(folder.parent, folder), *extra])


def _plant_item(dcp: Path, kind: str, payload: bytes) -> str:
    """Appends ``payload`` to a ``.distcp`` file and points one ``kind`` item of the index at it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    meta = check_dcp_metadata(dcp)
    cls = TensorStorageMetadata if kind == "tensor" else BytesStorageMetadata
    items = [i for i in meta.storage_data if isinstance(meta.state_dict_metadata[i.fqn], cls)]
    index = min(items, key=lambda i: not i.fqn.startswith("model."))  # a model weight if there is one
    info = meta.storage_data[index]
    target = dcp / info.relative_path
    offset = target.stat().st_size
    with open(target, "ab") as f:
        f.write(payload)
    meta.storage_data[index] = type(info)(relative_path=info.relative_path, offset=offset, length=len(payload))
    (dcp / ".metadata").write_bytes(pickle.dumps(meta))
    return info.relative_path


def _zip_payload(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(Boom(marker), buf)
    return buf.getvalue()


def plant(step: Path, kind: str, marker: Path) -> str:
    """Plants a payload in one kind of file of ``step``; returns the file's name."""
    dcp = step / "model_and_optim"
    if kind == "trainer_state":
        torch.save({"global_step": Boom(marker)}, step / "train" / "rank0.pt")
        return "rank0.pt"
    if kind == "dcp_metadata":
        (dcp / ".metadata").write_bytes(pickle.dumps(Boom(marker)))
        return ".metadata"
    if kind == "distcp_tensor":  # a torch.save (zip) stream where a tensor was
        return _plant_item(dcp, "tensor", _zip_payload(marker))
    if kind == "distcp_object":  # a raw pickle stream where a pickled object was
        return _plant_item(dcp, "bytes", pickle.dumps(Boom(marker)))
    raise AssertionError(kind)


KINDS = ["trainer_state", "dcp_metadata", "distcp_tensor", "distcp_object"]


@pytest.mark.parametrize("kind", KINDS)
def test_resume_refuses_pickled_code(run_copy, tmp_path, kind):
    marker = tmp_path / "pwned"
    name = plant(run_copy / "step2", kind, marker)
    with pytest.raises(CheckpointError, match=rf"step2.*{name}.*refus|refus.*{name}") as info:
        prepare_save_folder(_recipe(run_copy))
    assert "step2" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS[1:])
def test_convert_refuses_pickled_code_in_every_dcp_file(run_copy, tmp_path, kind):
    from olmoe_spattn.hf.convert import convert_to_hf

    marker = tmp_path / "pwned"
    name = plant(run_copy / "step2", kind, marker)
    with pytest.raises(CheckpointError, match=rf"refus.*{name}|{name}.*refus"):
        convert_to_hf(run_copy / "step2", tmp_path / "hf")
    assert not marker.exists()


def test_train_command_refuses_tampered_trainer_state(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    plant(run_copy / "step2", "trainer_state", marker)
    proc = _cli(*_train_args(tmp_path, run_copy), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "rank0.pt" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["trainer_state", "distcp", "dcp_metadata"])
def test_truncated_checkpoint_files_are_named(run_copy, damage):
    dcp = run_copy / "step2" / "model_and_optim"
    target = {
        "trainer_state": run_copy / "step2" / "train" / "rank0.pt",
        "distcp": max(dcp.glob("*.distcp"), key=lambda p: p.stat().st_size),
        "dcp_metadata": dcp / ".metadata",
    }[damage]
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=target.name) as info:
        prepare_save_folder(_recipe(run_copy))
    assert "Move step2 away" in str(info.value)


def test_clean_run_resumes_from_latest_step(run_copy):
    assert prepare_save_folder(_recipe(run_copy)) == (run_copy / "step2").resolve()
    assert (run_copy / RUN_RECORD).is_file()


def test_unreadable_step_folders_are_not_overwritten(run_copy, tmp_path):
    for step in ("step0", "step2"):
        (run_copy / step / ".metadata.json").unlink()
    before = (run_copy / "step2" / "train" / "rank0.pt").read_bytes()
    proc = _cli(*_train_args(tmp_path, run_copy), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "none of its step folders is a complete checkpoint" in proc.stderr
    assert str(run_copy) in proc.stderr and "--overwrite" in proc.stderr
    assert (run_copy / "step2" / "train" / "rank0.pt").read_bytes() == before
    # told to start over, it does
    proc = _cli(*_train_args(tmp_path, run_copy, "--overwrite"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_copy / "step2" / ".metadata.json").is_file()


def test_newer_incomplete_step_folder_is_refused(run_copy):
    (run_copy / "step2" / "train" / "rank0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step2 lacks train/rank0.pt.*from step0"):
        prepare_save_folder(_recipe(run_copy))


@pytest.mark.parametrize(
    "override, message",
    [
        ("attention=dense", "attention=spattention, partition_len=64.*asks for attention=dense"),
        ("partition_len=32", "partition_len=64.*asks for attention=spattention, partition_len=32"),
    ],
)
def test_other_attention_is_refused_unless_on_purpose(run_copy, override, message):
    with pytest.raises(ValueError, match=message) as info:
        prepare_save_folder(_recipe(run_copy, override))
    assert "train.save_folder=NEW_FOLDER" in str(info.value) and "--allow-attention-change" in str(info.value)
    assert prepare_save_folder(_recipe(run_copy, override), allow_attention_change=True) is not None
    # the record now says the new attention, so resuming the old one is refused in turn
    with pytest.raises(ValueError, match="asks for attention=spattention, partition_len=64"):
        prepare_save_folder(_recipe(run_copy))


def test_folder_without_record_is_checked_against_its_checkpoint_config(run_copy):
    (run_copy / RUN_RECORD).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"asks for attention=dense.*from .*step2/config.json|config.json"):
        prepare_save_folder(_recipe(run_copy, "attention=dense"))


def test_other_model_shape_is_refused_even_on_purpose(run_copy):
    with pytest.raises(ValueError, match="another model shape.*d_model=64.*d_model=128"):
        prepare_save_folder(_recipe(run_copy, "model.d_model=128"), allow_attention_change=True)


def test_train_command_refuses_dense_on_band_folder(run_copy, tmp_path):
    proc = _cli(*_train_args(tmp_path, run_copy, "--set", "attention=dense"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "asks for attention=dense" in proc.stderr and "Traceback" not in proc.stderr


def test_from_hf_and_eval_never_unpickle(tmp_path):
    """HF directories are read from safetensors only: a pickled ``pytorch_model.bin`` is refused."""
    from olmoe_spattn.cli import main
    from olmoe_spattn.hf.convert import convert_from_hf

    hf = tmp_path / "hf"
    hf.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"w": Boom(marker)}, hf / "pytorch_model.bin")
    (hf / "config.json").write_text('{"model_type": "olmoe_spattn"}')
    with pytest.raises(CheckpointError, match="model.safetensors"):
        convert_from_hf(hf, tmp_path / "out")
    assert main(["eval", str(hf), "--tasks", "arc_easy", "--limit", "1"]) == 2
    assert not marker.exists()
